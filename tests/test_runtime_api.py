"""The runtime's API on the shipped bundle (torch-free, fast): RuntimeOptions checks, the one decoding loop against
DecoderState.greedy, prepare(cached_only=True), a question about a prepared slide reads no tile, a non-finite row
fails alone on both decoder graphs, cancel frees a row, a Question is checked once."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from locpath.checkpoints import shipped_bundle
from locpath.errors import ConfigError, LocpathError
from locpath.runtime.generator import Generator
from locpath.runtime.options import RuntimeOptions
from locpath.runtime.pipeline import NotPrepared, Pipeline
from locpath.runtime.question import Question

QS = ["What is the diagnosis?", "Is necrosis present?", "What organ is this tissue from?", "Describe this slide."]


@pytest.fixture(scope="module")
def bundle():
    b = shipped_bundle()
    if not (b / "manifest.json").exists():
        pytest.skip("the shipped bundle is not present")
    return b


@pytest.fixture(scope="module")
def pipes(bundle, tmp_path_factory):
    cache = tmp_path_factory.mktemp("cache")
    out = {d: Pipeline.from_bundle(bundle, RuntimeOptions(decoder=d, decode_batch=4, cache_dir=str(cache)))
           for d in ("fused", "plain")}
    yield out
    for p in out.values():
        p.release()


@pytest.fixture(scope="module")
def ctx(pipes, small_svs):
    return pipes["fused"].prepare(small_svs)


@pytest.mark.parametrize("changes, line", [
    (dict(device="tpu"), "unknown device 'tpu' (choose from cpu, cuda, tensorrt)"),
    (dict(decoder="fast"), "unknown decoder 'fast' (choose from auto, fused, plain)"),
    (dict(decode_batch=0), "decode_batch must be an integer >= 1, got 0"),
    (dict(threads=True), "threads must be an integer >= 1, got True"),
    (dict(memory_slides=-1), "memory_slides must be an integer >= 0, got -1"),
    (dict(tile_batch="8"), "tile_batch must be an integer >= 1, got '8'"),
    (dict(decode_btach=2), "unknown runtime options ['decode_btach']"),
])
def test_runtime_options_refuse_bad_values_in_one_line(changes, line):
    with pytest.raises(ConfigError) as e:
        RuntimeOptions().replace(**changes)
    assert str(e.value) == line and "\n" not in str(e.value)


@pytest.mark.parametrize("decoder", ["fused", "plain"])
def test_greedy_run_equals_the_generators_greedy_tokens(pipes, ctx, decoder):
    pipe = pipes[decoder]
    for text in QS:
        q = pipe.question(text, max_new_tokens=12)
        cross = pipe.question_kv(ctx.latents, q).cross
        want = pipe.decoder_state.greedy(q.prompt_ids, cross, 12, stop_ids=pipe.stop_ids).tokens
        gen = Generator(pipe.decoder_state, 1, pipe.max_length, pipe.stop_ids)
        gen.add(cross, q.prompt_ids, q.params)
        got = []
        while gen.active:
            got += [t for _, t in gen.step() if t is not None]
        assert got == want
        assert pipe.answer(ctx, [q])[0].token_ids == want


def test_cached_only_raises_not_prepared_then_answers_from_memory_or_cache(bundle, small_tiff, tmp_path,
                                                                           monkeypatch):
    cache = str(tmp_path / "cache")
    pipe = Pipeline.from_bundle(bundle, cache_dir=cache)
    with pytest.raises(NotPrepared, match="this slide is not prepared"):
        pipe.prepare(small_tiff, cached_only=True)
    first = pipe.prepare(small_tiff)
    assert first.tiles_read > 0
    _no_tiles(monkeypatch)
    mem = pipe.prepare(small_tiff, cached_only=True)  # from memory
    disk = Pipeline.from_bundle(bundle, cache_dir=cache).prepare(small_tiff, cached_only=True)  # from the cache
    assert mem.cache_hit and disk.cache_hit and mem.tiles_read == disk.tiles_read == 0
    assert np.array_equal(mem.latents, first.latents) and np.array_equal(disk.latents, first.latents)


def _no_tiles(monkeypatch):
    import locpath.wsi.reader as reader

    def no_tiles(self):
        raise AssertionError("a tile was read")

    monkeypatch.setattr(reader.TileReader, "__iter__", no_tiles)


def test_a_question_about_a_prepared_slide_reads_no_tile(pipes, ctx, monkeypatch):
    pipe = pipes["fused"]
    _no_tiles(monkeypatch)
    s = pipe.stream(ctx, QS[0])
    pieces = list(s)
    assert "".join(pieces).strip() == s.result.answer and s.result.token_ids
    assert s.result.slide["tiles"] == ctx.tiles
    many = pipe.answer(ctx, QS)
    assert [a.question for a in many] == QS and many[0].token_ids == s.result.token_ids


@pytest.mark.parametrize("decoder", ["fused", "plain"])
def test_a_non_finite_row_fails_alone_while_the_others_finish(pipes, ctx, decoder):
    """NaN latents for one question: that answer ends with its error, the others answer as they do alone, on the
    shared cache (fused) and on per-row caches stepped in turn (plain, where this raised out of the batch)."""
    pipe = pipes[decoder]
    alone = [pipe.answer(ctx, [q])[0].token_ids for q in QS[:3]]
    bad = dataclasses.replace(ctx, latents=np.full_like(ctx.latents, np.nan))
    batch = pipe.batch(3)
    assert batch.gen.shared == (decoder == "fused")
    for i, q in enumerate(QS[:3]):
        batch.add(bad if i == 1 else ctx, pipe.question(q), tag=i)
    answers, errors = {}, {}
    while batch.active:
        for ev in batch.step():
            if ev.answer is not None:
                answers[ev.tag] = ev.answer.token_ids
            elif ev.error is not None:
                errors[ev.tag] = ev.error
    assert answers == {0: alone[0], 2: alone[2]}
    assert list(errors) == [1] and "non-finite logits" in errors[1]
    with pytest.raises(LocpathError, match="non-finite logits"):
        pipe.answer(bad, [QS[1]])


@pytest.mark.parametrize("decoder", ["fused", "plain"])
def test_cancel_frees_a_row_for_the_next_question(pipes, ctx, decoder):
    pipe = pipes[decoder]
    want = pipe.answer(ctx, [QS[3]])[0].token_ids
    batch = pipe.batch(2)
    batch.add(ctx, pipe.question(QS[0], max_new_tokens=16), tag="a")
    batch.add(ctx, pipe.question(QS[1], max_new_tokens=16), tag="b")
    assert batch.free == 0
    assert batch.cancel("a") and not batch.cancel("a") and batch.free == 1
    batch.add(ctx, pipe.question(QS[3]), tag="c")
    got, tags = None, set()
    while batch.active:
        for ev in batch.step():
            tags.add(ev.tag)
            if ev.tag == "c" and ev.answer is not None:
                got = ev.answer.token_ids
    assert "a" not in tags and got == want


def test_a_question_is_checked_once_before_anything_runs(pipes, ctx, monkeypatch):
    pipe = pipes["fused"]
    q = pipe.question(QS[0], max_new_tokens=4)
    assert isinstance(q, Question) and q.params.max_new_tokens == 4 and q.prompt_ids and q.tis_ids
    import locpath.runtime.question as question

    calls = []
    real = question.make_question
    monkeypatch.setattr("locpath.runtime.pipeline.make_question", lambda *a: calls.append(a) or real(*a))
    pipe.ask(ctx.source, [QS[0], QS[1]])
    pipe.ask(ctx.source, QS[2])
    assert len(calls) == 3
    with pytest.raises(LocpathError, match="the question is empty"):
        pipe.question("   ")
    with pytest.raises(LocpathError, match="max_new_tokens 100000 does not fit"):
        pipe.question(QS[0], max_new_tokens=100000)
    with pytest.raises(ConfigError, match="carries its own sampling"):
        pipe.answer(ctx, [q], max_new_tokens=3)
