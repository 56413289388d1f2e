"""`locpath eval`: held-out synthetic slides, written as real slide files, answered by a PyTorch checkpoint.

Each slide goes the whole way: SVS (or TIFF) file -> OpenSlide -> tissue -> tiles -> tile encoder ->
STM/resampler (or prefix) -> answers, one question per type, scored by exact match.
"""

from __future__ import annotations

import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .synth.qa import QUESTION_TYPES, normalize_answer, questions_for
from .synth.world import make_spec
from .synth.writer import write_slide
from .synth.seeds import split_seed
from .wsi import open_slide
from .wsi.extract import extract_features, plan_tiles


@dataclass
class EvalResult:
    accuracy: float
    per_type: dict
    count: int
    seed: int
    checkpoint: str
    seconds: float
    records: list = field(default_factory=list)

    def to_dict(self, with_records: bool = False) -> dict:
        d = {"accuracy": self.accuracy, "per_type": self.per_type, "count": self.count, "seed": self.seed,
             "checkpoint": self.checkpoint, "seconds": round(self.seconds, 1)}
        if with_records:
            d["records"] = self.records
        return d


def _record(path: Path, q: dict, answer: str, token_ids: list[int]) -> dict:
    return {"slide": path.name, "type": q["type"], "question": q["question"], "answer": answer, "truth": q["answer"],
            "correct": normalize_answer(answer) == normalize_answer(q["answer"]), "token_ids": list(token_ids)}


def _progress(records: list[dict], k: int, count: int) -> None:
    acc = sum(r["correct"] for r in records) / max(len(records), 1)
    print(f"eval: {k + 1}/{count} slides, running accuracy {acc:.3f}", flush=True)


def _result(records: list[dict], count: int, seed: int, source, t0: float) -> EvalResult:
    per = {t: [r["correct"] for r in records if r["type"] == t] for t in QUESTION_TYPES}
    return EvalResult(
        accuracy=float(np.mean([r["correct"] for r in records])) if records else 0.0,
        per_type={t: float(np.mean(v)) if v else 0.0 for t, v in per.items()},
        count=count, seed=seed, checkpoint=str(source), seconds=time.time() - t0, records=records,
    )


def eval_slides(seed: int, count: int, workdir: Path, fmt_cycle=("svs", "tiff")):
    """Yield (spec, slide_path, questions) for `count` held-out slides, written into workdir."""
    for i in range(count):
        spec = make_spec(split_seed(seed, "eval", i))
        fmt = fmt_cycle[i % len(fmt_cycle)]
        path = write_slide(spec, workdir / f"eval_{seed}_{i:04d}.{fmt}", fmt=fmt)
        yield spec, path, questions_for(spec)


def evaluate_checkpoint(checkpoint: str | Path, seed: int, count: int, keep_dir: str | Path | None = None,
                        progress: bool = False) -> EvalResult:
    import torch

    from .models.checkpoint import load_checkpoint
    from .models.slide_llm import LocPathModel, SlideFeatures

    torch.set_num_threads(2)
    model, tok = load_checkpoint(checkpoint)
    t0 = time.time()
    records = []
    with tempfile.TemporaryDirectory(prefix="locpath-eval-") as tmp:
        work = Path(keep_dir) if keep_dir else Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        for k, (spec, path, qs) in enumerate(eval_slides(seed, count, work)):
            with open_slide(path) as slide:
                plan = plan_tiles(slide)

                def encode(tiles: np.ndarray) -> np.ndarray:
                    with torch.no_grad():
                        return model.tile_encoder.forward_uint8(torch.from_numpy(tiles)).numpy()

                ff, _ = extract_features(slide, encode, plan, model.cfg.tile_encoder.name)
            sf = SlideFeatures(ff.features, plan.grid.grid_index)
            questions = [q["question"] for q in qs]
            with torch.no_grad():
                if isinstance(model, LocPathModel):
                    lat = model.slide_latents([sf.merged(model.cfg)])
                    pred_ids = model.answer_tokens(tok, lat.expand(len(questions), -1, -1), questions)
                else:
                    vis = model.visual_tokens([sf])
                    pred_ids = model.answer_tokens(tok, vis * len(questions), questions)
            preds = [tok.decode(ids) for ids in pred_ids]
            for q, p, ids in zip(qs, preds, pred_ids):
                records.append(_record(path, q, p, ids))
            if progress:
                _progress(records, k, count)
    return _result(records, count, seed, checkpoint, t0)


def evaluate_bundle(bundle: str | Path, seed: int, count: int, keep_dir: str | Path | None = None,
                    progress: bool = False, device: str = "cpu", decoder: str = "auto",
                    trusted_keys=None, options=None) -> EvalResult:
    """The same held-out slides and questions as `evaluate_checkpoint`, answered by the torch-free runtime
    (`options`, a RuntimeOptions, replaces device, decoder and trusted_keys: `locpath eval --bundle`)."""
    from .runtime.options import RuntimeOptions
    from .runtime.pipeline import Pipeline

    t0 = time.time()
    records = []
    options = options or RuntimeOptions(device=device, decoder=decoder, trusted_keys=trusted_keys, use_cache=False)
    pipe = Pipeline.from_bundle(bundle, options)
    with tempfile.TemporaryDirectory(prefix="locpath-eval-") as tmp:
        work = Path(keep_dir) if keep_dir else Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        for k, (spec, path, qs) in enumerate(eval_slides(seed, count, work)):
            answers = pipe.ask(path, [q["question"] for q in qs])
            for q, a in zip(qs, answers):
                records.append(_record(path, q, a.answer, a.token_ids))
            if progress:
                _progress(records, k, count)
    pipe.release()
    return _result(records, count, seed, bundle, t0)
