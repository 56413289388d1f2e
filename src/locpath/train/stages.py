"""The training recipe of the reference model, stage by stage, on a 2-core CPU.

  tokenizer  byte-level BPE on the world's questions and answers
  encoder    tile encoder pretraining: soft tissue-class targets (from the label map) on tiles read from
             slide files
  features   the frozen encoder over every detected tissue tile of the training slides (once), through
             open_slide -> plan_tiles -> extract_features, exactly as `locpath eval` does
  llm        text-only pretraining of the LLM on the chat format (answers drawn uniformly: no slide)
  mae        resampler MAE pretraining: reconstruct masked STM tokens from the latents
  align      LLM frozen: resampler + TIS + CARA learn to write the slide report
  instruct   TIS + CARA + LLM (+ resampler) on question answering
and for the prefix baseline: align (projector only) and instruct (projector + LLM) on the same data.
Slide files are written and deleted one at a time; training slides come in balanced cycles with benign
twins of tumour slides (train/data.py).
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field

import numpy as np
import torch
from torch import nn

from ..config import ModelConfig, preset
from ..models.encoders import build_tile_encoder
from ..models.slide_llm import LocPathModel, PrefixModel, SlideFeatures
from ..synth.qa import ANSWERS, QUESTION_TYPES, REPORT_PROMPT, TEMPLATES, corpus, normalize_answer
from ..synth.textures import CLASS_NAMES
from ..synth.world import BACKGROUND, make_spec
from ..text import train_tokenizer
from ..wsi.extract import extract_features
from ..synth.seeds import split_seed
from .data import FileSlide, balanced_spec, file_slides, qa_pairs


@dataclass
class TrainConfig:
    preset: str = "tiny"
    seed: int = 0
    encoder_slides: int = 160
    encoder_normal_per_slide: int = 14
    encoder_epochs: int = 4
    train_slides: int = 600  # 100 cycles of balanced_spec (420 left a few small tumours unseen: 0.954-0.996 held out)
    val_slides: int = 36
    batch_slides: int = 16
    llm_steps: int = 300
    mae_steps: int = 300
    align_steps: int = 800  # benign twins leave only the sparse region to learn from: it takes longer
    instruct_steps: int = 2400
    prefix_align_steps: int = 300  # the baseline keeps its budget (a prefix step costs several reference steps)
    prefix_instruct_steps: int = 900
    lr: float = 1e-3
    llm_lr: float = 5e-4
    threads: int = 2
    slide_tiles: tuple[int, int] | None = None  # (columns, rows) of every slide; None: the world's 14..20 each way
    timings: dict = field(default_factory=dict)


class Log:
    def __init__(self, quiet: bool = False):
        self.t0 = time.time()
        self.quiet = quiet

    def __call__(self, msg: str):
        if not self.quiet:
            print(f"[{time.time() - self.t0:7.1f}s] {msg}", flush=True)


def _scheduler(opt, steps: int):
    """Linear warm-up over the first tenth, then cosine decay to 5 %."""
    warm = max(1, steps // 10)

    def factor(i: int) -> float:
        if i < warm:
            return (i + 1) / warm
        t = min(1.0, (i - warm) / max(1, steps - warm))
        return 0.05 + 0.95 * 0.5 * (1 + np.cos(np.pi * t))

    return torch.optim.lr_scheduler.LambdaLR(opt, factor)


def _soft_targets(class_frac: np.ndarray) -> np.ndarray:
    t = class_frac.copy()
    t[:, BACKGROUND] = 0
    return t / np.maximum(t.sum(1, keepdims=True), 1e-6)


def _encoder_pick(class_frac: np.ndarray, rng: np.random.Generator, n_normal: int) -> np.ndarray:
    """Every tile with tumour or necrosis (they are rare) and `n_normal` ordinary ones."""
    special = np.flatnonzero(1 - class_frac[:, BACKGROUND] - class_frac[:, 1:6].sum(1) > 0.05)
    normal = np.setdiff1d(np.arange(len(class_frac)), special)
    return np.concatenate([special, rng.choice(normal, min(len(normal), n_normal), replace=False)]).astype(np.int64)


def _encoder_tiles(tc: TrainConfig, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Tiles read from the encoder split's slide files (JPEG as at eval) and their soft class targets."""
    specs = (balanced_spec(tc.seed, "encoder", i, tc.slide_tiles) for i in range(tc.encoder_slides))
    tiles, targets = [], []
    for fs in file_slides(specs):
        frac = fs.class_frac()
        pick = _encoder_pick(frac, rng, tc.encoder_normal_per_slide)
        tiles.append(fs.read(pick))
        targets.append(_soft_targets(frac[pick]))
    return np.concatenate(tiles), np.concatenate(targets).astype(np.float32)


def stage_encoder(cfg: ModelConfig, tc: TrainConfig, log: Log) -> nn.Module:
    rng = np.random.default_rng([tc.seed, 11])
    x, y = _encoder_tiles(tc, rng)
    n_val = len(x) // 10
    log(f"encoder: {len(x)} tiles from {tc.encoder_slides} slides ({n_val} held out)")
    enc = build_tile_encoder(cfg.tile_encoder)
    head = nn.Linear(cfg.feature_dim, len(CLASS_NAMES))
    params = list(enc.parameters()) + list(head.parameters())
    opt = torch.optim.AdamW(params, lr=tc.lr, weight_decay=0.05)
    order = rng.permutation(len(x))
    val, trn = order[:n_val], order[n_val:]
    bs = 64
    steps = tc.encoder_epochs * (len(trn) // bs)
    sched = _scheduler(opt, steps)
    step = 0
    enc.train()
    for ep in range(tc.encoder_epochs):
        perm = rng.permutation(trn)
        for b in range(len(trn) // bs):
            idx = perm[b * bs : (b + 1) * bs]
            xb = torch.from_numpy(x[idx])
            # flips and 90-degree rotations: tissue has no orientation
            k = int(rng.integers(4))
            xb = torch.rot90(xb, k, dims=(1, 2))
            if rng.random() < 0.5:
                xb = xb.flip(2)
            logits = head(enc.forward_uint8(xb.contiguous()))
            loss = -(torch.from_numpy(y[idx]) * logits.log_softmax(-1)).sum(-1).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
            step += 1
            if step % 50 == 0:
                log(f"encoder: step {step}/{steps} loss {loss.item():.3f}")
    enc.eval()
    with torch.no_grad():
        pred = torch.cat([head(enc.forward_uint8(torch.from_numpy(x[val[i : i + 128]]))).argmax(-1)
                          for i in range(0, len(val), 128)]).numpy()
    acc = float((pred == y[val].argmax(1)).mean())
    tc.timings["encoder_tile_accuracy"] = acc
    log(f"encoder: held-out tile class accuracy {acc:.3f}")
    return enc


@torch.no_grad()
def encode_tiles(enc: nn.Module, tiles: np.ndarray, batch: int = 128) -> np.ndarray:
    return torch.cat([enc.forward_uint8(torch.from_numpy(tiles[i : i + batch])) for i in range(0, len(tiles), batch)]).numpy()


@dataclass
class Example:
    spec: object
    slide: SlideFeatures


def file_example(enc: nn.Module, fs: FileSlide) -> Example:
    """The slide's features as `locpath eval` computes them: detected grid, TileReader, encoder callable."""
    ff, _ = extract_features(fs.slide, lambda tiles: encode_tiles(enc, tiles), fs.plan, enc.cfg.name)
    return Example(fs.spec, SlideFeatures(ff.features, fs.grid))


def _split_spec(tc: TrainConfig, split: str, i: int):
    """Training slides cycle through every answer (with benign twins); validation slides are drawn like eval's."""
    if split == "train":
        return balanced_spec(tc.seed, split, i, tc.slide_tiles)
    return make_spec(split_seed(tc.seed, split, i), tc.slide_tiles)


def stage_features(enc: nn.Module, tc: TrainConfig, split: str, count: int, log: Log) -> list[Example]:
    out = []
    t0 = time.time()
    n_tiles = 0
    for i, fs in enumerate(file_slides(_split_spec(tc, split, i) for i in range(count))):
        out.append(file_example(enc, fs))
        n_tiles += len(fs.grid)
        if (i + 1) % 50 == 0:
            log(f"features[{split}]: {i + 1}/{count} slides, {n_tiles} tiles, {n_tiles / (time.time() - t0):.0f} tiles/s")
    return out


def _batches(rng, n, bs, steps):
    for _ in range(steps):
        yield rng.choice(n, bs, replace=False)


def stage_llm(model, tok, tc: TrainConfig, log: Log):
    """Text-only chat-format pretraining (the stand-in for a pretrained LLM); answers uniform, no slide."""
    rng = np.random.default_rng([tc.seed, 21])
    opt = torch.optim.AdamW(model.llm.parameters(), lr=tc.lr)
    reports = [c for c in corpus() if c.endswith(".") and ";" in c]
    for step in range(tc.llm_steps):
        qs, ans = [], []
        for _ in range(64):
            if rng.random() < 0.2:
                qs.append(REPORT_PROMPT)
                ans.append(reports[rng.integers(len(reports))])
            else:
                t = QUESTION_TYPES[rng.integers(len(QUESTION_TYPES))]
                qs.append(TEMPLATES[t][rng.integers(len(TEMPLATES[t]))])
                ans.append(ANSWERS[t][rng.integers(len(ANSWERS[t]))])
        seqs = [model.prompt_ids(tok, q) + model.answer_ids(tok, a) for q, a in zip(qs, ans)]
        labels = [[-100] * len(model.prompt_ids(tok, q)) + model.answer_ids(tok, a) for q, a in zip(qs, ans)]
        from ..models.slide_llm import left_pad, positions_from_mask

        ids, mask = left_pad(seqs, 0)
        lab = torch.full_like(ids, -100)
        for b, ls in enumerate(labels):
            lab[b, ids.shape[1] - len(ls):] = torch.tensor(ls)
        out = model.llm(input_ids=ids, attention_mask=mask, position_ids=positions_from_mask(mask))
        loss = model.lm_loss(out.logits, lab)
        opt.zero_grad()
        loss.backward()
        opt.step()
        if (step + 1) % 100 == 0:
            log(f"llm: step {step + 1}/{tc.llm_steps} loss {loss.item():.3f}")


def stage_mae(model: LocPathModel, data: list[Example], tc: TrainConfig, log: Log):
    rng = np.random.default_rng([tc.seed, 31])
    params = list(model.resampler.parameters()) + list(model.mae_head.parameters())
    opt = torch.optim.AdamW(params, lr=tc.lr)
    merged = [ex.slide.merged(model.cfg) for ex in data]
    ratio = model.cfg.resampler.mae_mask_ratio
    for step, idx in enumerate(_batches(rng, len(data), tc.batch_slides, tc.mae_steps)):
        vis, tgt_pos = [], []
        for i in idx:
            m = merged[i]
            perm = rng.permutation(len(m))
            n_mask = max(1, int(len(m) * ratio))
            mk, vs = perm[:n_mask], perm[n_mask:]
            vis.append((m.features[vs], m.positions[vs], m.counts[vs]))
            tgt_pos.append((m.positions[mk], m.features[mk]))
        from ..models.slide_llm import pad_tokens

        (f, p, c), vmask = pad_tokens(vis)
        lat = model.resampler(f, p, c, vmask)
        (tp, tf), tmask = pad_tokens(tgt_pos)
        pred = model.mae_head(lat, tp)
        tf = nn.functional.layer_norm(tf, tf.shape[-1:])
        loss = (((pred - tf) ** 2).mean(-1) * tmask).sum() / tmask.sum()
        opt.zero_grad()
        loss.backward()
        opt.step()
        if (step + 1) % 100 == 0:
            log(f"mae: step {step + 1}/{tc.mae_steps} loss {loss.item():.4f}")


def _qa_batch(rng, data, idx, with_report=True, report_only=False):
    qs, ans, rows = [], [], []
    for i in idx:
        pairs = qa_pairs(data[i].spec, rng, with_report=with_report)
        if report_only:
            pairs = [p for p in pairs if p[0] == "report"]
        for _t, q, a in pairs:
            qs.append(q)
            ans.append(a)
            rows.append(i)
    return qs, ans, rows


def _tuning(model, adapter_params: list, tc: TrainConfig, stage: str, steps: int):
    """Optimizer and schedule for align (adapter only, LLM frozen) or instruct (adapter + LLM)."""
    groups = [{"params": adapter_params, "lr": tc.lr}]
    for p in model.llm.parameters():
        p.requires_grad_(stage == "instruct")
    if stage == "instruct":
        groups.append({"params": list(model.llm.parameters()), "lr": tc.llm_lr})
    opt = torch.optim.AdamW(groups, weight_decay=0.01)
    return opt, _scheduler(opt, steps), [p for g in groups for p in g["params"]]


def _tuning_step(opt, sched, loss, params):
    opt.zero_grad()
    loss.backward()
    nn.utils.clip_grad_norm_(params, 1.0)
    opt.step()
    sched.step()


def stage_locpath_qa(model: LocPathModel, tok, data, tc: TrainConfig, log: Log, stage: str):
    rng = np.random.default_rng([tc.seed, 41 if stage == "align" else 51])
    merged = [ex.slide.merged(model.cfg) for ex in data]
    adapter = list(model.resampler.parameters()) + list(model.tis.parameters()) + list(model.cara.parameters())
    steps = tc.align_steps if stage == "align" else tc.instruct_steps
    opt, sched, params = _tuning(model, adapter, tc, stage, steps)
    for step, idx in enumerate(_batches(rng, len(data), tc.batch_slides, steps)):
        lat = model.slide_latents([merged[i] for i in idx])
        qs, ans, rows = _qa_batch(rng, data, idx, report_only=stage == "align")
        pos = {int(i): k for k, i in enumerate(idx)}
        lat_rows = lat[torch.tensor([pos[int(r)] for r in rows])]
        loss = model.forward_qa(tok, lat_rows, qs, ans)
        _tuning_step(opt, sched, loss, params)
        if (step + 1) % 100 == 0:
            log(f"{stage}: step {step + 1}/{steps} loss {loss.item():.4f}")
    for p in model.llm.parameters():
        p.requires_grad_(True)


def stage_prefix_qa(model: PrefixModel, tok, data, tc: TrainConfig, log: Log, stage: str):
    rng = np.random.default_rng([tc.seed, 61 if stage == "align" else 71])
    steps = tc.prefix_align_steps if stage == "align" else tc.prefix_instruct_steps
    opt, sched, params = _tuning(model, list(model.projector.parameters()), tc, stage, steps)
    for step, idx in enumerate(_batches(rng, len(data), tc.batch_slides, steps)):
        qs, ans, rows = _qa_batch(rng, data, idx, report_only=stage == "align")
        if stage == "instruct":
            # one question per slide per step: the prefix LLM pass is ~N tokens long, 5x the cost otherwise
            keep = [int(rng.integers(5)) + 5 * k for k in range(len(idx))]
            qs, ans, rows = [qs[k] for k in keep], [ans[k] for k in keep], [rows[k] for k in keep]
        vis = model.visual_tokens([data[i].slide for i in idx])
        pos = {int(i): k for k, i in enumerate(idx)}
        loss = model.forward_qa(tok, [vis[pos[int(r)]] for r in rows], qs, ans)
        _tuning_step(opt, sched, loss, params)
        if (step + 1) % 100 == 0:
            log(f"prefix-{stage}: step {step + 1}/{steps} loss {loss.item():.4f}")
    for p in model.llm.parameters():
        p.requires_grad_(True)


@torch.no_grad()
def answer_examples(model, tok, examples: list[Example], rng_seed: int = 0) -> dict:
    """Ask every question type about each example; accuracy overall and per type (precomputed features)."""
    from ..synth.qa import questions_for

    model.eval()
    per: dict[str, list[int]] = {t: [] for t in QUESTION_TYPES}
    for k in range(0, len(examples), 16):
        chunk = examples[k : k + 16]
        qs, gts, types, rows = [], [], [], []
        for j, ex in enumerate(chunk):
            for q in questions_for(ex.spec, np.random.default_rng([ex.spec.seed, rng_seed])):
                qs.append(q["question"])
                gts.append(q["answer"])
                types.append(q["type"])
                rows.append(j)
        if isinstance(model, LocPathModel):
            lat = model.slide_latents([ex.slide.merged(model.cfg) for ex in chunk])
            preds = model.answer(tok, lat[torch.tensor(rows)], qs)
        else:
            vis = model.visual_tokens([ex.slide for ex in chunk])
            preds = model.answer(tok, [vis[r] for r in rows], qs)
        for p, g, t in zip(preds, gts, types):
            per[t].append(int(normalize_answer(p) == normalize_answer(g)))
    model.train()
    allv = [v for vs in per.values() for v in vs]
    return {"accuracy": float(np.mean(allv)), "per_type": {t: float(np.mean(v)) for t, v in per.items()}}


def train_all(tc: TrainConfig, log: Log) -> dict:
    """Run every stage; returns {'reference': (model, tok), 'prefix': (model, tok), 'info': {...}}."""
    torch.manual_seed(tc.seed)
    torch.set_num_threads(tc.threads)
    t_start = time.time()

    def mark(name, t0):
        tc.timings[name + "_s"] = round(time.time() - t0, 1)

    t0 = time.time()
    cfg = preset(tc.preset, "cara")
    tok = train_tokenizer(corpus(), cfg.llm.vocab_size)
    if tok.get_vocab_size() > cfg.llm.vocab_size:
        raise RuntimeError("tokenizer larger than the LLM vocabulary")
    enc = stage_encoder(cfg, tc, log)
    mark("encoder", t0)
    t0 = time.time()
    train = stage_features(enc, tc, "train", tc.train_slides, log)
    val = stage_features(enc, tc, "eval", tc.val_slides, log)  # slide files too, drawn as `locpath eval` draws
    mark("features", t0)

    t0 = time.time()
    ref = LocPathModel(cfg)
    ref.tile_encoder.load_state_dict(enc.state_dict())
    stage_llm(ref, tok, tc, log)
    llm_state = {k: v.clone() for k, v in ref.llm.state_dict().items()}
    mark("llm", t0)
    t0 = time.time()
    stage_mae(ref, train, tc, log)
    stage_locpath_qa(ref, tok, train, tc, log, "align")
    stage_locpath_qa(ref, tok, train, tc, log, "instruct")
    mark("locpath", t0)
    ref_val = answer_examples(ref, tok, val)
    log(f"reference: validation on slide files {ref_val}")

    t0 = time.time()
    pcfg = preset(tc.preset, "prefix")
    pre = PrefixModel(pcfg)
    pre.tile_encoder.load_state_dict(enc.state_dict())
    pre.llm.load_state_dict(llm_state)
    stage_prefix_qa(pre, tok, train, tc, log, "align")
    stage_prefix_qa(pre, tok, train, tc, log, "instruct")
    mark("prefix", t0)
    pre_val = answer_examples(pre, tok, val)
    log(f"prefix: validation on slide files {pre_val}")
    tc.timings["total_s"] = round(time.time() - t_start, 1)
    info = {"train_config": asdict(tc), "validation": {"reference": ref_val, "prefix": pre_val}}
    ref.eval()
    pre.eval()
    return {"reference": (ref, tok), "prefix": (pre, tok), "info": info}
