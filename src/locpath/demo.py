"""`locpath demo`: the README's main job, end to end on the shipped reference model.

It runs the prebuilt reference bundle shipped inside the package (so a runtime-only install, without torch,
runs it), writes three synthetic slides, asks every question type about each with the torch-free runtime, and
prints each streamed answer beside the ground truth with a timing report. Later runs reuse the slides and the
slide cache, so answers start within seconds. Where the shipped bundle is missing (a source checkout that
removed it), the shipped checkpoint is exported once into the work folder (needs the training extra).
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from . import __version__
from .bundle.integrity import verify_bundle
from .bundle.manifest import BundleError
from .bundle.paths import sha256_file
from .checkpoints import shipped_bundle, shipped_checkpoint
from .errors import LocpathError
from .synth.qa import normalize_answer

DEMO_SLIDES = (
    ("adenocarcinoma", "high grade", "colon", True),
    ("squamous cell carcinoma", "low grade", "lung", False),
    ("benign", None, "kidney", True),
)


def _workdir(arg: str | None) -> Path:
    from .runtime.slide_cache import cache_root

    return Path(arg) if arg else cache_root() / "demo"


def default_bundle(work: Path) -> Path:
    """The shipped prebuilt bundle when it is intact, else an export of the shipped checkpoint into `work`."""
    return _default_bundle(work)[0]


def _default_bundle(work: Path) -> tuple[Path, bool]:
    """(the bundle, whether this call exported it: the one step of the demo that needs torch)."""
    try:
        verify_bundle(shipped_bundle())
        return shipped_bundle(), False
    except BundleError as exc:
        print(f"bundle: the shipped bundle cannot be used ({exc}); using an export of the shipped checkpoint instead")
    bundle = work / "reference-bundle"
    weights = shipped_checkpoint("reference") / "model.safetensors"
    if not weights.exists():
        raise LocpathError(f"{weights}: the shipped reference checkpoint is missing from this install")
    try:
        m = verify_bundle(bundle)
        if m.source.get("weights_sha256") == sha256_file(weights) and m.locpath_version == __version__:
            print(f"bundle: {bundle} (cached)")
            return bundle, False
    except BundleError:
        pass
    try:
        from .export.bundle import export_bundle
    except ImportError as exc:
        raise LocpathError(f"exporting the model needs torch (pip install 'locpath[train]'): {exc}") from exc
    print(f"bundle: exporting the shipped reference model to {bundle} ...", flush=True)
    export_bundle(shipped_checkpoint("reference"), bundle, overwrite=True, log=lambda m: print("  " + m, flush=True))
    return bundle, True


def _ensure_slides(work: Path) -> list[Path]:
    from .synth import make_spec, write_slide
    from .synth.writer import truth_path

    paths = []
    for i, (diag, grade, organ, nec) in enumerate(DEMO_SLIDES):
        p = work / f"demo_slide_{i}.svs"
        if not (p.exists() and truth_path(p).exists()):
            print(f"slide: writing {p} ...", flush=True)
            spec = make_spec(90210 + i, diagnosis=diag, grade=grade, organ=organ, necrosis=nec)
            write_slide(spec, p)
        paths.append(p)
    return paths


def run_demo(workdir: str | None, bundle: str | None, options) -> int:
    """`options` (RuntimeOptions) as the command's runtime flags gave them; the slide cache defaults to the work
    folder's."""
    from .runtime.pipeline import Pipeline
    from .synth.writer import truth_path

    t0 = time.perf_counter()
    work = _workdir(workdir)
    work.mkdir(parents=True, exist_ok=True)
    bundle, exported = (Path(bundle), False) if bundle else _default_bundle(work)
    slides = _ensure_slides(work)
    pipe = Pipeline.from_bundle(bundle, options.replace(cache_dir=options.cache_dir or str(work / "slide-cache")))
    print(f"bundle: {bundle}")
    torch = "torch used once, to export the bundle; the runtime runs without it" if exported else "torch not used"
    print(f"runtime ready after {time.perf_counter() - t0:.1f} s ({torch})\n")
    correct = total = 0
    first_ttft = []
    for path in slides:
        truth = json.loads(truth_path(path).read_text())
        print(f"== {path.name}: {truth['organ']}, {truth['diagnosis']}, {truth['grade']}, necrosis {truth['necrosis']}")
        ctx = None
        for k, q in enumerate(truth["questions"]):
            print(f"Q: {q['question']}\nA: ", end="", flush=True)
            if ctx is None:  # the first question pays for the slide (or reads it from the cache)
                a = pipe.ask(path, q["question"], on_piece=lambda _, piece: print(piece, end="", flush=True))
                ctx = pipe.prepare(path)  # from memory now
            else:
                stream = pipe.stream(ctx, q["question"])
                for piece in stream:
                    print(piece, end="", flush=True)
                a = stream.result
            ok = normalize_answer(a.answer) == normalize_answer(q["answer"])
            correct += ok
            total += 1
            print(f"   [truth: {q['answer']}] {'OK' if ok else 'WRONG'}")
            t = a.timings_ms
            if k == 0:
                first_ttft.append(t["time_to_first_token"])
                how = "from cache, no tile read" if a.slide["cache_hit"] else f"{a.slide['tiles_read']} tiles read and encoded"
                print(f"   first question: time to first token {t['time_to_first_token']:.0f} ms ({how}; "
                      f"{a.slide['tiles']} tiles -> {a.slide['tokens_after_stm']} STM tokens)")
            elif k == 1:
                print(f"   next question: time to first token {t['time_to_first_token']:.0f} ms "
                      f"(TIS {t['tis']:.1f}, cross-KV {t['cross_kv']:.1f}, prefill {t['prefill']:.1f}, "
                      f"decode {t['decode_per_token']:.1f} ms/token)")
        print()
    print(f"accuracy {correct}/{total}; peak RSS {a.peak_rss_mb:.0f} MB; total {time.perf_counter() - t0:.1f} s")
    print(f"work folder: {work}")
    return 0
