"""`locpath bench --encoders-giant`: the four ViT-H/ViT-g tile encoders exported at full depth and validated.

UNI2-h (uni_v2), Virchow2, H-optimus-0 and Prov-GigaPath are 0.6-1.1 B parameters: 2.5-4.5 GB of fp32 weights, past
protobuf's 2 GB, so the tile encoder's graph keeps its weights in `tile_encoder.onnx.data` beside it. H-optimus-1
is H-optimus-0's architecture with other weights: hoptimus0's run covers it. Each encoder runs in a fresh child
process (bench/child.py), so its peak RSS is its own; inside it, one phase after another, each with its own peak
(VmHWM, reset between phases):

- build: the registered architecture at full depth with random drawn weights (`random_state_dict`: nothing is
  downloaded; the model and the drawn state dict are both resident for a moment, 2x the weights);
- export: the tile encoder through the project's exporter (`export_component`, what `locpath export` and `build`
  run), external data past 2 GB;
- reference: PyTorch fp32 features of the check tiles (real tissue tiles of the slide at the encoder's tile size and
  resolution, rendered synthetic tissue, and the exporter's own random uint8 tiles); the PyTorch model is then freed,
  so ONNX Runtime's copy of the weights is never resident beside it;
- ort: ONNX Runtime fp32 (2 threads) on the same tiles: max abs diff and per-tile cosine against PyTorch, then
  tiles/s at a fixed batch (median of timed runs after a warm-up).

A failing encoder (an exception, the child killed for memory, a timeout) is recorded with its error line and the
last phase its child reported (a heartbeat file in its work folder), and the others still run. Exported files are
deleted after each encoder unless `keep` (they are several GB).
"""

from __future__ import annotations

import gc
import json
import os
import shutil
import subprocess
import threading
import time
from pathlib import Path

import numpy as np

from ..errors import LocpathError
from .memory import _reset_peak, own_peak_rss_mb, status_kb

GIANT = ("uni_v2", "virchow2", "hoptimus0", "gigapath")
COVERED = {"hoptimus1": "hoptimus0"}  # the same architecture (ViT-g/14 DINOv2, 4 registers), other weights
ATOL = 1e-4  # the exporter's own validation tolerance (export/configs.py ExportConfig.atol)


def giant_names(text: str | None) -> list[str]:
    """The encoders a `--encoders-giant` value names ("all", or comma-separated names in any registered spelling;
    hoptimus1 runs as hoptimus0), in GIANT's order; LocpathError for anything else."""
    from ..encoders import canonical_encoder

    if text is None or text.strip().lower() in ("", "all"):
        return list(GIANT)
    picked = set()
    for raw in text.split(","):
        name = canonical_encoder(raw.strip()) if raw.strip() else None
        name = COVERED.get(name, name)
        if name not in GIANT:
            raise LocpathError(f"--encoders-giant: {raw.strip()!r} is not one of the giant encoders "
                               f"({', '.join(GIANT)}, or hoptimus1 which runs as hoptimus0)")
        picked.add(name)
    return [n for n in GIANT if n in picked]


class _Phases:
    """Each phase's own peak RSS (VmHWM reset at its start), and a heartbeat file with the phase and the peak so far,
    rewritten every half second: what the parent reads back when the child is killed."""

    def __init__(self, heartbeat: Path):
        self.heartbeat, self.phase, self.peaks, self.seconds = heartbeat, "start", {}, {}
        self._t0 = time.perf_counter()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._beat, daemon=True)
        self._thread.start()

    def peak_mb(self) -> float:
        return round(max([own_peak_rss_mb(), *self.peaks.values()]), 1)

    def _beat(self) -> None:
        while not self._stop.wait(0.5):
            try:
                self.write()
            except (OSError, RuntimeError):  # a full disk, or the phases changing under it: the next beat
                pass

    def write(self) -> None:
        tmp = self.heartbeat.with_suffix(".tmp")
        tmp.write_text(json.dumps({"phase": self.phase, "peak_rss_mb": self.peak_mb(),
                                   "rss_mb": round(status_kb("VmRSS") / 1024.0, 1),
                                   "phase_peaks_mb": dict(self.peaks)}))
        os.replace(tmp, self.heartbeat)

    def start(self, phase: str) -> None:
        if self.phase != "start":
            self.end()
        gc.collect()
        self.phase, self._t0 = phase, time.perf_counter()
        _reset_peak()

    def end(self) -> None:
        self.peaks[self.phase] = round(own_peak_rss_mb(), 1)
        self.seconds[self.phase] = round(time.perf_counter() - self._t0, 2)

    def close(self) -> None:
        self._stop.set()
        self._thread.join()
        self.write()


def _check_tiles(name: str, slide: str | None, real: int, synthetic: int, noise: int) -> tuple[np.ndarray, list]:
    """(tiles, kind of each): real tissue tiles of the slide, rendered synthetic tissue, random uint8."""
    from ..encoders import encoder_spec
    from .encoder_vitb import _tiles, slide_tiles

    px = encoder_spec(name).img_size
    parts = [slide_tiles(Path(slide), n=real, px=px)] if slide and real else []
    if synthetic:
        parts.append(_tiles(synthetic, px=px))
    if noise:  # what the exporter's validate_component feeds (random uint8 tiles)
        parts.append(np.random.default_rng(100).integers(0, 256, (noise, px, px, 3), dtype=np.uint8))
    kinds = ["real"] * (len(parts[0]) if slide and real else 0) + ["synthetic"] * synthetic + ["noise"] * noise
    return np.ascontiguousarray(np.concatenate(parts)), kinds


def _compare(got: np.ndarray, ref: np.ndarray, kinds: list) -> dict:
    from .report import row_cosines

    cos = row_cosines(got.astype(np.float64), ref.astype(np.float64))
    diff = np.abs(got - ref).max(axis=1)
    k = np.array(kinds)
    out = {"max_abs_diff": float(diff.max()), "max_abs_feature": float(np.abs(ref).max()),
           "cosine_min": float(cos.min()), "cosine_mean": float(cos.mean()), "within_exporter_atol": bool(
               diff.max() <= ATOL), "exporter_atol": ATOL, "tiles": {kind: int((k == kind).sum()) for kind in
                                                                      dict.fromkeys(kinds)}}
    for kind in dict.fromkeys(kinds):
        out[f"cosine_min_{kind}"] = float(cos[k == kind].min())
        out[f"max_abs_diff_{kind}"] = float(diff[k == kind].max())
    return out


def _build(name: str, depth: int | None):
    import torch

    from ..models.encoders import build_tile_encoder, encoder_config, random_state_dict

    torch.manual_seed(0)
    enc = build_tile_encoder(encoder_config(name, depth)).eval()
    enc.load_state_dict(random_state_dict(enc, 1))
    return enc


def _ort_phase(onnx_path: Path, tiles: np.ndarray, batch: int, repeats: int) -> tuple[np.ndarray, dict]:
    """ONNX Runtime fp32 on 2 threads: the check tiles' features, session load seconds, tiles/s at `batch`."""
    import onnxruntime as ort

    from .report import _median_time

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 2
    t0 = time.perf_counter()
    sess = ort.InferenceSession(str(onnx_path), opts, providers=["CPUExecutionProvider"])
    load_s, t0 = time.perf_counter() - t0, time.perf_counter()
    got = np.concatenate([sess.run(["features"], {"tiles": tiles[i:i + batch]})[0]
                          for i in range(0, len(tiles), batch)])
    check_s, t0, cpu0 = time.perf_counter() - t0, time.perf_counter(), time.process_time()
    xb = np.ascontiguousarray(tiles[:batch])
    sec = _median_time(lambda: sess.run(["features"], {"tiles": xb}), warmup=1, repeats=repeats)
    wall = time.perf_counter() - t0
    return got, {"session_load_s": round(load_s, 2), "check_tiles_s": round(check_s, 2), "timing_s": round(wall, 2),
                 "tiles_per_s": round(len(xb) / sec, 3), "batch": len(xb), "threads": 2, "timed_runs": repeats,
                 # CPU seconds per wall second while timed: 2.0 when both threads had a core to themselves
                 "cores_busy": round((time.process_time() - cpu0) / wall, 2)}


def _files(folder: Path, file: str, data_files: list) -> dict:
    onnx_path = folder / file
    return {"onnx": file, "onnx_bytes": onnx_path.stat().st_size, "data_files": list(data_files),
            "data_bytes": sum((folder / f).stat().st_size for f in data_files)}


def _measure(name: str, folder: Path, ph: _Phases, slide: str | None, depth: int | None, tiles: dict, batch: int,
             repeats: int, log) -> dict:
    import torch

    from ..encoders import encoder_spec
    from ..export.configs import tile_encoder_config
    from ..export.exporter import export_component

    torch.set_num_threads(2)
    spec = encoder_spec(name)
    ph.start("build")
    log(f"encoders-giant: {name}: building {spec.card.split(':')[0]} at depth {depth or spec.depth} (random weights)")
    enc = _build(name, depth)
    res = {"encoder": name, "card": spec.card, "depth": len(enc.blocks), "full_depth": len(enc.blocks) == spec.depth,
           "params": int(sum(p.numel() for p in enc.parameters())), "img_size": spec.img_size,
           "weights_bytes_fp32": int(sum(t.numel() * t.element_size() for t in enc.state_dict().values()))}
    ph.start("export")
    log(f"encoders-giant: {name}: exporting {res['params'] / 1e6:.0f} M parameters")
    ec = tile_encoder_config(enc)
    rep = export_component(ec, enc, folder)
    res["export_s"] = round(rep.seconds, 2)
    res["nodes"] = rep.nodes
    res.update(_files(folder, rep.file, rep.data_files))
    ph.start("reference")
    x, kinds = _check_tiles(name, slide, tiles.get("real", 4), tiles.get("synthetic", 2), tiles.get("noise", 2))
    log(f"encoders-giant: {name}: PyTorch fp32 on {len(x)} check tiles")
    t0, cpu0 = time.perf_counter(), time.process_time()
    with torch.no_grad():
        ref = np.concatenate([enc.forward_uint8(torch.from_numpy(x[i:i + batch])).numpy()
                              for i in range(0, len(x), batch)])
    res["pytorch_fp32_check_s"] = round(time.perf_counter() - t0, 2)
    res["pytorch_fp32_cores_busy"] = round((time.process_time() - cpu0) / (time.perf_counter() - t0), 2)
    del enc, ec  # ONNX Runtime's copy of the weights is never resident beside PyTorch's
    ph.start("ort")
    log(f"encoders-giant: {name}: ONNX Runtime fp32 (2 threads) on the check tiles, then timed at batch {batch}")
    got, res["ort_fp32"] = _ort_phase(folder / rep.file, x, batch, repeats)
    ph.end()
    res["out_dim"] = int(got.shape[1])
    if res["out_dim"] != spec.out_dim or got.shape[0] != len(x):
        raise LocpathError(f"{name}: ONNX Runtime gave {got.shape} features, expected ({len(x)}, {spec.out_dim})")
    res["validation"] = _compare(got, ref, kinds)
    res["validation_s"] = round(res["pytorch_fp32_check_s"] + res["ort_fp32"]["session_load_s"]
                                + res["ort_fp32"]["check_tiles_s"], 2)
    return res


def measure_encoder(name: str, work: str, slide: str | None = None, depth: int | None = None,
                    tiles: dict | None = None, batch: int = 4, repeats: int = 2, keep: bool = False,
                    log=print) -> dict:
    """One giant encoder, start to end (a bench/child.py step: run it in a fresh process). Failures come back as
    {"ok": False, "error", "phase"}; the exported files are deleted at the end unless `keep`."""
    folder = Path(work) / name
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    try:  # if memory runs out, the kernel should take this child, not the bench or a neighbour
        Path("/proc/self/oom_score_adj").write_text("1000")
    except OSError:
        pass
    ph = _Phases(folder.parent / f"{name}.heartbeat.json")
    t0 = time.perf_counter()
    try:
        res = _measure(name, folder, ph, slide, depth, tiles or {}, batch, repeats, log) | {"ok": True}
    except Exception as exc:
        ph.end()
        lines = str(exc).strip().splitlines()
        res = {"encoder": name, "ok": False, "phase": ph.phase,
               "error": f"{type(exc).__name__}: {lines[0][:400] if lines else ''}"}
        log(f"encoders-giant: {name}: failed in {ph.phase}: {res['error']}")
    finally:
        ph.close()
        if not keep:
            shutil.rmtree(folder, ignore_errors=True)
    res.update(seconds=round(time.perf_counter() - t0, 2), phase_seconds=ph.seconds, phase_peak_rss_mb=ph.peaks,
               peak_rss_mb=ph.peak_mb(), peak_rss_source="VmHWM of this child, per phase (reset between phases)",
               kept=str(folder) if keep else None)
    return res


def _failed(name: str, work: Path, error: str) -> dict:
    """The entry of an encoder whose child did not come back (killed, timed out): its last heartbeat."""
    beat = work / f"{name}.heartbeat.json"
    last = json.loads(beat.read_text()) if beat.exists() else {}
    return {"encoder": name, "ok": False, "error": error, "phase": last.get("phase"),
            "peak_rss_mb": last.get("peak_rss_mb"), "phase_peak_rss_mb": last.get("phase_peaks_mb", {}),
            "peak_rss_source": "the child's last heartbeat (every 0.5 s) before it ended"}


def bench_encoders_giant(work: Path, log, encoders: list | tuple = GIANT, slide: Path | None = None,
                         keep: bool = False, depth: dict | None = None, tiles: dict | None = None, batch: int = 4,
                         repeats: int = 2, timeout_s: float | None = None) -> dict:
    """Every named encoder in its own child, one after another; see the module docstring. `depth` maps a name to a
    smaller depth (tests); `tiles` the check tiles per kind (real, synthetic, noise)."""
    from .child import run_step

    work = Path(work)
    work.mkdir(parents=True, exist_ok=True)
    out = {"method": "each encoder in a fresh child process: build (random drawn weights), export_component "
                     "(external data past 2 GB), PyTorch fp32 reference, then ONNX Runtime fp32 on 2 threads; "
                     "peak RSS is the child's VmHWM, per phase and overall",
           "slide": str(slide) if slide else None, "covered_by_architecture": dict(COVERED), "encoders": {}}
    for name in encoders:
        log(f"encoders-giant: {name} in a child process")
        kw = {"name": name, "work": str(work), "slide": str(slide) if slide else None,
              "depth": (depth or {}).get(name), "tiles": tiles, "batch": batch, "repeats": repeats, "keep": keep}
        try:
            res = run_step("locpath.bench.encoders_giant:measure_encoder", kw, timeout_s=timeout_s)
            res.pop("process", None)  # VmHWM of its last phase only (reset per phase): peak_rss_mb is the max
        except subprocess.TimeoutExpired:
            res = _failed(name, work, f"timed out after {timeout_s:g} s (child killed)")
        except LocpathError as exc:  # the child died (a signal: 'exit -9' is the kernel's OOM killer)
            res = _failed(name, work, str(exc).splitlines()[0])
        finally:
            if not keep:
                shutil.rmtree(work / name, ignore_errors=True)
        (work / f"{name}.heartbeat.json").unlink(missing_ok=True)
        res["loadavg_1min_after"] = round(os.getloadavg()[0], 2)  # work beside it (2 cores here)
        out["encoders"][name] = res
    out["failed"] = [n for n, r in out["encoders"].items() if not r.get("ok")]
    return out
