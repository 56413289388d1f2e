"""Golden answers: the token ids the shipped bundle gives on a few real inputs, recorded once (with the code before a
decoding refactor) so that any later change to the runtime's decoding can be checked token for token.

    python scripts/golden_answers.py            # (re)write tests/data/golden_answers.json
    python scripts/golden_answers.py --check    # recompute and compare (exit 1 on any difference)

Inputs: tests/data/cmu_small_region.svs and two synthetic slides (fixed seeds); one question per eval question type
(locpath/synth/qa.py) plus the report prompt; both decoder graphs; greedy and seeded sampling; one question at a time
(`ask`, batch 1) and batched (several questions, decode_batch 1 and 4). tests/test_golden.py runs `compute`.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
GOLDEN = ROOT / "tests" / "data" / "golden_answers.json"
REAL_SVS = ROOT / "tests" / "data" / "cmu_small_region.svs"
SYNTH = {"synth101": dict(seed=101, tiles=(10, 9), diagnosis="adenocarcinoma", grade="high grade", necrosis=True,
                          organ="lung"),
         "synth4242": dict(seed=4242, tiles=(8, 7), diagnosis="squamous cell carcinoma", grade="high grade",
                           organ="colon", necrosis=True)}
SAMPLING = {"greedy": {}, "short": dict(max_new_tokens=3),
            "sampled": dict(do_sample=True, seed=1234, temperature=3.0, top_k=200, top_p=0.97, repetition_penalty=1.3),
            "hot": dict(do_sample=True, seed=7, temperature=8.0, max_new_tokens=12)}
DECODERS = ("fused", "plain")
MODES = ("ask", "batch1", "batch4")  # one question at a time; all questions decoded as one batch of 1 / 4 rows


def questions() -> list[str]:
    from locpath.synth.qa import REPORT_PROMPT, TEMPLATES

    return [phrasings[0] for phrasings in TEMPLATES.values()] + [REPORT_PROMPT]


def write_slides(folder: Path) -> dict[str, Path]:
    """The input slides by name (the synthetic ones written into `folder`)."""
    from locpath.synth import make_spec, write_slide

    slides = {"cmu_small_region": REAL_SVS}
    for name, kw in SYNTH.items():
        kw = dict(kw)
        slides[name] = write_slide(make_spec(kw.pop("seed"), **kw), folder / f"{name}.svs", fmt="svs")
    return slides


def answers(pipe, slide: Path, mode: str, sampling: dict) -> list[list[int]]:
    """Token ids of every question about `slide` through the pipeline's public API."""
    qs = questions()
    if mode == "ask":
        return [pipe.ask(slide, q, **sampling).token_ids for q in qs]
    return [a.token_ids for a in pipe.ask(slide, qs, **sampling)]


def compute(slides: dict[str, Path], cache_dir: Path) -> dict:
    """{slide: {decoder: {sampling: {mode: [token ids per question]}}}} (slides prepared once, through the cache)."""
    from locpath.checkpoints import shipped_bundle
    from locpath.runtime.options import RuntimeOptions
    from locpath.runtime.pipeline import Pipeline

    out: dict = {}
    for decoder in DECODERS:
        for mode in MODES:
            opts = RuntimeOptions(decoder=decoder, decode_batch=4 if mode == "batch4" else 1,
                                  cache_dir=str(cache_dir))
            pipe = Pipeline.from_bundle(shipped_bundle(), opts)
            for name, slide in slides.items():
                for label, sampling in SAMPLING.items():
                    out.setdefault(name, {}).setdefault(decoder, {}).setdefault(label, {})[mode] = \
                        answers(pipe, slide, mode, sampling)
            pipe.release()
    return out


def differences(want: dict, got: dict) -> list[str]:
    bad = []
    for name, per_dec in want.items():
        for decoder, per_s in per_dec.items():
            for label, per_mode in per_s.items():
                for mode, ids in per_mode.items():
                    other = got.get(name, {}).get(decoder, {}).get(label, {}).get(mode)
                    if other != ids:
                        bad.append(f"{name} {decoder} {label} {mode}: want {ids}, got {other}")
    return bad


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--check", action="store_true", help="recompute and compare with tests/data/golden_answers.json")
    args = ap.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        got = compute(write_slides(Path(tmp)), Path(tmp) / "cache")
    if args.check:
        bad = differences(json.loads(GOLDEN.read_text())["answers"], got)
        print("\n".join(bad) or "golden answers: identical")
        return 1 if bad else 0
    GOLDEN.write_text(json.dumps({"questions": questions(), "sampling": SAMPLING, "answers": got}) + "\n")
    print(f"wrote {GOLDEN}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
