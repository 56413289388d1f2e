"""The torch-free pipeline and its public API.

    pipe = Pipeline.from_bundle("bundle/")          # verifies SHA256SUMS, manifest, every file (and signature)
    ans = pipe.ask("slide.svs", "What is the diagnosis?")                     # Answer
    ctx = pipe.prepare("slide.svs")                                           # SlideContext (memory, slide cache)
    for piece in (s := pipe.stream(ctx, "Is necrosis present?")):
        print(piece, end="")                                                    # then s.result is the Answer
    answers = pipe.answer(ctx, ["Which organ?", pipe.question("Grade?", max_new_tokens=8)])  # one batch

    question(text, **sampling) -> Question        checked once (text, length, KV room); every path takes it
    answer(ctx, questions) -> [Answer]            one batch (at most decode_batch rows), in question order
    stream(ctx, question) -> StreamedAnswer       pieces, then .result
    ask(slide, question_or_questions)             prepare, then stream (one) or answer (several)
    batch(rows) -> AnswerBatch                    continuous batching: add(ctx, Question, tag), step(), cancel(tag)
All of them decode through AnswerBatch (answer_batch.py) over the one decoding loop (generator.py).

The stages, for callers that drive them one by one (calibration, build measurements, the bench, services):
    encode_tiles(uint8 NHWC) -> features          tile encoder graph
    compress(FeatureFile) -> Compressed           STM (numpy) + resampler graph: latents, attention, STM assignment
    prepare(slide) -> SlideContext                the two above over a slide, through the slide cache and memory
    question_kv(latents, question) -> QuestionKV  TIS graph, top-M, cross-KV graph
    evidence(ctx, qkv) -> Evidence                the tiles that weighed most for the question (evidence.py)
Per-slide latents are kept on disk (slide cache) and in a bounded in-memory LRU, so a second question about the
same slide reads no tile and runs no encoder.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import threading
import time
from collections import OrderedDict
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from ..bundle import names
from ..bundle.engine_config import EngineConfig, check_engine_config
from ..bundle.integrity import TrustedKeys, verify_bundle
from ..bundle.manifest import BundleError, Manifest
from ..errors import ConfigError, LocpathError, warn
from ..stm import merge_tokens
from ..text import load_tokenizer
from ..wsi import GridConfig, TissueConfig, open_slide
from ..wsi.extract import TilePlan, extract_features, plan_tiles
from ..wsi.features import FEATURE_SUFFIXES, FeatureFile, read_features
from ..wsi.factory import check_slide_file, warm_up_readers
from ..wsi.identity import PinnedFile
from .backends import make_runner
from .decoder_state import DecoderState, decoder_state
from .evidence import Evidence, tile_weights
from .generator import GenerationStats, Generator, OneAnswer
from .machine import describe_machine
from .options import DECODER_CHOICES, RuntimeOptions
from .prompt import ChatTemplate
from .question import Question, make_question
from .resampler_chunks import ChunkedResampler
from .results import Answer, Compressed, QuestionKV, SlideContext, StreamedAnswer, _ms, peak_rss_mb  # noqa: F401
from .runner import Runner
from .sampler import SamplingParams
from .slide_cache import Expected, SlideCache, default_cache_dir, entry_name, file_identity, fingerprint
from .tile_batch import encoder_tile_batch
from .trust import TrustModel, load_trust, slide_trust

if TYPE_CHECKING:
    from .answer_batch import AnswerBatch

class NotPrepared(LocpathError):
    """`prepare(..., cached_only=True)` found the slide neither in memory nor in the slide cache: it must go through
    ingestion (tiles read and encoded) first. A question lane raises it rather than encode a whole slide while
    every decoding client waits."""


def check_engines(bundle_dir: Path, manifest: Manifest, device: str) -> None:
    """Refuse built components whose engine config does not fit this machine, runtime or ONNX (a "rebuild")."""
    machines: dict[str, dict] = {}
    for entry in manifest.components.values():
        if not entry.engine_config:
            continue
        cfg = EngineConfig.load(bundle_dir / entry.engine_config)
        if cfg.backend not in machines:
            machines[cfg.backend] = describe_machine(cfg.backend, "cpu" if device == "cpu" else "cuda")
        check_engine_config(cfg, machines[cfg.backend], entry.parent_sha256, entry.sha256, str(bundle_dir / entry.file))


def choose_decoder(manifest: Manifest, choice: str, bundle_dir: Path, device: str = "cpu") -> str:
    """Which decoder graph runs: the fused one (GroupQueryAttention) when the bundle has one for this device and
    `choice` is auto or fused, the plain graph otherwise. ONNX Runtime's CUDA GroupQueryAttention takes fp16/bf16
    only, so CUDA runs a fused graph built with float16 K/V (`build --precision fp16`); the TensorRT provider and
    plans take the plain graph (GroupQueryAttention is an ONNX Runtime contrib op)."""
    if choice not in DECODER_CHOICES:
        raise LocpathError(f"unknown decoder {choice!r} (choose from {', '.join(DECODER_CHOICES)})")
    fused = manifest.components.get(names.DECODER_FUSED)
    has_plain = names.DECODER in manifest.components
    fused_ok = fused is not None and (
        device == "cpu" or (device == "cuda" and manifest.decoder_contract(names.DECODER_FUSED).kv_dtype == "float16"))
    if choice == "fused" and fused is None:
        raise LocpathError(f"{bundle_dir}: this bundle has no fused decoder (re-export it with this version of "
                           "locpath, or use --decoder plain)")
    if choice == "fused" and not fused_ok:
        raise LocpathError(f"{bundle_dir}: this bundle's fused decoder does not run on --device {device} (CUDA "
                           "needs the fp16 build, TensorRT the plain graph); use --decoder plain (or auto)")
    if choice == "plain" and not has_plain:
        raise LocpathError(f"{bundle_dir}: this bundle has no plain decoder graph (use --decoder fused or auto)")
    if choice == "plain" or (choice == "auto" and not fused_ok):
        if not has_plain:
            raise LocpathError(f"{bundle_dir}: this bundle holds only a fused decoder, which does not run on "
                               f"--device {device}")
        return names.DECODER
    return names.DECODER_FUSED


def _ov_hint(entry) -> dict:
    """The OpenVINO inference-precision hint `locpath build` measured fastest for an INT8 model, if recorded."""
    hint = (entry.quantization or {}).get("ov_hint") if entry.backend == "openvino" else None
    return {"hint": hint} if hint else {}


class Pipeline:
    def __init__(self, bundle_dir: str | os.PathLike, manifest: Manifest, options: RuntimeOptions | None = None,
                 **changes):
        """`manifest` must come from `verify_bundle` (as `from_bundle` does); `options` (runtime/options.py) say how
        it runs, `changes` override single fields (`use_cache=False`). `memory_slides` bounds the slides whose
        latents stay in memory (least recently used go first; the disk cache keeps the rest); `decode_batch`: the
        most answers decoded as one batch; `prefill_graph`: run prompts on the bundle's decoder_fused_prefill graph
        when it has one (False: the decoder graph runs both phases); `resampler_chunk`: a slide with more STM
        tokens than this runs the bundle's chunked resampler graphs when it has them, so the resampler's memory
        follows the chunk rather than the slide (0: always the one-graph resampler)."""
        opts = (options or RuntimeOptions()).replace(**changes)
        self.options = opts
        device, threads, decoder = opts.device, opts.threads, opts.decoder
        self.bundle_dir = Path(bundle_dir)
        self.manifest = manifest
        self.cfg = manifest.model_config
        if manifest.fusion != "cara":
            raise LocpathError(f"{self.bundle_dir}: fusion {manifest.fusion!r} bundles are not runnable yet")
        tok_entry = manifest.tokenizer
        self.tokenizer = load_tokenizer(self.bundle_dir / tok_entry.file)
        self.chat_template = ChatTemplate.from_file(self.bundle_dir / tok_entry.chat_template)
        check_engines(self.bundle_dir, manifest, device)
        self.decoder_component = choose_decoder(manifest, decoder, self.bundle_dir, device)
        skip = set(names.DECODERS) - {self.decoder_component}  # the other decoder graph is never loaded
        if self.decoder_component != names.DECODER_FUSED or not opts.prefill_graph:
            skip.add(names.DECODER_FUSED_PREFILL)
        self.runners: dict[str, Runner] = {
            name: make_runner(c.backend, self.bundle_dir / c.file, name, precision=c.precision, device=device,
                              threads=threads, entry=c, engine_cache=self._engine_cache(c, device),
                              **self._spin(name, c, opts.decoder_spin), **_ov_hint(c))
            for name, c in manifest.components.items() if name not in skip
        }
        self.decoder_state: DecoderState = decoder_state(self.runners[self.decoder_component],
                                                         manifest.decoder_contract(self.decoder_component),
                                                         self.runners.get(names.DECODER_FUSED_PREFILL))
        self.chunked_resampler = None
        if opts.resampler_chunk and all(n in self.runners for n in names.RESAMPLER_CHUNKS):
            r = self.cfg.resampler
            self.chunked_resampler = ChunkedResampler(*(self.runners[n] for n in names.RESAMPLER_CHUNKS), r.depth,
                                                      r.num_heads, r.num_latents, r.dim, opts.resampler_chunk)
        self.max_batch = opts.decode_batch
        self.stop_ids = self._stop_ids()
        self.max_length = self.decoder_state.capacity(manifest.generation.max_length)
        self.tile_batch = encoder_tile_batch(opts.tile_batch, (manifest.model or {}).get("tile_encoder")
                                             if isinstance(manifest.model, dict) else None)
        self.reader_workers = opts.reader_workers
        self.cache = None
        if opts.use_cache:
            expected = Expected(self.cfg.resampler.num_latents, self.cfg.resampler.dim, self.cfg.feature_dim)
            self.cache = SlideCache(opts.cache_dir or default_cache_dir(), self.bundle_key(), expected)
        self.memory_slides = opts.memory_slides
        self._memory: OrderedDict[str, SlideContext] = OrderedDict()
        self._memory_lock = threading.Lock()  # a service prepares slides and answers questions in two threads
        self._warned: set[str] = set()  # feature files already warned about (once per file)
        # trust.json (verified with the bundle): confidence temperature, OOD statistics, minimum tissue tiles
        self.trust: TrustModel | None = load_trust(self.bundle_dir, manifest)
        self.keep_logits = False  # fitting (locpath trust fit): answers keep each step's largest logits
        self.warmup_ms = self.warm_up() if opts.warmup else None

    def warm_up(self) -> float:
        """Make every session now and run each graph but the tile encoder once on a tiny input, so the first
        question does not pay ONNX Runtime's session creation (the weights read from disk and prepacked: ~20 s of
        a 7B INT4 decoder's first prefill) and first-run allocations; the slide libraries are imported and tissue detection run once too (wsi.factory);
        returns the milliseconds it took."""
        t0 = time.perf_counter()
        for r in self.runners.values():
            r.load()
        f = self.cfg.feature_dim
        out = self.runners[names.RESAMPLER].run({
            "tokens": np.zeros((1, 1, f), np.float32), "positions": np.zeros((1, 1, 2), np.float32),
            "counts": np.ones((1, 1), np.float32), "token_mask": np.ones((1, 1), bool)}, ["latents"])
        if self.chunked_resampler is not None:  # one full chunk and a remainder: the shapes every large slide runs
            # (their first run prepared them at the first large slide: 10k tiles at published width 0.50-0.77 s
            # against 0.27-0.45 s once warm, OpenVINO bf16 and ORT fp32 chunks, AMD EPYC)
            n = self.chunked_resampler.chunk + 1
            self.chunked_resampler.run(np.zeros((n, f), np.float32), np.zeros((n, 2), np.float32),
                                       np.ones(n, np.float32))
        qkv = self.question_kv(out["latents"].astype(np.float32), "?")
        prompt = self.prompt_ids("?")[:2]
        self.decoder_state.greedy(prompt, qkv.cross, 2)  # the prefill (its own graph when there is one) and a step
        warm_up_readers()
        return _ms(t0)

    def _spin(self, name: str, entry, decoder_spin: bool) -> dict:
        """Intra-op spinning only for the decoder: it alone runs hundreds of back-to-back calls, where waking
        sleeping threads per op costs more than spinning (0.5B INT4 decode: 36 -> 43 tok/s on 2 cores); every
        other session sleeps between calls so its idle pool does not steal the cores the next stage needs."""
        if entry.backend not in ("onnxruntime", "ort") or name != self.decoder_component:
            return {}
        return {"spin": bool(decoder_spin)}

    @staticmethod
    def _engine_cache(entry, device: str) -> str | None:
        """Where ONNX Runtime's TensorRT provider keeps the engines it builds for this graph (per graph sha256)."""
        if device != "tensorrt":
            return None
        from .slide_cache import cache_root

        return str(cache_root() / "engines" / "ort-tensorrt" / entry.sha256[:16])

    def _stop_ids(self) -> list[int]:
        ids = []
        for t in self.manifest.generation.stop_tokens:
            i = self.tokenizer.token_to_id(t)
            if i is None:
                raise BundleError(f"{self.bundle_dir / 'manifest.json'}: generation.stop_tokens: {t!r} is not a token "
                                  f"of {self.manifest.tokenizer.file}")
            ids.append(i)
        return ids

    @classmethod
    def from_bundle(cls, bundle_dir: str | os.PathLike, options: RuntimeOptions | None = None, **changes) -> "Pipeline":
        """Verify the bundle (and its signature, when `options.trusted_keys` is given or $LOCPATH_TRUSTED_KEYS is
        set), then load it; `changes` override single options (`from_bundle(b, use_cache=False)`)."""
        opts = (options or RuntimeOptions()).replace(**changes)
        keys = opts.trusted_keys if isinstance(opts.trusted_keys, TrustedKeys) else \
            TrustedKeys.from_setting(opts.trusted_keys)
        return cls(bundle_dir, verify_bundle(bundle_dir, trusted_keys=keys), opts)

    def bundle_key(self) -> str:
        """What the slide cache depends on: tile encoder, resampler and preprocessing."""
        m = self.manifest
        parts = [m.components[names.TILE_ENCODER].sha256, m.components[names.RESAMPLER].sha256,
                 json.dumps(m.preprocessing.__dict__, sort_keys=True, default=str)]
        return hashlib.sha256("|".join(parts).encode()).hexdigest()[:16]

    def release(self) -> None:
        for r in self.runners.values():
            r.release()
        self._memory.clear()

    # -- per slide ---------------------------------------------------------------------
    def encode_tiles(self, tiles: np.ndarray) -> np.ndarray:
        """uint8 (B, H, W, 3) tiles at the bundle's tile size -> float32 (B, F) features."""
        return self.runners[names.TILE_ENCODER].run({"tiles": tiles}, ["features"])["features"]

    def compress(self, ff: FeatureFile, timings: dict | None = None) -> Compressed:
        """STM over the tile grid, then the resampler (latents and their attention over the STM tokens)."""
        timings = timings if timings is not None else {}
        stm = self.manifest.preprocessing.stm
        t0 = time.perf_counter()
        # tiles of unknown position (a SlideChat CSV) are never merged: their adjacency is unknown
        merged = merge_tokens(ff.features, ff.grid_index, stm["window"], stm["threshold"],
                              stm["enabled"] and ff.spatial)
        timings["stm"] = _ms(t0)
        t0 = time.perf_counter()
        chunked = self.chunked_resampler
        if chunked is not None and len(merged) > chunked.chunk:
            latents, attention = chunked.run(merged.features, merged.positions, merged.counts)
        else:
            out = self.runners[names.RESAMPLER].run({
                "tokens": merged.features[None].astype(np.float32, copy=False),
                "positions": merged.positions[None].astype(np.float32, copy=False),
                "counts": merged.counts[None].astype(np.float32, copy=False),
                "token_mask": np.ones((1, len(merged)), bool),
            }, ["latents", "attention"])
            latents, attention = out["latents"], out["attention"]
        timings["resampler"] = _ms(t0)
        return Compressed(latents, attention[0], merged.assignment.astype(np.int64, copy=False))

    def _context(self, source: str, ff: FeatureFile, comp: Compressed, cache_hit: bool, tiles_read: int,
                 timings: dict) -> SlideContext:
        return SlideContext(source, comp.latents, len(ff.features), comp.tokens, cache_hit, tiles_read, timings,
                            comp.attention, comp.assignment, np.asarray(ff.coords), int(ff.patch_size_level0),
                            spatial=ff.spatial, trust=slide_trust(self.trust, ff.features))

    def read_feature_file(self, path: str | os.PathLike) -> FeatureFile:
        """A TRIDENT/CLAM h5 or a SlideChat CSV, checked against this bundle's tile encoder before its data is read:
        the name (any alias of a registered encoder: encoders.same_encoder; an h5 naming none is refused) and the
        width. A file without tile positions (a SlideChat CSV) is answered from with one warning per file."""
        ff = read_features(path, expect_dim=self.cfg.feature_dim, expect_encoder=self.cfg.tile_encoder.name)
        if not ff.spatial and str(path) not in self._warned:
            self._warned.add(str(path))
            width = ff.features.shape[1]
            unnamed = "" if ff.encoder else f"; it names no encoder: only its width ({width}) was checked"
            warn(f"{path}: no tile coordinates in this file: STM merges no tiles (their adjacency is unknown) and the "
                 f"evidence names rows of the file, not slide positions (no heatmap){unnamed}")
        return ff

    def prepare(self, slide: str | os.PathLike, mpp_override: float | None = None, progress=None,
                keep_features: bool = False, digest: str | None = None, check=None,
                cached_only: bool = False) -> SlideContext:
        """Latents for a slide file, a DICOM series folder or a feature file (TRIDENT/CLAM .h5, SlideChat .csv), from
        memory or cache when possible. `progress`: a terminal bar (True/False/None = when on a terminal) or
        callable(done, total). `keep_features`: also return the tile features (a batch run writes them out).
        `digest`: the slide's content digest when the caller has just computed it from the file
        (`SlideCache.content_hash`), so it is not read a second time. `slide` may be a wsi.identity.PinnedFile (a
        file opened and checked by the caller: a service's registered slide): every read below goes to that open
        file. `check()`: called between tile batches; it raises to stop the ingestion (cancel, time bound).
        `cached_only`: answer from memory or the slide cache only (the content digest from its memo, never read
        again), else raise NotPrepared: no tile is read and no encoder runs."""
        path = Path(os.fspath(slide))  # what is read (a pinned file's /proc/self/fd entry)
        name = str(slide)  # what messages and the answer call it
        timings: dict[str, float] = {}
        if Path(name).suffix.lower() in FEATURE_SUFFIXES:
            if cached_only:
                raise NotPrepared(f"{name}: a feature file is compressed when it is prepared, not from the cache")
            ff = self.read_feature_file(path)
            ctx = self._context(str(path), ff, self.compress(ff, timings), False, 0, timings)
            return dataclasses.replace(ctx, features=ff) if keep_features else ctx
        t0 = time.perf_counter()
        check_slide_file(slide if isinstance(slide, PinnedFile) else path)
        fprint = fingerprint(path)
        computed = digest is not None
        if not computed:
            digest = self.cache.memo_digest(path) if self.cache else None
        key = f"{file_identity(path)}|{fprint}|{mpp_override!r}"
        with self._memory_lock:
            known = self._memory.get(key)
            if known is not None and not keep_features:
                self._memory.move_to_end(key)
                return known.again({"hash": _ms(t0)})
        hit = self.cache.get(entry_name(digest, mpp_override), fprint) if digest and self.cache else None
        if hit is None and cached_only:
            raise NotPrepared(f"{name}: this slide is not prepared (not in memory or in the slide cache)")
        if hit is None and self.cache and not computed:
            digest = self.cache.content_hash(path)  # a memo miss, or a memo the entry does not confirm
            hit = self.cache.get(entry_name(digest, mpp_override), fprint)
        timings["hash"] = _ms(t0)
        if hit is not None:
            timings["cache_read"] = timings["hash"]
            comp = Compressed(hit.latents, hit.attention, hit.assignment)
            ctx = self._remember(key, self._context(name, hit.features, comp, True, 0, timings))
            return dataclasses.replace(ctx, features=hit.features) if keep_features else ctx
        ff, tiles, timings = self._encode_slide(slide if isinstance(slide, PinnedFile) else path, mpp_override,
                                                progress, timings, check)
        comp = self.compress(ff, timings)
        if self.cache:
            self.cache.put(entry_name(digest, mpp_override), fprint, ff, comp,
                           {"tiles": tiles, "tokens": comp.tokens, "slide": name})
        ctx = self._remember(key, self._context(name, ff, comp, False, tiles, timings))
        return dataclasses.replace(ctx, features=ff) if keep_features else ctx

    def plan_tiles(self, slide) -> TilePlan:
        """Tissue and tile grid of an open slide at this bundle's tile size and resolution."""
        pp = self.manifest.preprocessing
        return plan_tiles(slide, GridConfig(target_mpp=pp.target_mpp, tile_size=pp.tile_size, min_tissue=pp.min_tissue),
                          TissueConfig(mask_mpp=pp.tissue_mask_mpp))

    def _encode_slide(self, path, mpp_override, progress, timings: dict, check=None) -> tuple[FeatureFile, int, dict]:
        t0 = time.perf_counter()
        with open_slide(path, mpp_override=mpp_override) as s:
            timings["open"] = _ms(t0)
            if check is not None:
                check()
            plan = self.plan_tiles(s)
            timings["tissue_grid"] = round(plan.seconds * 1000, 2)
            t0 = time.perf_counter()
            ff, st = extract_features(s, self.encode_tiles, plan, self.cfg.tile_encoder.name,
                                      batch_size=self.tile_batch, workers=self.reader_workers, progress=progress,
                                      check=check)
            timings["tiles_encode"] = _ms(t0)
            timings["tile_read_wait"] = round(st.read_s * 1000, 2)
            timings["encode"] = round(st.encode_s * 1000, 2)
        return ff, st.tiles, timings

    def _remember(self, key: str, ctx: SlideContext) -> SlideContext:
        if self.memory_slides:
            with self._memory_lock:
                self._memory[key] = ctx
                self._memory.move_to_end(key)
                while len(self._memory) > self.memory_slides:
                    self._memory.popitem(last=False)
        return ctx

    def forget_slides(self) -> None:
        """Drop every slide held in memory (the disk cache is untouched)."""
        with self._memory_lock:
            self._memory.clear()

    # -- per question ------------------------------------------------------------------
    def evidence(self, ctx: SlideContext, qkv: QuestionKV) -> Evidence:
        """The tiles that weighed most for this question (runtime/evidence.py), over the slide's tile grid."""
        return Evidence(ctx.coords, ctx.tile_size_level0,
                        tile_weights(ctx.attention, qkv.selected, qkv.scores, ctx.assignment), spatial=ctx.spatial)

    def question_ids(self, question: str) -> list[int]:
        """The TIS graph's view of the question: its tokens without the chat template."""
        return self.tokenizer.encode(question.strip(), add_special_tokens=False).ids

    def prompt_ids(self, question: str) -> list[int]:
        """The decoder's prompt: the question through the bundle's chat template."""
        return self.tokenizer.encode(self.chat_template.render(question), add_special_tokens=False).ids

    def question_kv(self, latents: np.ndarray, question: "str | Question", timings: dict | None = None) -> QuestionKV:
        """The TIS graph's scores, the top-M latents and their cross K/V for one question."""
        timings = timings if timings is not None else {}
        ids = list(question.tis_ids) if isinstance(question, Question) else self.question_ids(question)
        if not ids:
            raise LocpathError("the question is empty")
        t0 = time.perf_counter()
        scores = self.runners[names.TIS].run({"latents": latents, "question_ids": np.asarray([ids], np.int64),
                                              "question_mask": np.ones((1, len(ids)), np.int64)}, ["scores"])["scores"]
        m = self.cfg.tis.top_m
        # top-M in the runtime (not in the graph): highest scores, kept in latent order, scaled by sigmoid(score)
        idx = np.sort(np.argsort(-scores[0], kind="stable")[:m])
        sel = latents[:, idx] * (1.0 / (1.0 + np.exp(-scores[:, idx])))[..., None]
        timings["tis"] = _ms(t0)
        t0 = time.perf_counter()
        cross = self.runners[names.CROSS_KV].run({"selected_latents": sel.astype(np.float32)})
        timings["cross_kv"] = _ms(t0)
        return QuestionKV(cross, idx, scores[0])

    def sampling(self, **overrides) -> SamplingParams:
        """The bundle's generation defaults with `overrides` (None = keep), validated."""
        g = self.manifest.generation
        base = dict(max_new_tokens=g.max_new_tokens, do_sample=g.do_sample, temperature=g.temperature, top_k=g.top_k,
                    top_p=g.top_p, repetition_penalty=g.repetition_penalty)
        unknown = set(overrides) - set(SamplingParams.__dataclass_fields__)
        if unknown:
            raise ConfigError(f"unknown sampling options {sorted(unknown)}")
        base.update({k: v for k, v in overrides.items() if v is not None})
        return SamplingParams(**base).validate()

    # -- answering -----------------------------------------------------------------------
    def question(self, text: str, abstain_below: float | None = None, **sampling) -> Question:
        """`text` checked once, with its prompt and TIS ids and its sampling options (the bundle's defaults with
        `sampling`), before anything runs: a LocpathError if it is not text, empty, or does not fit the KV cache.
        `abstain_below` (0..1): the answer reads "uncertain" when its confidence is below it (runtime/trust.py)."""
        if abstain_below is not None:
            if isinstance(abstain_below, bool) or not isinstance(abstain_below, (int, float)) \
                    or not 0.0 <= abstain_below <= 1.0:
                raise ConfigError(f"abstain_below must be a number from 0 to 1, got {abstain_below!r}")
            abstain_below = float(abstain_below)
        return dataclasses.replace(self._question(text, self.sampling(**sampling)), abstain_below=abstain_below)

    def _question(self, text: str, params: SamplingParams) -> Question:
        return make_question(text, params, self.prompt_ids, self.question_ids, self.max_length)

    def _as_question(self, q: "str | Question", sampling: dict) -> Question:
        if isinstance(q, Question):
            if sampling:
                raise ConfigError("a Question carries its own sampling options: pass them to pipe.question(...)")
            return q
        return self.question(q, **sampling)

    def answer(self, ctx: SlideContext, questions: "Sequence[str | Question]", *, on_piece=None, on_answer=None,
               **sampling) -> list[Answer]:
        """Questions about one prepared slide, decoded as one batch (at most `options.decode_batch` rows; a row freed
        by a finished answer takes the next question); answers equal one-by-one answers, in question order. The
        first answer carries the slide's preparation timings and cache state. `on_piece(index, text)`: each piece as
        it is decoded; `on_answer(index, Answer)`: each answer as it ends."""
        if isinstance(questions, (str, Question)):
            raise ConfigError("answer() takes a list of questions; stream() answers one")
        qs = [self._as_question(q, sampling) for q in questions]
        return self._decode([(ctx if i == 0 else ctx.again({}), q) for i, q in enumerate(qs)], on_piece, on_answer)

    def _decode(self, jobs: list, on_piece, on_answer) -> list[Answer]:
        if not jobs:
            return []
        t_start = time.perf_counter()
        return self.batch(min(self.max_batch, len(jobs))).run(jobs, on_piece, on_answer, t_start)

    def stream(self, ctx: SlideContext, question: "str | Question", *, t_start: float | None = None,
               **sampling) -> StreamedAnswer:
        """One question about a prepared slide: iterate for its text pieces as they are decoded, then `.result`.
        `t_start`: when the request began (its time to first token counts from there; default now)."""
        t_start = t_start if t_start is not None else time.perf_counter()
        q = self._as_question(question, sampling)
        return StreamedAnswer(self.batch(1).pieces(ctx, q, t_start), q)

    def ask(self, slide, question: "str | Question | Sequence[str | Question]", *, mpp_override: float | None = None,
            progress: bool | None = None, on_piece=None, on_answer=None, **sampling) -> "Answer | list[Answer]":
        """Prepare the slide (tiles read and encoded at most once), then answer: one question gives an Answer, a
        list of them a list of Answers (decoded as one batch, see `answer`). Every question and option is checked
        before the slide is touched; the time to first token counts from this call."""
        t_start = time.perf_counter()
        one = isinstance(question, (str, Question))
        qs = [self._as_question(q, sampling) for q in ([question] if one else question)]
        ctx = self.prepare(slide, mpp_override=mpp_override, progress=progress)
        if not one:
            return self.answer(ctx, qs, on_piece=on_piece, on_answer=on_answer)
        s = self.stream(ctx, qs[0], t_start=t_start)
        for piece in s:
            if on_piece is not None:
                on_piece(0, piece)
        return s.result

    def batch(self, rows: int | None = None) -> "AnswerBatch":
        """Answers decoded together, added while others decode (`add(ctx, Question, tag, t_start)`, `step()`,
        `cancel(tag)`): runtime/answer_batch.py."""
        from .answer_batch import AnswerBatch

        return AnswerBatch(self, rows or self.max_batch)

    # -- for measurements (bench/): one answer driven by hand, with forced steps and first-token timings ----------
    def generator(self, qkv: QuestionKV, question: str, params: SamplingParams,
                  stats: GenerationStats | None = None) -> OneAnswer:
        """One answer with its prompt prefilled, driven by hand (bench/: forced steps, first-token timings)."""
        q = self._question(question, params)
        stats = stats if stats is not None else GenerationStats()
        gen = Generator(self.decoder_state, 1, self.max_length, self.stop_ids)
        return OneAnswer(gen, gen.add(qkv.cross, q.prompt_ids, params, stats), stats)

