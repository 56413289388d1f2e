"""The torch-free pipeline: slide -> tiles -> encoder -> STM -> resampler -> (per question) TIS -> cross-KV ->
prefill -> decode loop. Per-slide features and latents are cached on disk, so a second question about the
same slide reads no tile and runs no encoder.

    pipe = Pipeline.from_bundle("bundle/")
    ans = pipe.ask("slide.svs", "What is the diagnosis?")          # Answer
    for piece in pipe.ask("slide.svs", "Is necrosis present?", stream=True):
        print(piece, end="")                                          # StreamedAnswer
"""

from __future__ import annotations

import hashlib
import json
import os
import resource
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..engines.manifest import Manifest, load_manifest
from ..errors import LocpathError
from ..stm import merge_tokens
from ..text import format_prompt, load_tokenizer
from ..wsi import GridConfig, TissueConfig, open_slide
from ..wsi.extract import extract_features, plan_tiles
from ..wsi.features import FeatureFile, read_features
from .detok import StreamingDetokenizer
from .generator import GenerationStats, Generator, decoder_state
from .runners import Runner, make_runner
from .sampler import SamplingParams
from .slide_cache import SlideCache, default_cache_dir


def check_engines(bundle_dir: Path, manifest: Manifest, device: str) -> None:
    """Refuse built components whose engine config does not fit this machine, runtime or ONNX (a "rebuild")."""
    from ..engines.engine_config import EngineConfig, check_engine_config, describe_machine

    machines: dict[str, dict] = {}
    for entry in manifest.components.values():
        if not entry.engine_config:
            continue
        cfg = EngineConfig.load(bundle_dir / entry.engine_config)
        if cfg.backend not in machines:
            machines[cfg.backend] = describe_machine(cfg.backend, "cpu" if device == "cpu" else "cuda")
        check_engine_config(cfg, machines[cfg.backend], entry.parent_sha256, entry.sha256, str(bundle_dir / entry.file))


FUSED = "decoder_fused"
DECODER_CHOICES = ("auto", "fused", "plain")


def choose_decoder(manifest: Manifest, choice: str, bundle_dir: Path, device: str = "cpu") -> str:
    """Which decoder graph runs: the fused one (GroupQueryAttention, ONNX Runtime CPU) when the bundle has it
    and `choice` is auto or fused; the plain graph otherwise. The fused graph is fp32, and ONNX Runtime's CUDA
    GroupQueryAttention takes fp16/bf16 only, so GPUs run the plain graph."""
    if choice not in DECODER_CHOICES:
        raise LocpathError(f"unknown decoder {choice!r} (choose from {', '.join(DECODER_CHOICES)})")
    fused = manifest.components.get(FUSED)
    if choice == "fused" and fused is None:
        raise LocpathError(f"{bundle_dir}: this bundle has no fused decoder (re-export it with this version of "
                           "locpath, or use --decoder plain)")
    if choice == "fused" and device != "cpu":
        raise LocpathError(f"{bundle_dir}: the fused decoder is an fp32 CPU graph; on --device {device} use "
                           "--decoder plain (or auto)")
    if choice == "plain" or fused is None or device != "cpu":
        return "decoder"
    return FUSED


def _ov_hint(entry) -> dict:
    """The OpenVINO inference-precision hint `locpath build` measured fastest for an INT8 model, if recorded."""
    hint = (entry.quantization or {}).get("ov_hint") if entry.backend == "openvino" else None
    return {"hint": hint} if hint else {}


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # Linux reports KiB


@dataclass
class SlideContext:
    """What every question about one slide shares."""

    source: str
    latents: np.ndarray  # (1, L, D)
    tiles: int
    tokens: int  # after STM
    cache_hit: bool
    tiles_read: int
    timings_ms: dict = field(default_factory=dict)


@dataclass
class Answer:
    question: str
    answer: str
    token_ids: list
    timings_ms: dict
    peak_rss_mb: float
    slide: dict
    generation: dict

    def to_dict(self) -> dict:
        return {"question": self.question, "answer": self.answer, "timings_ms": self.timings_ms,
                "peak_rss_mb": round(self.peak_rss_mb, 1), "slide": self.slide, "generation": self.generation}


class StreamedAnswer:
    """Iterate for text pieces as they are decoded; `.result` holds the Answer once iteration ends."""

    def __init__(self, gen: Iterator[str]):
        self._gen = gen
        self.result: Answer | None = None

    def __iter__(self):
        self.result = yield from self._gen


def _ms(t0: float) -> float:
    return round((time.perf_counter() - t0) * 1000, 2)


class Pipeline:
    def __init__(self, bundle_dir: str | os.PathLike, manifest: Manifest, device: str = "cpu",
                 threads: int | None = None, cache_dir: str | os.PathLike | None = None, use_cache: bool = True,
                 tile_batch: int = 32, reader_workers: int = 2, decoder: str = "auto", decoder_spin: bool = True):
        self.bundle_dir = Path(bundle_dir)
        self.manifest = manifest
        self.cfg = manifest.model_config
        if manifest.fusion != "cara":
            raise LocpathError(f"{self.bundle_dir}: fusion {manifest.fusion!r} bundles are not runnable yet")
        self.tokenizer = load_tokenizer(self.bundle_dir / manifest.tokenizer.file)
        check_engines(self.bundle_dir, manifest, device)
        self.decoder_component = choose_decoder(manifest, decoder, self.bundle_dir, device)
        skip = {"decoder", FUSED} - {self.decoder_component}  # the other decoder graph is never loaded
        self.runners: dict[str, Runner] = {
            name: make_runner(c.backend, self.bundle_dir / c.file, name, precision=c.precision, device=device,
                              threads=threads, **self._spin(name, c, decoder_spin), **_ov_hint(c))
            for name, c in manifest.components.items() if name not in skip
        }
        self.decoder_state = decoder_state(self.runners[self.decoder_component],
                                           manifest.components[self.decoder_component])
        stop_ids = [self.tokenizer.token_to_id(t) for t in manifest.generation.stop_tokens]
        self.generator = Generator(self.decoder_state, manifest.generation.max_length, [i for i in stop_ids if i is not None])
        self.tile_batch = tile_batch
        self.reader_workers = reader_workers
        self.cache = SlideCache(cache_dir or default_cache_dir(), self.bundle_key()) if use_cache else None
        self._memory: dict[str, SlideContext] = {}
        self.tiles_read_total = 0

    def _spin(self, name: str, entry, decoder_spin: bool) -> dict:
        """Intra-op spinning only for the decoder: it alone runs hundreds of back-to-back calls, where waking
        sleeping threads per op costs more than spinning (0.5B INT4 decode: 36 -> 43 tok/s on 2 cores); every
        other session sleeps between calls so its idle pool does not steal the cores the next stage needs."""
        if entry.backend not in ("onnxruntime", "ort") or name != self.decoder_component:
            return {}
        return {"spin": bool(decoder_spin)}

    @classmethod
    def from_bundle(cls, bundle_dir: str | os.PathLike, **kw) -> "Pipeline":
        return cls(bundle_dir, load_manifest(bundle_dir, verify=True), **kw)

    def bundle_key(self) -> str:
        """What the slide cache depends on: tile encoder, resampler and preprocessing."""
        m = self.manifest
        parts = [m.components["tile_encoder"].sha256, m.components["resampler"].sha256,
                 json.dumps(m.preprocessing.__dict__, sort_keys=True, default=str)]
        return hashlib.sha256("|".join(parts).encode()).hexdigest()[:16]

    def release(self) -> None:
        for r in self.runners.values():
            r.release()

    # -- per slide ---------------------------------------------------------------------
    def _encode(self, tiles: np.ndarray) -> np.ndarray:
        return self.runners["tile_encoder"].run({"tiles": tiles}, ["features"])["features"]

    def _compress(self, ff: FeatureFile, timings: dict) -> tuple[np.ndarray, int]:
        stm = self.manifest.preprocessing.stm
        stride = ff.patch_size_level0  # no overlap in locpath grids; TRIDENT files record it too
        grid = np.asarray(ff.coords) // max(stride, 1)
        t0 = time.perf_counter()
        merged = merge_tokens(ff.features, grid, stm.get("window", 2), stm.get("threshold", 0.95), stm.get("enabled", True))
        timings["stm"] = _ms(t0)
        t0 = time.perf_counter()
        lat = self.runners["resampler"].run({
            "tokens": merged.features[None].astype(np.float32),
            "positions": merged.positions[None].astype(np.float32),
            "counts": merged.counts[None].astype(np.float32),
            "token_mask": np.ones((1, len(merged)), bool),
        }, ["latents"])["latents"]
        timings["resampler"] = _ms(t0)
        return lat, len(merged)

    def prepare(self, slide: str | os.PathLike, mpp_override: float | None = None,
                progress: bool | None = None) -> SlideContext:
        """Latents for a slide file or a TRIDENT/CLAM feature file (.h5), from cache when possible."""
        path = Path(slide)
        timings: dict[str, float] = {}
        if path.suffix.lower() in (".h5", ".hdf5"):
            ff = read_features(path)
            expect = self.cfg.tile_encoder.name
            if ff.encoder != expect:
                raise LocpathError(f"{path}: features come from encoder {ff.encoder!r}; this bundle needs {expect!r}")
            lat, n_tok = self._compress(ff, timings)
            return SlideContext(str(path), lat, len(ff.features), n_tok, False, 0, timings)
        t0 = time.perf_counter()
        if not path.exists():
            raise LocpathError(f"{path}: file not found")
        digest = self.cache.content_hash(path) if self.cache else None
        if digest and mpp_override is not None:
            digest = f"{digest}-mpp{mpp_override:g}"  # another mpp is another tile grid
        timings["hash"] = _ms(t0)
        mem_key = f"{digest or path.resolve()}|{mpp_override}"
        if mem_key in self._memory:
            ctx = self._memory[mem_key]
            return SlideContext(ctx.source, ctx.latents, ctx.tiles, ctx.tokens, True, 0, {"hash": timings["hash"]})
        if self.cache:
            t0 = time.perf_counter()
            hit = self.cache.get(digest)
            if hit is not None:
                timings["cache_read"] = _ms(t0)
                ctx = SlideContext(str(path), hit.latents, hit.meta["tiles"], hit.meta["tokens"], True, 0, timings)
                self._memory[mem_key] = ctx
                return ctx
        pp = self.manifest.preprocessing
        t0 = time.perf_counter()
        with open_slide(path, mpp_override=mpp_override) as s:
            timings["open"] = _ms(t0)
            plan = plan_tiles(s, GridConfig(target_mpp=pp.target_mpp, tile_size=pp.tile_size, min_tissue=pp.min_tissue),
                              TissueConfig(mask_mpp=pp.tissue_mask_mpp))
            timings["tissue_grid"] = round(plan.seconds * 1000, 2)
            t0 = time.perf_counter()
            ff, st = extract_features(s, self._encode, plan, self.cfg.tile_encoder.name, batch_size=self.tile_batch,
                                      workers=self.reader_workers, progress=progress)
            timings["tiles_encode"] = _ms(t0)
            timings["tile_read_wait"] = round(st.read_s * 1000, 2)
            timings["encode"] = round(st.encode_s * 1000, 2)
        self.tiles_read_total += st.tiles
        lat, n_tok = self._compress(ff, timings)
        ctx = SlideContext(str(path), lat, st.tiles, n_tok, False, st.tiles, timings)
        if self.cache:
            self.cache.put(digest, ff, lat, {"tiles": st.tiles, "tokens": n_tok, "slide": str(path)})
        self._memory[mem_key] = ctx
        return ctx

    # -- per question ------------------------------------------------------------------
    def _question_kv(self, latents: np.ndarray, question: str, timings: dict) -> dict[str, np.ndarray]:
        ids = self.tokenizer.encode(question.strip(), add_special_tokens=False).ids
        if not ids:
            raise LocpathError("the question is empty")
        t0 = time.perf_counter()
        scores = self.runners["tis"].run({"latents": latents, "question_ids": np.asarray([ids], np.int64),
                                          "question_mask": np.ones((1, len(ids)), np.int64)}, ["scores"])["scores"]
        m = self.cfg.tis.top_m
        # top-M in the runtime (not in the graph): highest scores, kept in latent order, scaled by sigmoid(score)
        idx = np.sort(np.argsort(-scores[0], kind="stable")[:m])
        sel = latents[:, idx] * (1.0 / (1.0 + np.exp(-scores[:, idx])))[..., None]
        timings["tis"] = _ms(t0)
        t0 = time.perf_counter()
        cross = self.runners["cross_kv"].run({"selected_latents": sel.astype(np.float32)})
        timings["cross_kv"] = _ms(t0)
        return cross

    def _params(self, overrides: dict) -> SamplingParams:
        g = self.manifest.generation
        base = dict(max_new_tokens=g.max_new_tokens, do_sample=g.do_sample, temperature=g.temperature, top_k=g.top_k,
                    top_p=g.top_p, repetition_penalty=g.repetition_penalty)
        base.update({k: v for k, v in overrides.items() if v is not None})
        return SamplingParams(**base).validate()

    def _answer_stream(self, ctx: SlideContext, question: str, params: SamplingParams, t_start: float):
        timings = dict(ctx.timings_ms)
        cross = self._question_kv(ctx.latents, question, timings)
        prompt = self.tokenizer.encode(format_prompt(question), add_special_tokens=False).ids
        stats = GenerationStats()
        detok = StreamingDetokenizer(self.tokenizer)
        first = None
        for tok in self.generator.generate(prompt, cross, params, stats):
            if first is None:
                first = time.perf_counter()
            piece = detok.push(tok)
            if piece:
                yield piece
        tail = detok.text()[detok.emitted:]
        if tail:
            yield tail
        timings["prefill"] = round(stats.prefill_ms, 2)
        timings["decode_per_token"] = round(stats.decode_ms_per_token, 3)
        timings["decode_total"] = round(float(np.sum(stats.decode_ms)), 2)
        timings["time_to_first_token"] = round(((first or time.perf_counter()) - t_start) * 1000, 2)
        timings["total"] = _ms(t_start)
        return Answer(
            question=question, answer=detok.text().strip(), token_ids=list(detok.ids), timings_ms=timings,
            peak_rss_mb=peak_rss_mb(),
            slide={"source": ctx.source, "tiles": ctx.tiles, "tokens_after_stm": ctx.tokens, "cache_hit": ctx.cache_hit,
                   "tiles_read": ctx.tiles_read},
            generation={"prompt_tokens": stats.prompt_tokens, "new_tokens": stats.new_tokens,
                        "stop_reason": stats.stop_reason, "kv_cache_bytes": stats.kv_cache_bytes,
                        "decoder": self.decoder_component, "params": params.__dict__},
        )

    def ask(self, slide, question: str, stream: bool = False, mpp_override: float | None = None,
            progress: bool | None = None, **sampling):
        t_start = time.perf_counter()
        params = self._params(sampling)
        ctx = self.prepare(slide, mpp_override=mpp_override, progress=progress)
        gen = self._answer_stream(ctx, question, params, t_start)
        if stream:
            return StreamedAnswer(gen)
        s = StreamedAnswer(gen)
        for _ in s:
            pass
        return s.result

    def ask_many(self, slide, questions: list[str], mpp_override: float | None = None, **sampling) -> list[Answer]:
        """Several questions about one slide: tiles are read and encoded at most once."""
        return [self.ask(slide, q, mpp_override=mpp_override, **sampling) for q in questions]
