"""The overlapped batch runner (batch/runner.py) against the sequential one, its failure and stop paths, and the
bench's slides/hour section (bench/throughput.py)."""

import threading
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from locpath.batch.job import run_slide
from locpath.batch.records import Output
from locpath.batch.runner import run_overlapped, run_pass
from locpath.runtime.pipeline import Pipeline
from locpath.wsi.features import FeatureFile

QUESTIONS = ["Describe this slide.", "What is the diagnosis?", "Is necrosis present?"]


@pytest.fixture(scope="module")
def small_archive(tmp_path_factory):
    from locpath.synth import make_spec, write_slide

    d = tmp_path_factory.mktemp("tp-archive")
    slides = [write_slide(make_spec(5200 + i, tiles=(12, 12)), d / f"s{i}.tiff", fmt="tiff") for i in range(3)]
    broken = d / "s1b.svs"
    broken.write_bytes(b"II*\0not a slide at all")
    return [slides[0], slides[1], broken, slides[2]]


def _content(records: list[dict]) -> list[dict]:
    keep = ("slide", "digest", "tiles", "tokens_after_stm", "features")
    return [{k: r[k] for k in keep} | {"answers": [(a["question"], a["answer"], a["token_ids"], a["stop_reason"])
                                                   for a in r["answers"]]} for r in records]


def test_overlapped_equals_sequential_and_a_failing_slide_keeps_its_row(ref_bundle, small_archive, tmp_path):
    pipe = Pipeline.from_bundle(ref_bundle, use_cache=False, threads=1, memory_slides=1)
    seq_out, ovl_out = Output(tmp_path / "seq").prepare(), Output(tmp_path / "ovl").prepare()
    seq_rows = [run_slide(pipe, seq_out, p, QUESTIONS, {}) for p in small_archive]
    ovl_rows = []
    run_overlapped(pipe, ovl_out, small_archive, QUESTIONS, {}, ovl_rows.append, lanes=2)
    pipe.release()
    assert [r["slide"] for r in ovl_rows] == [str(p) for p in small_archive]  # rows in slide order
    assert [r["status"] for r in ovl_rows] == ["done", "done", "failed", "done"]
    assert [r["status"] for r in seq_rows] == [r["status"] for r in ovl_rows]
    assert "s1b.svs" in ovl_rows[2]["error"] and ovl_rows[2]["error"] == seq_rows[2]["error"]
    assert _content(ovl_out.all_records()) == _content(seq_out.all_records())  # same records, same answers
    assert len(ovl_out.all_records()) == 3 and all(len(r["answers"]) == 3 for r in ovl_out.all_records())


class _FakePipe:
    """The stage API the runner drives, scripted: prepare fails with a bug on slides named *bug*, or runs slowly
    (tile batches reported to `progress`) on *slow* ones; answer raises `answer_raises` when set."""

    cache = None

    def __init__(self, answer_raises=None):
        self.answer_raises = answer_raises
        self.slow_batches_done = 0

    def question(self, q, **sampling):
        return SimpleNamespace(text=q, prompt_ids=(1,), params=SimpleNamespace(**sampling))

    def prepare(self, path, keep_features=False, digest=None, progress=None):
        if "bug" in path.name:
            raise RuntimeError("a bug in prepare")
        for i in range(200 if "slow" in path.name else 1):
            time.sleep(0.01)
            if progress is not None:
                progress(i + 1, 200)
            if "slow" in path.name:
                self.slow_batches_done += 1
        ff = FeatureFile(features=np.zeros((2, 4), np.float32), coords=np.zeros((2, 2), np.int64), patch_size=224,
                         patch_size_level0=224, level0_mpp=0.5, target_mpp=0.5, encoder="tiny", name=str(path))
        return SimpleNamespace(tiles=2, tokens=1, timings_ms={}, features=ff, again=lambda t: None)

    def answer(self, ctx, questions):
        if self.answer_raises is not None:
            raise self.answer_raises
        return [SimpleNamespace(question=q.text, answer="x", token_ids=[1], generation={"stop_reason": "eos"},
                                timings_ms={}) for q in questions]

    def forget_slides(self):
        pass


@pytest.mark.parametrize("case", ["bug while staging", "Ctrl-C while answering"])
def test_a_bug_or_ctrl_c_stops_the_staging_threads_and_leaves_no_half_record(tmp_path, case):
    names = ["a.tiff", "b-bug.tiff", "c-slow.tiff"] if case.startswith("bug") else ["a.tiff", "b-slow.tiff"]
    slides = []
    for i, n in enumerate(names):
        (tmp_path / n).write_bytes(f"slide {i}".encode() * 100)
        slides.append(tmp_path / n)
    out = Output(tmp_path / "out").prepare()
    pipe = _FakePipe(answer_raises=KeyboardInterrupt() if case.startswith("Ctrl") else None)
    rows = []
    t0 = time.perf_counter()
    with pytest.raises(KeyboardInterrupt if case.startswith("Ctrl") else RuntimeError):
        run_overlapped(pipe, out, slides, ["q?"], {}, rows.append, lanes=2)
    assert time.perf_counter() - t0 < 1.5  # the slow slide (2 s of batches) was stopped at a batch boundary
    assert pipe.slow_batches_done < 200
    assert not [t for t in threading.enumerate() if t.name.startswith("locpath-batch-stage")]
    written = sorted(p.name for p in out.records.iterdir())
    if case.startswith("bug"):  # the slide before the bug is answered and recorded; nothing after it
        assert [r["slide"] for r in rows] == [str(slides[0])] and len(written) == 1
    else:
        assert rows == [] and written == []  # no record, no temporary left behind
    assert all(p.suffix == ".json" for p in out.records.iterdir())


def test_bench_slides_per_hour_section(tmp_path):
    from locpath.bench.throughput import QUESTIONS as BENCH_QUESTIONS, ThroughputConfig, bench_throughput
    from servers import shipped

    logs = []
    sec = bench_throughput(run_pass, Path(shipped()), tmp_path / "tp", logs.append,
                           ThroughputConfig(slides=2, tiles=60, seed=8800))
    assert [p["mode"] for p in sec["passes"]] == ["sequential", "overlapped", "overlapped", "sequential"]
    assert sec["questions"] == list(BENCH_QUESTIONS) and len(BENCH_QUESTIONS) == 5
    assert sec["sequential"]["lanes"] == 0 and sec["overlapped"]["lanes"] == 2
    for mode in ("sequential", "overlapped"):
        assert sec[mode]["slides_per_hour"] > 0 and 0 < sec[mode]["cores_busy"] <= 2.5
    assert sec["ratio"] > 0 and sec["sequential_split"]["prepare_s"] > 0
    assert not (tmp_path / "tp" / "pass").exists()  # each pass's output and cache are removed


def _scripted_pass(per_hour: dict, busy: dict, prepare_s: float, slide_s: float):
    """A batch pass with known figures: slides/hour taken in turn from per_hour[mode], `busy[mode]` seconds spent
    spinning on a core (else sleeping), every slide `prepare_s` of preparation in `slide_s` in all."""
    calls = {False: iter(per_hour["sequential"]), True: iter(per_hour["overlapped"])}
    keys = ("hash", "open", "tissue_grid", "tiles_encode", "stm", "resampler")

    def run_pass(bundle, slide_dir, questions, out, cache, overlap, lanes):
        mode = "overlapped" if overlap else "sequential"
        t0 = time.process_time()
        while time.process_time() - t0 < busy[mode]:
            pass
        time.sleep(0.25 - busy[mode])
        slides = len(list(Path(slide_dir).iterdir()))
        records = [{"slide_timings_ms": {k: prepare_s * 1000 / len(keys) for k in keys}, "seconds": slide_s}] * slides
        return ({"slides": slides, "done": slides, "failed": 0, "failures": [], "slides_per_hour": next(calls[overlap]),
                 "seconds": 1.0, "threads": 2, "lanes": lanes if overlap else 0}, records)

    return run_pass


def test_slides_per_hour_ratio_and_split_from_known_passes(tmp_path):
    """The section's figures from passes whose timings are known: medians over the S, O, O, S passes, their ratio
    and target, cores busy from the CPU the passes really spent, and the sequential split of a slide."""
    from locpath.bench.runner import ratios_and_targets
    from locpath.bench.throughput import ThroughputConfig, bench_throughput

    run_pass = _scripted_pass({"sequential": [1000.0, 1400.0], "overlapped": [1500.0, 2100.0]},
                              {"sequential": 0.2, "overlapped": 0.0}, prepare_s=1.0, slide_s=4.0)
    sec = bench_throughput(run_pass, tmp_path / "bundle", tmp_path / "tp", lambda m: None,
                           ThroughputConfig(slides=2, tiles=60, seed=8800))
    assert sec["sequential"]["slides_per_hour"] == 1200.0 and sec["overlapped"]["slides_per_hour"] == 1800.0
    assert sec["ratio"] == pytest.approx(1.5)
    seq_cpu, ovl_cpu = (sec[m]["cpu_seconds_per_slide"] * 2 for m in ("sequential", "overlapped"))
    assert seq_cpu == pytest.approx(0.2, abs=0.05) and ovl_cpu < 0.05  # the CPU the passes spent: spun vs slept
    assert sec["sequential"]["cores_busy"] > 2 * sec["overlapped"]["cores_busy"]
    split = sec["sequential_split"]
    assert split["prepare_s"] == pytest.approx(1.0) and split["answer_and_write_s"] == pytest.approx(3.0)
    assert split["overlap_bound"] == pytest.approx(4 / 3)  # 4 s a slide, hiding the 1 s part at best
    report = {"ratios": {}, "targets": {}, "skipped": {}, "slides_per_hour": sec}
    ratios_and_targets(report)
    assert report["ratios"]["slides_per_hour_overlapped_over_sequential"] == pytest.approx(1.5)
    target = report["targets"]["slides_per_hour_overlap_1.3x"]
    assert target["met"] is True and target["overlap_bound"] == pytest.approx(4 / 3)
    sec["ratio"] = 1.2
    ratios_and_targets(report)
    assert report["targets"]["slides_per_hour_overlap_1.3x"]["met"] is False
