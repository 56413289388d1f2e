"""The `locpath` command. User errors print one line and exit 2; nothing half-written is left behind."""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import math
import os
import re
import sys
from pathlib import Path

from .errors import LocpathError


class _Parser(argparse.ArgumentParser):
    """Usage errors as one line (the rule for every bad input), pointing at --help."""

    def error(self, message: str):
        self.exit(2, f"locpath: error: {self.prog}: {message} (see {self.prog} --help)\n")


def _positive_float(text: str) -> float:
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not (math.isfinite(v) and v > 0):
        raise argparse.ArgumentTypeError(f"must be a positive finite number: {text!r}")
    return v


def _byte_size(text: str) -> int:
    """A positive size in bytes: `123`, or with a suffix K, M, G, T (powers of 1024), e.g. `64G`."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?)i?B?\s*", text, re.IGNORECASE)
    if not m:
        raise argparse.ArgumentTypeError(f"not a size in bytes (e.g. 500M, 64G): {text!r}")
    v = int(float(m.group(1)) * 1024 ** " KMGT".index(m.group(2).upper() or " "))
    if v < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1 byte: {text!r}")
    return v


def _jpeg_quality(text: str) -> int:
    v = _non_negative_int(text)
    if not 1 <= v <= 100:
        raise argparse.ArgumentTypeError(f"must be 1-100: {text!r}")
    return v


def _non_negative_int(text: str) -> int:
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
    if v < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0: {text!r}")
    return v


def _positive_int(text: str) -> int:
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
    if v < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1: {text!r}")
    return v


# -- tiles --------------------------------------------------------------------------
def cmd_tiles(args) -> int:
    from .wsi import GridConfig, TissueConfig, open_slide
    from .wsi.extract import plan_tiles
    from .wsi.overlay import write_overlay

    grid_cfg = GridConfig(target_mpp=args.target_mpp, tile_size=args.tile_size, min_tissue=args.min_tissue)
    read_stats = None
    with open_slide(args.slide, mpp_override=args.mpp_override, backend=args.backend) as slide:
        plan = plan_tiles(slide, grid_cfg, TissueConfig(mask_mpp=args.mask_mpp))
        info = slide.info().to_dict()
        if args.overlay:
            write_overlay(slide, plan, args.overlay)
        if args.read:
            read_stats = _read_all(slide, plan.grid, args)
    g = plan.grid
    report = {
        "slide": info,
        "tissue_fraction": round(plan.tissue.tissue_fraction, 4),
        "tissue_threshold": plan.tissue.threshold,
        "mask_shape": list(plan.tissue.mask.shape),
        "tiles": len(g),
        "grid": {"columns": g.grid_shape[0], "rows": g.grid_shape[1], "tile_size": g.tile_size,
                 "target_mpp": g.target_mpp, "tile_size_level0": g.size_level0, "read_level": g.read_level,
                 "read_size": g.read_size, "min_tissue": grid_cfg.min_tissue},
        "overlay": str(args.overlay) if args.overlay else None,
        "read": read_stats,
    }
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        print(f"{args.slide}: {info['dimensions'][0]}x{info['dimensions'][1]} px, {info['level_dimensions'].__len__()} "
              f"levels, {info['mpp']:g} um/px ({info['mpp_source']}), vendor {info['vendor']}, backend {info['backend']}")
        print(f"tissue: {report['tissue_fraction']:.1%} of the slide (saturation threshold {plan.tissue.threshold})")
        print(f"tiles: {len(g)} of {g.grid_shape[0] * g.grid_shape[1]} grid positions hold >= "
              f"{grid_cfg.min_tissue:.0%} tissue ({g.tile_size} px at {g.target_mpp:g} um/px = {g.size_level0} px "
              f"at level 0, read from level {g.read_level})")
        if args.overlay:
            print(f"overlay: {args.overlay}")
        if read_stats:
            print(f"read: {read_stats['tiles']} tiles in {read_stats['seconds']:.2f} s = {read_stats['tiles_per_s']:.0f} "
                  f"tiles/s ({read_stats['workers']} threads); peak RSS {read_stats['peak_rss_before_read_mb']:.0f} MB before "
                  f"reading, {read_stats['peak_rss_mb']:.0f} MB after")
    return 0


def _read_all(slide, grid, args) -> dict:
    """Stream every tile (what the encoder would get) and time it: the reader's own throughput."""
    import resource
    import time

    from .wsi import TileReader

    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    t0 = time.perf_counter()
    reader = TileReader(slide, grid, batch_size=args.batch_size, workers=args.workers, progress=None)
    n = sum(len(b.tiles) for b in reader)
    dt = time.perf_counter() - t0
    if reader.unreadable:
        from .errors import warn

        warn(f"{slide.path}: {reader.unreadable} of {len(grid)} tiles unreadable (corrupt data); they were skipped")
    return {"tiles": n, "seconds": round(dt, 3), "tiles_per_s": round(n / dt, 1) if dt else None,
            "workers": args.workers, "batch_size": args.batch_size, "peak_rss_before_read_mb": round(before, 1),
            "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)}


# -- synth --------------------------------------------------------------------------
def cmd_encoders(args) -> int:
    """The registered tile encoders: what `import --encoder` and feature files may name."""
    from dataclasses import asdict

    from .encoders import ENCODERS

    if args.json:
        print(json.dumps([{k: v for k, v in asdict(e).items() if k not in ("timm_kwargs", "unused_keys")}
                          | {"timm_kwargs": e.timm_kwargs} for e in ENCODERS.values()], indent=1))
        return 0
    print(f"{'name':<10} {'width':>5} {'tile':>4} {'um/px':>5}  {'timm model':<30} aliases")
    for e in ENCODERS.values():
        print(f"{e.name:<10} {e.out_dim:>5} {e.img_size:>4} {e.target_mpp:>5}  {e.timm_model:<30} {', '.join(e.aliases)}")
    return 0


def cmd_synth(args) -> int:
    from .synth import make_spec, write_slide
    from .synth.seeds import split_seed

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    for i in range(args.count):
        seed = split_seed(args.seed, "eval", i) if args.held_out else args.seed + i
        tiles = (args.tiles[0], args.tiles[1]) if args.tiles else None
        spec = make_spec(seed, tiles=tiles, mpp=args.mpp, organ=args.organ, diagnosis=args.diagnosis,
                         grade=args.grade, necrosis=None if args.necrosis is None else args.necrosis == "yes")
        path = write_slide(spec, out / f"synthetic_{seed}.{args.format}", fmt=args.format, quality=args.quality)
        gt = spec.ground_truth()
        print(f"{path}: {gt['organ']}, {gt['diagnosis']}, {gt['grade']}, necrosis {gt['necrosis']} "
              f"({gt['dimensions'][0]}x{gt['dimensions'][1]} px, {gt['tissue_tiles']} tissue tiles, "
              f"diagnostic {gt['diagnostic_fraction']:.1%})")
    return 0


# -- train --------------------------------------------------------------------------
def cmd_train(args) -> int:
    from .train.run import run_training

    run_training(args)
    return 0


# -- eval ---------------------------------------------------------------------------
def cmd_eval(args) -> int:
    from .checkpoints import shipped_checkpoint

    if args.bundle and args.checkpoint:
        raise LocpathError("give either --checkpoint or --bundle, not both")
    if args.bundle:
        from .eval import evaluate_bundle

        ckpt = Path(args.bundle)
        res = evaluate_bundle(ckpt, args.seed, args.count, keep_dir=args.keep_slides, progress=not args.json,
                              device=args.device, trusted_keys=args.trusted_keys)
    else:
        from .eval import evaluate_checkpoint

        ckpt = Path(args.checkpoint) if args.checkpoint else shipped_checkpoint("reference")
        res = evaluate_checkpoint(ckpt, args.seed, args.count, keep_dir=args.keep_slides, progress=not args.json)
    if args.json:
        print(json.dumps(res.to_dict(with_records=args.records)))
    else:
        print(f"checkpoint {ckpt}: {res.count} held-out slides (seed {res.seed}), {res.seconds:.0f} s")
        print(f"accuracy {res.accuracy:.3f}")
        for t, a in res.per_type.items():
            print(f"  {t:10s} {a:.3f}")
    return 0


# -- export -------------------------------------------------------------------------
def cmd_export(args) -> int:
    from .checkpoints import shipped_checkpoint

    try:
        from .export.bundle import export_bundle
    except ImportError as exc:
        raise LocpathError(f"export needs the training extra (pip install 'locpath[train]'): {exc}") from exc
    ckpt = Path(args.checkpoint) if args.checkpoint else shipped_checkpoint("reference")
    log = (lambda m: None) if args.json else print
    stream = args.stream_decoder
    if stream == "auto":
        from .export.streamed import STREAM_ABOVE_PARAMS, llm_parameters
        from .models.checkpoint import read_config

        stream = "int4" if llm_parameters(read_config(ckpt).llm) > STREAM_ABOVE_PARAMS else "off"
    if stream != "off":
        from .export.streamed import export_checkpoint_streamed

        _, summary = export_checkpoint_streamed(ckpt, args.out, quant=stream, validate=not args.no_validate,
                                                overwrite=args.overwrite, log=log)
    else:
        _, summary = export_bundle(ckpt, args.out, validate=not args.no_validate, overwrite=args.overwrite, log=log)
    if args.json:
        print(json.dumps(summary))
    return 0


# -- inspect / import ---------------------------------------------------------------
def cmd_inspect(args) -> int:
    from .export.inventory import format_inventory, inventory, open_source

    src = open_source(args.checkpoint)
    inv = inventory(src, depth=args.depth)
    src.close()
    print(json.dumps(inv, indent=2) if args.json else format_inventory(inv))
    return 0


def _json_arg(text: str | None, option: str):
    """--config: inline JSON (starting with '{') or a JSON file."""
    if text is None:
        return None
    raw = text
    if not text.lstrip().startswith("{"):
        from .bundle.paths import read_bounded

        try:  # a regular file of at most 1 MiB: never a FIFO or device read for ever
            raw = read_bounded(Path(text), 1 << 20, f"{option} file").decode("utf-8")
        except UnicodeDecodeError as exc:
            raise LocpathError(f"{option} {text}: not UTF-8 text ({exc.reason} at byte {exc.start})") from None
    try:
        value = json.loads(raw)
    except (ValueError, RecursionError) as exc:
        shown = text[:80] if raw is text else text  # inline JSON cut short; a file named in full
        raise LocpathError(f"{option} {shown}: not valid JSON ({str(exc)[:200] or 'nested too deeply'})") from None
    if not isinstance(value, dict):
        raise LocpathError(f"{option}: a JSON object of ModelConfig fields, e.g. '{{\"resampler\": {{\"depth\": 1}}}}'")
    return value


def _layer_list(text: str) -> tuple[int, ...]:
    try:
        layers = tuple(int(x) for x in text.split(",") if x.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a comma-separated list of layer indices: {text!r}") from None
    if not layers or len(set(layers)) != len(layers) or min(layers) < 0:
        raise argparse.ArgumentTypeError(f"distinct non-negative layer indices, e.g. 3,10,17,24: {text!r}")
    return tuple(sorted(layers))


def cmd_import(args) -> int:
    try:
        from .export.importer import ImportOptions, import_checkpoint, release_dir
    except ImportError as exc:
        raise LocpathError(f"import needs the training extra (pip install 'locpath[train]'): {exc}") from exc
    if args.release and (args.mae or args.stage1 or args.stage2):
        raise LocpathError("give either --release DIR or --mae/--stage1/--stage2 files, not both")
    release = release_dir(args.release) if args.release else \
        {k: Path(v) for k, v in (("mae", args.mae), ("stage1", args.stage1), ("stage2", args.stage2)) if v}
    if args.encoder_weights and not args.encoder:
        raise LocpathError("--encoder-weights needs --encoder NAME (which registered tile encoder they are)")
    opts = ImportOptions(
        llm=Path(args.llm), out=Path(args.out), lora=Path(args.lora) if args.lora else None,
        lora_alpha=args.lora_alpha, release=release, key_map=Path(args.key_map) if args.key_map else None,
        encoder=args.encoder, encoder_weights=Path(args.encoder_weights) if args.encoder_weights else None,
        config=_json_arg(args.config, "--config"), cara_layers=args.cara_layers, dtype=args.dtype,
        chat_template=Path(args.chat_template) if args.chat_template else None, allow_missing=args.allow_missing,
        overwrite=args.overwrite, stream=args.stream)
    summary = import_checkpoint(opts, log=(lambda m: None) if args.json else print)
    if args.json:
        print(json.dumps(summary))
    return 0


# -- ask / chat ---------------------------------------------------------------------
def _pipeline(args):
    from .runtime.pipeline import Pipeline

    return Pipeline.from_bundle(args.bundle, trusted_keys=args.trusted_keys, device=args.device, threads=args.threads,
                                cache_dir=args.cache_dir, use_cache=not args.no_cache, decoder=args.decoder,
                                max_batch=args.decode_batch)


def _sampling(args) -> dict:
    return dict(max_new_tokens=args.max_new_tokens, do_sample=args.sample or None, temperature=args.temperature,
                top_k=args.top_k, top_p=args.top_p, repetition_penalty=args.repetition_penalty, seed=args.seed)


def _timing_lines(ans) -> list[str]:
    t = ans.timings_ms
    order = ["hash", "cache_read", "open", "tissue_grid", "tiles_encode", "tile_read_wait", "encode", "stm",
             "resampler", "tis", "cross_kv", "prefill", "decode_per_token", "time_to_first_token", "total"]
    cells = [f"{k} {t[k]:.1f}" for k in order if k in t]
    s = ans.slide
    return [f"  timings (ms): {', '.join(cells)}",
            f"  slide: {s['tiles']} tiles -> {s['tokens_after_stm']} tokens after STM, "
            f"{'cached (no tile read)' if s['cache_hit'] else str(s['tiles_read']) + ' tiles read'}; "
            f"{ans.generation['new_tokens']} new tokens; peak RSS {ans.peak_rss_mb:.0f} MB"]


ANSWERS_SCHEMA = "locpath-answers/1"


def _answers_json(answers: list, error: str | None = None) -> str:
    """`ask --json`: one schema for one or many questions, and for a failure (with the answers given before it)."""
    out: dict = {"schema": ANSWERS_SCHEMA, "answers": [a.to_dict() for a in answers]}
    if answers:
        out["peak_rss_mb"] = round(max(a.peak_rss_mb for a in answers), 1)
    if error is not None:
        out["error"] = error
    return json.dumps(out)


def _check_questions(pipe, questions: list[str], params) -> None:
    for i, q in enumerate(questions, 1):
        try:
            pipe.check_question(q, params)
        except LocpathError as exc:
            raise LocpathError(f"question {i}: {exc}") from None


def cmd_ask(args) -> int:
    for i, q in enumerate(args.questions, 1):
        if not q.strip():
            raise LocpathError(f"question {i} is empty")
    if args.evidence is not None and args.evidence.suffix.lower() != ".png":
        raise LocpathError(f"{args.evidence}: --evidence must name a .png file")
    if args.evidence is not None and Path(args.slide).suffix.lower() in (".h5", ".hdf5", ".csv"):
        raise LocpathError(f"{args.slide}: --evidence draws over a slide file's thumbnail; a feature file has none")
    pipe = _pipeline(args)
    params = pipe.sampling(**_sampling(args))
    _check_questions(pipe, args.questions, params)  # every question fits before any output
    args.answers = []  # what main() reports beside a failure under --json
    if len(args.questions) > 1 and args.decode_batch > 1:  # decoded as one batch: answers printed as they end
        args.answers = _ask_batched(pipe, args)
        if args.json:
            print(_answers_json(args.answers))
        if args.evidence is not None:
            _write_evidence(args, args.answers[-1])
        return 0
    for q in args.questions:
        if args.json:
            args.answers.append(pipe.ask(args.slide, q, mpp_override=args.mpp_override, **_sampling(args)))
            continue
        stream = pipe.stream(args.slide, q, mpp_override=args.mpp_override, progress=None, **_sampling(args))
        print(f"Q: {q}\nA: ", end="", flush=True)
        for piece in stream:
            print(piece, end="", flush=True)
        print()
        for line in _timing_lines(stream.result):
            print(line)
        args.answers.append(stream.result)
    if args.json:
        print(_answers_json(args.answers))
    if args.evidence is not None:
        _write_evidence(args, args.answers[-1])
    return 0


def _ask_batched(pipe, args) -> list:
    """Every question decoded as one batch; without --json each answer is printed, in question order, once it
    and the ones before it have ended."""
    done: dict = {}
    shown = [0]

    def on_answer(i: int, a) -> None:
        done[i] = a
        while shown[0] in done:
            a = done[shown[0]]
            print(f"Q: {a.question}\nA: {a.answer}", flush=True)
            for line in _timing_lines(a):
                print(line)
            shown[0] += 1

    return pipe.ask_many(args.slide, args.questions, mpp_override=args.mpp_override, progress=None,
                         on_answer=None if args.json else on_answer, **_sampling(args))


def _write_evidence(args, answer) -> None:
    """The last answer's evidence as a heatmap over the slide's thumbnail (a slide file, not a feature file)."""
    from .wsi import open_slide
    from .wsi.overlay import write_evidence

    ev = answer.evidence
    if ev is None or Path(args.slide).suffix.lower() in (".h5", ".hdf5", ".csv"):
        raise LocpathError(f"{args.slide}: --evidence draws over a slide file's thumbnail; a feature file has none")
    with open_slide(args.slide, mpp_override=args.mpp_override) as s:
        out = write_evidence(s, ev.coords, ev.weights, ev.tile_size_level0, args.evidence)
    print(f"evidence: {out} (the {len(ev.top(1000))} tiles that weighed most for the last question, in red)",
          file=sys.stderr)


def _stdin_lines():
    """Questions from stdin, one per line, as bytes decoded one line at a time: a line that is not UTF-8 is
    refused on its own and the session goes on."""
    source = getattr(sys.stdin, "buffer", None) or sys.stdin  # bytes from a terminal or pipe; text when embedded
    for raw in source:
        try:
            line = raw.decode("utf-8") if isinstance(raw, bytes) else raw
            line.encode("utf-8")  # text streams carry undecodable bytes as surrogates
            yield line.strip(), None
        except (UnicodeDecodeError, UnicodeEncodeError):
            yield None, "that line is not valid UTF-8 text"


def _stdin_batches(limit: int):
    """Lists of (line, problem) from stdin: the first line waits; the lines already waiting behind it (a pasted
    block, a pipe) join it, up to `limit`, so they are decoded as one batch. Typed questions come one at a time."""
    import queue
    import threading
    import time

    lines: queue.Queue = queue.Queue()

    def read():
        for item in _stdin_lines():
            lines.put(item)
        lines.put(None)

    threading.Thread(target=read, name="locpath-stdin", daemon=True).start()
    while (item := lines.get()) is not None:
        batch = [item]
        time.sleep(0.02)  # a pasted block or a pipe delivers its lines together
        while len(batch) < limit:
            try:
                nxt = lines.get_nowait()
            except queue.Empty:
                break
            if nxt is None:
                yield batch
                return
            batch.append(nxt)
        yield batch


def cmd_chat(args) -> int:
    pipe = _pipeline(args)
    params = pipe.sampling(**_sampling(args))
    print(f"preparing {args.slide} ...", file=sys.stderr, flush=True)
    ctx = pipe.prepare(args.slide, mpp_override=args.mpp_override)
    print(f"ready: {ctx.tiles} tiles, {ctx.tokens} tokens after STM ({'cached' if ctx.cache_hit else 'encoded'}). "
          "Ask a question; an empty line or 'exit' ends.", file=sys.stderr, flush=True)
    for batch in _stdin_batches(args.decode_batch):
        questions, end = [], False
        for q, problem in batch:
            if problem is None and (not q or q.lower() in ("exit", "quit")):
                end = True
                break
            try:
                if problem is not None:
                    raise LocpathError(problem)
                pipe.check_question(q, params)
            except LocpathError as exc:
                print(f"locpath: error: {exc}; ask again", file=sys.stderr, flush=True)
                continue
            questions.append(q)
        if len(questions) == 1:
            print("A: ", end="", flush=True)
            stream = pipe.stream(args.slide, questions[0], mpp_override=args.mpp_override, **_sampling(args))
            for piece in stream:
                print(piece, end="", flush=True)
            print()
            print(_timing_lines(stream.result)[0], file=sys.stderr, flush=True)
        elif questions:  # several questions were waiting: one batch, answers in order
            for a in pipe.answer_many(pipe.prepare(args.slide, mpp_override=args.mpp_override), questions,
                                      **_sampling(args)):
                print(f"A: {a.answer}", flush=True)
                print(_timing_lines(a)[0], file=sys.stderr, flush=True)
        if end:
            break
    return 0


def cmd_demo(args) -> int:
    from .demo import run_demo

    return run_demo(args)


# -- calibrate / build ----------------------------------------------------------------
def cmd_calibrate(args) -> int:
    from .calibration.sets import build_calibration

    cal = build_calibration(args.bundle, args.slides, tiles_per_slide=args.tiles_per_slide, seed=args.seed,
                            out=args.out, log=(lambda m: None) if args.json else print)
    summary = {"calibration": str(cal.path), "cached": cal.cached, "tiles": int(len(cal.tiles())),
               "arrays": len(cal.arrays)}
    print(json.dumps(summary) if args.json else f"calibration: {cal.path} ({summary['tiles']} tiles, "
          f"{'cached' if cal.cached else 'new'})")
    return 0


def cmd_build(args) -> int:
    log = (lambda m: None) if args.json else print
    cal = None
    if args.calibration:
        from .calibration.sets import CalibrationSet

        cal = CalibrationSet.load(args.calibration)
    elif args.slides:
        from .calibration.sets import build_calibration

        cal = build_calibration(args.bundle, args.slides, log=log)
    if args.precision == "auto":  # a measurement on this machine, then a build (bench/auto.py)
        from .bench.auto import build_auto

        out = build_auto(Path(args.bundle), Path(args.out), cal, overwrite=args.overwrite, log=log,
                         int4_block_size=args.int4_block_size, prefill=args.prefill)
    else:
        from .engines.build import build_bundle

        out = build_bundle(args.bundle, args.out, args.precision, backend=args.backend, calibration=cal,
                           overwrite=args.overwrite, log=log, int4_block_size=args.int4_block_size,
                           prefill=args.prefill)
    summary = {"bundle": str(out), "precision": args.precision, "backend": args.backend}
    if args.report:
        from .bench.report import build_report

        tiles = cal.tiles() if cal is not None else _report_tiles(args)
        summary["report"] = build_report(args.bundle, {args.precision: out}, tiles, args.seed, args.count, log=log)
        if not args.json:
            for name, r in summary["report"]["precisions"].items():
                print(f"{name:12s} [{r['decoder']}] cosine {r['feature_cosine_mean']:.5f} (min {r['feature_cosine_min']:.5f})  "
                      f"accuracy {r['accuracy']:.3f}  agreement {r['answer_agreement']:.3f}  "
                      f"tiles/s {r['tiles_per_s']:.0f} ({r['tiles_per_s_vs_fp32']:.2f}x)  "
                      f"decode tok/s {r['decode_tokens_per_s']:.0f} ({r['decode_vs_fp32']:.2f}x)")
    if args.json:
        print(json.dumps(summary))
    return 0


def _report_tiles(args):
    """Held-out synthetic tissue tiles for the cosine and speed columns when no calibration set is given."""
    import numpy as np

    from .synth import make_spec
    from .synth.seeds import split_seed
    from .train.data import render_tile, tissue_tiles

    spec = make_spec(split_seed(args.seed + 1000, "eval", 0))
    tt = tissue_tiles(spec)
    return np.stack([render_tile(spec, c, r) for c, r in tt.grid[:96]])


# -- bundle trust -------------------------------------------------------------------
def cmd_verify(args) -> int:
    from .bundle.integrity import TrustedKeys, is_signed, verify_bundle

    keys = TrustedKeys.from_setting(args.trusted_keys)
    m = verify_bundle(args.bundle, trusted_keys=keys)
    info = {"bundle": str(args.bundle), "ok": True, "files": len(m.files) + 1, "signed": is_signed(args.bundle),
            "signature_checked": keys is not None, "components": sorted(m.components)}
    print(json.dumps(info) if args.json else
          f"{args.bundle}: OK ({info['files']} files checked{', signature verified' if keys else ''}"
          f"{'' if keys or not info['signed'] else '; signed, signature not checked without --trusted-keys'})")
    return 0


def cmd_sign(args) -> int:
    from .bundle.integrity import sign_bundle

    kid = sign_bundle(args.bundle, args.key)
    print(f"{args.bundle}: signed with Ed25519 key {kid} (SHA256SUMS.sig)")
    return 0


def cmd_keygen(args) -> int:
    from .bundle.integrity import generate_keypair

    priv, pub, kid = generate_keypair(args.prefix)
    print(f"key {kid}: private {priv} (keep it secret), public {pub} (give it to the runtimes as --trusted-keys)")
    return 0


# -- serve --------------------------------------------------------------------------
def _serve_config(args):
    from .serve.config import ServeConfig

    data = Path(args.data_dir) if args.data_dir else None
    if data is None:
        from .runtime.slide_cache import cache_root

        data = cache_root() / "serve"
    return ServeConfig(bundle=Path(args.bundle), data_dir=data, host=args.host, port=args.port,
                       slide_roots=args.slide_root or [], database=args.database, cache_dir=args.cache_dir,
                       device=args.device, threads=args.threads, dicomweb_url=args.dicomweb,
                       max_upload_bytes=int(args.max_upload_mb * (1 << 20)), question_queue=args.question_queue,
                       upload_quota_bytes=args.upload_quota, init_database=args.init,
                       decode_batch=args.decode_batch,
                       ingest_queue=args.ingest_queue, question_timeout_s=args.timeout,
                       ingest_timeout_s=args.ingest_timeout,
                       trusted_keys=args.trusted_keys, log_json=not args.plain_logs,
                       allowed_hosts=args.allowed_host or [])


MAX_HEADER_BYTES = 64 << 10  # the request line and headers of one request to `locpath serve`


def cmd_serve(args) -> int:
    try:
        import uvicorn

        from .serve import logs
        from .serve.app import create_app
    except ImportError as exc:
        raise LocpathError(f"`locpath serve` needs the serve extra (pip install 'locpath[serve]'): {exc}") from exc
    cfg = _serve_config(args)
    logs.setup(cfg.log_json)
    if args.ray or args.ray_address:
        from .serve.ray_app import run_on_ray

        print(f"locpath serve: {cfg.bundle} on Ray Serve ({args.replicas} replicas) at http://{cfg.host}:{cfg.port}",
              file=sys.stderr, flush=True)
        run_on_ray(cfg, args.replicas, args.ray_address, args.cpus_per_replica, args.gpus_per_replica)
        return 0
    app = create_app(cfg)
    print(f"locpath serve: {cfg.bundle} on http://{cfg.host}:{cfg.port} (data {cfg.data_dir}; "
          f"{'API keys required' if app.state.service.auth_required else 'open: loopback only'})", file=sys.stderr,
          flush=True)
    # h11 bounds a request's header block (httptools takes headers of any size: memory for anyone who connects)
    uvicorn.run(app, host=cfg.host, port=cfg.port, log_level="warning", access_log=False, http="h11",
                h11_max_incomplete_event_size=MAX_HEADER_BYTES)
    return 0


def cmd_keys(args) -> int:
    from .serve import auth
    from .serve.store import JobStore

    data = Path(args.data_dir) if args.data_dir else None
    if data is None:
        from .runtime.slide_cache import cache_root

        data = cache_root() / "serve"
    try:
        data.mkdir(parents=True, exist_ok=True, mode=0o700)
    except OSError as exc:
        raise LocpathError(f"{data}: cannot create the data folder ({exc.strerror or exc})") from None
    store = JobStore(args.database or f"sqlite:///{data / 'locpath.db'}", init=args.init)
    if args.action == "add":
        if not args.name:
            raise LocpathError("keys add needs a NAME")
        token = auth.new_token()
        store.add_key(args.name, auth.token_hash(token), auth.parse_scopes(args.scopes))
        print(token)
        print(f"key {args.name!r} ({args.scopes}) added; the token above is shown once and stored only as its hash",
              file=sys.stderr)
    elif args.action == "list":
        for k in store.keys():
            state = "revoked" if k.revoked else "active"
            print(f"{k.name}\t{k.scopes}\t{state}")
    else:
        if not args.name or not store.revoke_key(args.name):
            raise LocpathError(f"no active key named {args.name!r}")
        print(f"key {args.name!r} revoked")
    store.close()
    return 0


# -- batch --------------------------------------------------------------------------
@contextlib.contextmanager
def _stdout_reserved(reserve: bool):
    """With --json, stdout carries exactly one JSON document. Ray's raylet and some native libraries print to
    file descriptor 1 from other threads; while the work runs, fd 1 points at stderr, and the document is written
    to a saved copy of the real stdout afterwards."""
    if not reserve:
        yield sys.stdout
        return
    sys.stdout.flush()
    saved = os.dup(1)
    os.dup2(2, 1)
    try:
        with os.fdopen(os.dup(saved), "w") as real:
            yield real
    finally:
        sys.stdout.flush()
        os.dup2(saved, 1)
        os.close(saved)


def cmd_batch(args) -> int:
    from .batch.runner import run_batch
    from .batch.settings import BatchConfig
    from .fsutil import atomic_file

    cfg = BatchConfig(bundle=Path(args.bundle), slides=Path(args.slides), questions=Path(args.questions),
                      out=Path(args.out), fmt=args.format, cache_dir=args.cache_dir, threads=args.threads,
                      device=args.device, sampling={"max_new_tokens": args.max_new_tokens}, ray=args.ray,
                      ray_address=args.ray_address, workers=args.workers, cpus_per_worker=args.cpus_per_worker,
                      gpus_per_worker=args.gpus_per_worker, progress=not args.quiet, trusted_keys=args.trusted_keys,
                      overlap=not args.no_overlap, lanes=args.lanes)
    with _stdout_reserved(args.json) as real_stdout:
        summary = run_batch(cfg)
        with atomic_file(Path(args.out) / "summary.json") as tmp:
            tmp.write_text(json.dumps(summary, indent=2))
        if args.json:
            real_stdout.write(json.dumps(summary) + "\n")
            real_stdout.flush()
    if not args.json:
        print(f"batch: {summary['done']} slides done, {summary['skipped']} already done, {summary['failed']} failed in "
              f"{summary['seconds']:.1f} s ({summary['slides_per_hour']:.0f} slides/hour, {summary['runner']}); "
              f"{summary['records']} records in {summary['output']}")
    if summary["failed"]:
        first = summary["failures"][0]
        raise LocpathError(f"{summary['failed']} of {summary['slides']} slides failed (first: {first['error']}); "
                           f"see {Path(args.out) / 'summary.json'}")
    return 0


# -- bench --------------------------------------------------------------------------
def _batch_pass():
    """The batch runner's pass for `bench --throughput` (bench and batch are siblings: the CLI joins them)."""
    from .batch.runner import run_pass

    return run_pass


def cmd_bench(args) -> int:
    from .bench.output import markdown, write_json, write_markdown, write_plots
    from .bench.runner import BenchConfig, check_inputs, run_bench

    if args.bundle:
        bundle = Path(args.bundle)
    else:
        from .demo import _workdir, default_bundle

        bundle = default_bundle(_workdir(None))
    cfg = BenchConfig(bundle=bundle, slide=Path(args.slide) if args.slide else None,
                      tiles=[] if args.slide and not args.tiles else (args.tiles or [1000, 10000]),
                      repeats=args.repeats, warmup=args.warmup, workdir=Path(args.workdir),
                      baselines=not args.no_baselines, progress=not args.quiet, decoder_05b=args.decoder_05b,
                      encoder_vitb=args.encoder_vitb, encoder_vitl=args.encoder_vitl, published=args.published,
                      headline_05b=args.headline_05b, headline_tiles_05b=args.headline_05b_tiles,
                      throughput_pass=_batch_pass() if args.throughput else None,
                      throughput_slides=args.throughput_slides)
    check_inputs(cfg)
    report = run_bench(cfg)
    if args.json:
        write_json(report, args.json)
    if args.markdown:
        write_markdown(report, args.markdown)
    if args.plots:
        write_plots(report, args.plots)
    print(markdown(report))
    return 0


def _add_runtime_args(p, sampling: bool = True):
    p.add_argument("--device", choices=("cpu", "cuda", "tensorrt"), default="cpu",
                   help="ONNX Runtime execution provider (cuda/tensorrt need onnxruntime-gpu)")
    p.add_argument("--threads", type=_positive_int, default=None, help="intra-op threads (default: all cores)")
    p.add_argument("--cache-dir", default=None, help="slide cache folder (default ~/.cache/locpath/slides)")
    p.add_argument("--no-cache", action="store_true", help="do not read or write the slide cache")
    p.add_argument("--mpp-override", type=_positive_float, default=None)
    p.add_argument("--decoder", choices=("auto", "fused", "plain"), default="auto",
                   help="decoder graph: fused (GroupQueryAttention, ONNX Runtime) when the bundle has one, or plain")
    p.add_argument("--decode-batch", type=_positive_int, default=8, metavar="N",
                   help="decode up to N questions as one batch (several questions given, or waiting on stdin in "
                        "chat); answers equal one-by-one answers; 1 = one at a time, streamed (default 8)")
    _add_trust_arg(p)
    if sampling:
        p.add_argument("--max-new-tokens", type=_positive_int, default=None,
                       help="answer length cap (default: the bundle's; must fit the KV cache with the prompt)")
        p.add_argument("--sample", action="store_true", help="sample instead of greedy decoding")
        p.add_argument("--temperature", type=_positive_float, default=None, help="with --sample; (0, 100]")
        p.add_argument("--top-k", type=_non_negative_int, default=None, help="with --sample; 0 = off")
        p.add_argument("--top-p", type=_positive_float, default=None, help="with --sample; (0, 1]")
        p.add_argument("--repetition-penalty", type=_positive_float, default=None, help="(0, 100]; 1 = off")
        p.add_argument("--seed", type=_non_negative_int, default=None, help="sampling seed (>= 0)")


def _add_trust_arg(p):
    p.add_argument("--trusted-keys", default=None, metavar="PEM_OR_DIR",
                   help="run only bundles signed by one of these Ed25519 public keys (default: $LOCPATH_TRUSTED_KEYS; "
                        "unset = signatures not required)")


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="locpath", description=__doc__)
    sub = p.add_subparsers(dest="command", required=True)

    t = sub.add_parser("tiles", help="tissue statistics and tile grid of a slide")
    t.add_argument("slide")
    t.add_argument("--mpp-override", type=_positive_float, default=None, help="level-0 microns per pixel")
    t.add_argument("--target-mpp", type=_positive_float, default=0.5)
    t.add_argument("--tile-size", type=_positive_int, default=224)
    t.add_argument("--min-tissue", type=float, default=0.25)
    t.add_argument("--mask-mpp", type=_positive_float, default=8.0)
    t.add_argument("--backend", choices=("auto", "openslide", "tiffslide"), default="auto")
    t.add_argument("--overlay", type=Path, default=None, help="write a thumbnail PNG with mask and grid")
    t.add_argument("--read", action="store_true", help="also stream every tile and report tiles/s and peak RSS")
    t.add_argument("--workers", type=_positive_int, default=2, help="reader threads (with --read)")
    t.add_argument("--batch-size", type=_positive_int, default=64, help="tiles per batch (with --read)")
    t.add_argument("--json", action="store_true")
    t.set_defaults(func=cmd_tiles)

    en = sub.add_parser("encoders", help="the registered tile encoders (TRIDENT's names, widths, tile geometry)")
    en.add_argument("--json", action="store_true")
    en.set_defaults(func=cmd_encoders)

    s = sub.add_parser("synth", help="write synthetic pyramidal slides with ground truth")
    s.add_argument("out")
    s.add_argument("--count", type=_positive_int, default=1)
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--held-out", action="store_true", help="use the evaluation seed space (as `locpath eval`)")
    s.add_argument("--format", choices=("svs", "tiff"), default="svs")
    s.add_argument("--mpp", type=_positive_float, default=0.5)
    s.add_argument("--tiles", type=_positive_int, nargs=2, metavar=("COLS", "ROWS"), default=None,
                   help="slide size in 224 px tiles at 0.5 um/px")
    s.add_argument("--organ", choices=("colon", "lung", "breast", "kidney"))
    s.add_argument("--diagnosis", choices=("benign", "adenocarcinoma", "squamous cell carcinoma"))
    s.add_argument("--grade", choices=("low grade", "high grade"))
    s.add_argument("--necrosis", choices=("yes", "no"))
    s.add_argument("--quality", type=_jpeg_quality, default=85, help="JPEG quality of the tiles (1-100)")
    s.set_defaults(func=cmd_synth)

    tr = sub.add_parser("train", help="train the reference model and the prefix baseline")
    tr.add_argument("--preset", default="tiny", choices=("tiny",))
    tr.add_argument("--out", default="runs/tiny")
    tr.add_argument("--seed", type=int, default=0)
    tr.add_argument("--quick", action="store_true", help="a seconds-long smoke run (not a useful model)")
    tr.set_defaults(func=cmd_train)

    e = sub.add_parser("eval", help="accuracy on held-out synthetic slides")
    e.add_argument("--checkpoint", default=None, help="checkpoint folder (default: the shipped reference)")
    e.add_argument("--bundle", default=None, help="evaluate an exported bundle through the torch-free runtime")
    e.add_argument("--device", choices=("cpu", "cuda", "tensorrt"), default="cpu")
    _add_trust_arg(e)
    e.add_argument("--seed", type=int, default=1)
    e.add_argument("--count", type=_positive_int, default=20)
    e.add_argument("--json", action="store_true")
    e.add_argument("--records", action="store_true", help="with --json: every question, answer and truth")
    e.add_argument("--keep-slides", default=None, help="keep the generated slides in this folder")
    e.set_defaults(func=cmd_eval)

    x = sub.add_parser("export", help="export a checkpoint to a validated ONNX bundle")
    x.add_argument("out", help="bundle folder to create")
    x.add_argument("--checkpoint", default=None, help="checkpoint folder (default: the shipped reference)")
    x.add_argument("--no-validate", action="store_true", help="skip the comparison with PyTorch")
    x.add_argument("--stream-decoder", choices=("auto", "int4", "fp32", "off"), default="auto",
                   help="write the decoder straight from the checkpoint's weights, one matrix at a time, at this "
                        "precision, never building the LLM (auto: int4 for LLMs above 2 B parameters, whose fp32 "
                        "model would not fit in memory; such a bundle has only the fused decoder)")
    x.add_argument("--overwrite", action="store_true")
    x.add_argument("--json", action="store_true")
    x.set_defaults(func=cmd_export)

    ins = sub.add_parser("inspect", help="key inventory of a checkpoint: .pth/.bin (weights only), .safetensors, a "
                                         "Hugging Face model folder (sharded) or a PEFT adapter folder")
    ins.add_argument("checkpoint")
    ins.add_argument("--depth", type=_positive_int, default=None,
                     help="group keys by their first N name components (default: all, numeric indices as *)")
    ins.add_argument("--json", action="store_true")
    ins.set_defaults(func=cmd_inspect)

    im = sub.add_parser("import", help="a Hugging Face LLM folder (+ LoRA) and a release's state dicts -> a locpath "
                                       "checkpoint, through a declarative key map")
    im.add_argument("--llm", required=True, help="Hugging Face Qwen2/Llama folder (config.json, safetensors shards, "
                                                 "tokenizer.json, chat template)")
    im.add_argument("--out", required=True, help="checkpoint folder to create")
    im.add_argument("--lora", default=None, help="a PEFT adapter folder, or a LoRA state dict (PEFT key names)")
    im.add_argument("--lora-alpha", type=_positive_float, default=None,
                    help="LoRA alpha of state-dict LoRA (default: the key map's, else alpha = rank)")
    im.add_argument("--release", default=None, help="a folder with mae.pth, stage1.pth, stage2.pth (or checkpoints/)")
    im.add_argument("--mae", default=None)
    im.add_argument("--stage1", default=None)
    im.add_argument("--stage2", default=None)
    im.add_argument("--key-map", default=None, help="JSON key map (default: the shipped guess locpath-release-v1)")
    im.add_argument("--encoder", default=None, help="registered tile encoder (TRIDENT name, e.g. conch_v1)")
    im.add_argument("--encoder-weights", default=None, help="its local weights (.safetensors/.bin/.pth)")
    im.add_argument("--config", default=None, help="ModelConfig overrides: inline JSON or a JSON file")
    im.add_argument("--cara-layers", type=_layer_list, default=None,
                    help="LLM layers with CARA blocks, e.g. 3,10,17,24 (default: those the release fills)")
    im.add_argument("--dtype", choices=("auto", "float32", "bfloat16"), default="auto",
                    help="checkpoint dtype (auto: float32 up to 2 B LLM parameters, bfloat16 above)")
    im.add_argument("--stream", choices=("auto", "on", "off"), default="auto",
                    help="write the checkpoint tensor by tensor from the LLM's shards, LoRA merged per tensor, never "
                         "holding the LLM (auto: above 2 B LLM parameters, where the in-memory import needs more than "
                         "a 24 GB machine has); `locpath export` then streams the decoder from it")
    im.add_argument("--chat-template", default=None, help="a Jinja chat template (default: the LLM folder's)")
    im.add_argument("--allow-missing", action="store_true",
                    help="keep adapter tensors no release file fills at random init (a deployment-shape test)")
    im.add_argument("--overwrite", action="store_true")
    im.add_argument("--json", action="store_true")
    im.set_defaults(func=cmd_import)

    a = sub.add_parser("ask", help="answer questions about a slide with a bundle (torch-free)")
    a.add_argument("bundle")
    a.add_argument("slide", help="a slide file, a DICOM series folder, or a feature file: TRIDENT/CLAM .h5 (any "
                   "alias of the bundle's encoder) or SlideChat .csv (no tile positions: no STM merges, no heatmap)")
    a.add_argument("questions", nargs="+", help="one or more questions")
    a.add_argument("--json", action="store_true")
    a.add_argument("--evidence", type=Path, default=None, metavar="OUT.png",
                   help="draw the tiles that weighed most for the last question as a heatmap over the thumbnail")
    _add_runtime_args(a)
    a.set_defaults(func=cmd_ask)

    c = sub.add_parser("chat", help="several questions in a row about one slide (reads questions from stdin)")
    c.add_argument("bundle")
    c.add_argument("slide")
    _add_runtime_args(c)
    c.set_defaults(func=cmd_chat)

    cb = sub.add_parser("calibrate", help="calibration data for quantization, from slides' tissue tiles")
    cb.add_argument("bundle")
    cb.add_argument("--slides", nargs="+", required=True)
    cb.add_argument("--tiles-per-slide", type=_positive_int, default=48)
    cb.add_argument("--seed", type=int, default=0)
    cb.add_argument("--out", default=None, help="npz path (default: BUNDLE/calibration/<key>.npz)")
    cb.add_argument("--json", action="store_true")
    cb.set_defaults(func=cmd_calibrate)

    bd = sub.add_parser("build", help="a quantized or compiled bundle from an fp32 bundle")
    bd.add_argument("bundle")
    bd.add_argument("out")
    bd.add_argument("--precision", default="int8", help="ort: fp32, int8, int8-static, int4, int8-encoder, fp16; openvino: bf16, fp32, int8, int8-safe (each +int4 optional); "
                         "tensorrt: fp16, fp32; auto: measure the CPU candidates per stage and keep the fastest")
    bd.add_argument("--backend", choices=("ort", "openvino", "tensorrt"), default="ort")
    bd.add_argument("--calibration", default=None, help="npz from `locpath calibrate`")
    bd.add_argument("--slides", nargs="+", default=None, help="calibrate on these slides first")
    bd.add_argument("--int4-block-size", type=int, default=32,
                    help="weights per INT4 scale in the decoders (16-256; 32 default; 128 reads ~15%% fewer bytes per token)")
    bd.add_argument("--prefill", choices=("auto", "none", "int8", "int8-nbits", "int4"), default="auto",
                    help="the fused decoder's prefill graph (decoder_fused_prefill; INT4 builds on ONNX Runtime): auto "
                         "adds the INT8 (AMX U8S8) graph when it prefills faster with the same greedy tokens")
    bd.add_argument("--overwrite", action="store_true")
    bd.add_argument("--report", action="store_true", help="cosine, agreement, accuracy and speed vs fp32")
    bd.add_argument("--seed", type=int, default=1, help="held-out seed for --report")
    bd.add_argument("--count", type=_positive_int, default=10, help="held-out slides for --report")
    bd.add_argument("--json", action="store_true")
    bd.set_defaults(func=cmd_build)

    be = sub.add_parser("bench", help="per-stage latency, throughput and memory against baselines and ceilings")
    be.add_argument("bundle", nargs="?", default=None, help="bundle (default: the demo's reference bundle)")
    be.add_argument("--slide", default=None, help="bench this slide (default: a synthetic one)")
    be.add_argument("--tiles", type=_positive_int, nargs="+", default=None,
                    help="tissue-tile counts of the synthetic scaling slides (default 1000 10000)")
    be.add_argument("--repeats", type=_positive_int, default=3)
    be.add_argument("--warmup", type=_non_negative_int, default=1)
    be.add_argument("--workdir", default="runs/bench", help="where the synthetic bench slides are kept")
    be.add_argument("--no-baselines", action="store_true", help="skip the PyTorch and prefix baselines")
    be.add_argument("--decoder-0.5b", dest="decoder_05b", action="store_true",
                    help="also compare the decoder alone on a Qwen2.5-0.5B shape with onnxruntime-genai INT4 and "
                         "transformers eager (first run builds and exports it: minutes)")
    be.add_argument("--encoder-vit-b", dest="encoder_vitb", action="store_true",
                    help="also compare the tile-encoder recipes (ORT fp32/INT8, OpenVINO bf16/NNCF INT8, PyTorch) on a "
                         "ViT-B/16 shape (first run exports and quantizes it: minutes)")
    be.add_argument("--encoder-vit-l", dest="encoder_vitl", action="store_true",
                    help="also compare the INT8 tile-encoder recipes with PyTorch bf16 at UNI's ViT-L/16 shape "
                         "(first run exports and quantizes it: ~10 minutes on 2 cores)")
    be.add_argument("--throughput", action="store_true",
                    help="also measure `locpath batch` slides/hour, overlapped against sequential, back to back on "
                         "synthetic ~1k-tile slides (about a minute)")
    be.add_argument("--throughput-slides", type=_positive_int, default=4, help="slides per --throughput pass")
    be.add_argument("--published", action="store_true",
                    help="also build and run LoC-Path at published scale: a full-depth Qwen2.5-7B-shaped random model "
                         "written as shards here, its INT4 decoder streamed from them (build time, peak RSS, bundle "
                         "size, tokens/s, time to first token at --tiles), beside onnxruntime-genai's builder on the "
                         "same shards where it fits in memory (first run: ~15 GB of shards, tens of minutes)")
    be.add_argument("--headline-0.5b", dest="headline_05b", action="store_true",
                    help="also measure the headline (LoC-Path vs the prefix baseline, both on ONNX Runtime INT4) on a "
                         "Qwen2.5-0.5B-shaped LLM (first run builds both: minutes; 10k tiles: minutes per side)")
    be.add_argument("--headline-0.5b-tiles", dest="headline_05b_tiles", type=_positive_int, nargs="+", default=None,
                    help="tile counts for --headline-0.5b (default: --tiles)")
    be.add_argument("--json", default=None, help="write the JSON report here")
    be.add_argument("--markdown", default=None, help="write the Markdown summary here")
    be.add_argument("--plots", default=None, help="write PNG plots into this folder")
    be.add_argument("--quiet", action="store_true")
    be.set_defaults(func=cmd_bench)

    d = sub.add_parser("demo", help="export the shipped model (once), write a synthetic slide, ask every question type")
    d.add_argument("--workdir", default=None, help="where the bundle, slides and cache live (default ~/.cache/locpath/demo)")
    d.add_argument("--device", choices=("cpu", "cuda", "tensorrt"), default="cpu")
    d.add_argument("--bundle", default=None, help="run the demo with this bundle (default: the shipped reference "
                                                  "bundle; exported again from the checkpoint only if it is absent)")
    _add_trust_arg(d)
    d.set_defaults(func=cmd_demo)

    v = sub.add_parser("verify", help="check a bundle's checksums (and signature) without running it")
    v.add_argument("bundle")
    _add_trust_arg(v)
    v.add_argument("--json", action="store_true")
    v.set_defaults(func=cmd_verify)

    sg = sub.add_parser("sign", help="sign a bundle's SHA256SUMS with an Ed25519 private key")
    sg.add_argument("bundle")
    sg.add_argument("--key", required=True, help="PEM private key (from `locpath keygen` or openssl genpkey -algorithm "
                                                 "ed25519); an encrypted key reads its password from $LOCPATH_KEY_PASSWORD")
    sg.set_defaults(func=cmd_sign)

    sv = sub.add_parser("serve", help="the HTTP service: slides by path, upload or DICOMweb; questions as JSON, "
                                      "server-sent events or OpenAI chat completions; a web page")
    sv.add_argument("bundle")
    sv.add_argument("--host", default="127.0.0.1", help="bind address (non-loopback needs an API key)")
    sv.add_argument("--port", type=_positive_int, default=8000)
    sv.add_argument("--allowed-host", action="append", metavar="NAME",
                    help="a name clients reach the service by (repeatable). Requests whose Host header is not "
                         "localhost, 127.0.0.1, [::1], the --host address or such a name are refused (421), "
                         "against DNS rebinding: behind a proxy or on 0.0.0.0, name the host clients use")
    sv.add_argument("--data-dir", default=None, help="database, uploads, retrieved DICOM (default ~/.cache/locpath/serve)")
    sv.add_argument("--database", default=None, help="SQLAlchemy URL (default: SQLite in the data folder)")
    sv.add_argument("--slide-root", action="append", type=Path, help="a folder slides may be registered from by path "
                                                                     "(repeatable; symlinks are resolved first)")
    sv.add_argument("--dicomweb", default=None, metavar="URL", help="a DICOMweb server slides can be pulled from")
    sv.add_argument("--cache-dir", default=None, help="slide cache folder (default ~/.cache/locpath/slides)")
    sv.add_argument("--device", choices=("cpu", "cuda", "tensorrt"), default="cpu")
    sv.add_argument("--threads", type=_positive_int, default=None)
    sv.add_argument("--max-upload-mb", type=_positive_float, default=4096.0)
    sv.add_argument("--upload-quota", type=_byte_size, default=64 << 30, metavar="BYTES",
                    help="per API key: the most bytes its stored uploads may take (suffix K, M, G or T; default 64G); "
                         "more is refused with 413 while streaming; failed and deleted uploads free their share")
    sv.add_argument("--init", action="store_true",
                    help="accept a database file that is empty or not locpath's (refused otherwise: its keys would "
                         "be gone); a missing file is always created")
    sv.add_argument("--question-queue", type=_positive_int, default=16, help="waiting questions before 429")
    sv.add_argument("--decode-batch", type=_positive_int, default=8, metavar="N",
                    help="decode up to N clients' questions as one batch; a question joins as soon as a row is free "
                         "(default 8; 1 = one at a time)")
    sv.add_argument("--ingest-queue", type=_positive_int, default=64, help="waiting slides before 429")
    sv.add_argument("--timeout", type=_positive_float, default=120.0, help="seconds per question")
    sv.add_argument("--ingest-timeout", type=_positive_float, default=7200.0, metavar="S",
                    help="seconds one slide's ingestion may take before it is failed (default 7200)")
    sv.add_argument("--plain-logs", action="store_true", help="human-readable logs instead of JSON lines")
    sv.add_argument("--ray", action="store_true", help="run as a Ray Serve deployment (a local cluster unless "
                                                       "--ray-address)")
    sv.add_argument("--ray-address", default=None, metavar="HOST:PORT")
    sv.add_argument("--replicas", type=_positive_int, default=1, help="Ray Serve replicas (one per device)")
    sv.add_argument("--cpus-per-replica", type=_positive_float, default=1.0)
    sv.add_argument("--gpus-per-replica", type=float, default=0.0)
    _add_trust_arg(sv)
    sv.set_defaults(func=cmd_serve)

    bt = sub.add_parser("batch", help="every slide of a folder or list asked every question: one record per slide, "
                                      "resumable; in this process or on a Ray cluster")
    bt.add_argument("bundle", help="a bundle folder (locpath export / build)")
    bt.add_argument("--slides", required=True, help="a folder of slides (and DICOM series folders), a list file (one path per line) or one slide file")
    bt.add_argument("--questions", required=True, help="a text file, one question per line (or a JSON list)")
    bt.add_argument("--out", required=True, help="output folder: records/, features/, answers.jsonl, summary.json")
    bt.add_argument("--format", choices=("jsonl", "parquet"), default="jsonl",
                    help="the combined answers file (parquet needs pyarrow)")
    bt.add_argument("--ray", action="store_true", help="run on a local Ray cluster started for this run")
    bt.add_argument("--ray-address", default=None, metavar="HOST:PORT", help="run on this Ray cluster")
    bt.add_argument("--workers", type=_positive_int, default=2, help="Ray: encoder actors (default 2)")
    bt.add_argument("--cpus-per-worker", type=_positive_float, default=1.0,
                    help="Ray: CPUs each worker reserves (and its intra-op threads, unless --threads)")
    bt.add_argument("--gpus-per-worker", type=float, default=0.0, help="Ray: GPUs each worker reserves (with --device cuda)")
    bt.add_argument("--cache-dir", default=None, help="slide cache (shared by all workers; default ~/.cache/locpath/slides)")
    bt.add_argument("--threads", type=_positive_int, default=None,
                    help="intra-op threads per pipeline (default: the cores, shared out over --lanes when overlapped)")
    bt.add_argument("--no-overlap", action="store_true",
                    help="in process: one slide after another (default: the next slides are read, encoded and "
                         "compressed while one slide's questions are answered)")
    bt.add_argument("--lanes", type=_positive_int, default=2,
                    help="in process, overlapped: slides staged at once ahead of the one answered (default 2)")
    bt.add_argument("--device", choices=("cpu", "cuda", "tensorrt"), default="cpu",
                    help="ONNX Runtime execution provider (cuda/tensorrt need onnxruntime-gpu)")
    bt.add_argument("--max-new-tokens", type=_positive_int, default=None, help="cap on each answer's length")
    bt.add_argument("--json", action="store_true", help="print the run's summary as one JSON object on stdout")
    bt.add_argument("--quiet", action="store_true", help="no progress line on stderr")
    _add_trust_arg(bt)
    bt.set_defaults(func=cmd_batch)

    ks = sub.add_parser("keys", help="API keys of `locpath serve` (stored hashed in its database)")
    ks.add_argument("action", choices=("add", "list", "revoke"))
    ks.add_argument("name", nargs="?", default=None)
    ks.add_argument("--scopes", default="read,submit", help="comma-separated: read, submit, admin")
    ks.add_argument("--data-dir", default=None)
    ks.add_argument("--database", default=None)
    ks.add_argument("--init", action="store_true", help="accept a database file that is empty or not locpath's")
    ks.set_defaults(func=cmd_keys)

    kg = sub.add_parser("keygen", help="make an Ed25519 key pair for signing bundles: PREFIX.key and PREFIX.pub")
    kg.add_argument("prefix", help="path prefix of the two files (the private key is written with mode 0600)")
    kg.set_defaults(func=cmd_keygen)
    return p


class _WarningLine(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        first = record.getMessage().strip().splitlines()
        return f"locpath: warning: {first[0] if first else ''}"


class _StderrHandler(logging.StreamHandler):
    """Writes to whatever sys.stderr is at the time (embedding programs and tests swap it)."""

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, value):
        pass


def _setup_logging() -> None:
    """Library warnings (locpath's own and the slide libraries' routed through it) as one line each."""
    log = logging.getLogger("locpath")
    if not any(getattr(h, "_locpath_cli", False) for h in log.handlers):
        h = _StderrHandler()
        h.setFormatter(_WarningLine())
        h._locpath_cli = True
        log.addHandler(h)
        log.propagate = False
        log.setLevel(logging.WARNING)


def _fail(args, message: str) -> int:
    """One stderr line, exit 2; under `ask --json` also the JSON error object (with the answers given so far)."""
    message = " ".join(message.split())
    if getattr(args, "json", False) is True and args.func is cmd_ask:
        print(_answers_json(getattr(args, "answers", []), error=message), flush=True)
    print(f"locpath: error: {message}", file=sys.stderr, flush=True)
    return 2


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    _setup_logging()
    try:
        return int(args.func(args) or 0)
    except LocpathError as exc:
        return _fail(args, str(exc))
    except BrokenPipeError:  # `locpath ask ... | head`: the reader left; no traceback, nothing more to stdout
        try:
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, sys.stdout.fileno())
        except OSError:
            pass
        print("locpath: error: the output pipe was closed by its reader; stopped", file=sys.stderr)
        return 2
    except OSError as exc:  # a file the command had to write or read: permission, full disk, ...
        where = f"{exc.filename}: " if exc.filename else ""
        return _fail(args, f"{where}{exc.strerror or exc}")
    except KeyboardInterrupt:
        print("locpath: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
