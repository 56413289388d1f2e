"""What `locpath bench` is asked to measure (built by the CLI, read by every suite)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path


@dataclass
class BenchConfig:
    bundle: Path
    slide: Path | None = None
    tiles: list[int] = field(default_factory=lambda: [1000, 10000])
    repeats: int = 3
    warmup: int = 1
    workdir: Path = Path("runs/bench")
    baselines: bool = True
    question: str = "What is the diagnosis?"
    progress: bool = True
    decoder_05b: bool = False
    encoder_vitb: bool = False
    encoder_vitl: bool = False
    encoder_conch: bool = False
    encoders_giant: list[str] | None = None  # bench/encoders_giant.py: the giant encoders to export (None: off)
    keep_exports: bool = False  # keep their exported graphs under workdir/encoders-giant
    published: bool = False
    published_vision: bool = True  # --published: also its vision graphs on OpenVINO (bench/published_vision.py)
    published_synthetic_tiles: int = 1000  # --published: tissue tiles of the synthetic slide asked cold (0: none)
    published_encoders: list[str] = field(default_factory=list)  # --published: int8-safe builds of these encoders
    headline_05b: bool = False  # the like-for-like headline on a Qwen2.5-0.5B-shaped LLM too (bench/headline.py)
    headline_tiles_05b: list[int] | None = None  # its tile counts (default: `tiles`)
    throughput_pass: object = None  # batch.runner.run_pass (from the CLI): `bench --throughput`, bench/throughput.py
    throughput_slides: int = 4
