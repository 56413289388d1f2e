"""The service's routes in-process with a small fake pipeline (canned contexts and answers) and a real SQLite store in
tmp_path: status codes and the error table (serve/errors.py) without loading a model. The same app also runs under a
real uvicorn in a thread for the test of a client that leaves mid-answer."""

import asyncio
import sqlite3
import threading
import time
import types

import pytest

pytest.importorskip("fastapi")
httpx = pytest.importorskip("httpx")

from fastapi.testclient import TestClient  # noqa: E402

from locpath.errors import LocpathError  # noqa: E402
from locpath.runtime.answer_batch import BatchEvent  # noqa: E402
from locpath.runtime.pipeline import Answer, NotPrepared  # noqa: E402
from locpath.serve.app import create_app  # noqa: E402
from locpath.serve.config import ServeConfig  # noqa: E402
from locpath.serve.service import Service  # noqa: E402

Q = "What is the diagnosis?"
NAN = "the decoder produced non-finite logits (NaN or inf): the slide's latents or the decoder are broken"


class FakeBatch:
    """AnswerBatch's surface: add/cancel/step/free; `pipe.mode` says how the answers end."""

    def __init__(self, pipe):
        self.pipe, self.rows = pipe, {}

    @property
    def free(self) -> int:
        return 4 - len(self.rows)

    def add(self, ctx, question, tag=None, t_start=None):
        self.rows[tag] = (ctx, question)

    def cancel(self, tag):
        self.pipe.cancelled.append(tag)
        return self.rows.pop(tag, None) is not None

    def step(self):
        mode = self.pipe.mode
        if mode == "crash":
            raise RuntimeError("boom in /secret/server/folder")
        if mode == "slow":  # decodes for ever, a piece a step
            time.sleep(0.02)
            return [BatchEvent(tag, piece="x ") for tag in self.rows]
        events = []
        for tag, (ctx, question) in list(self.rows.items()):
            del self.rows[tag]
            if mode == "nan":
                events.append(BatchEvent(tag, error=NAN))
                continue
            events += [BatchEvent(tag, piece="squamous "), BatchEvent(tag, piece="carcinoma")]
            events.append(BatchEvent(tag, answer=Answer(
                question.text, "squamous carcinoma", [1, 2], {"decode": 1.0}, 1.0,
                {"source": ctx.source, "cache_hit": True, "tiles": 3},
                {"stop_reason": "eos", "prompt_tokens": 5, "new_tokens": 2})))
        return events


class FakePipeline:
    """Pipeline's surface the service calls: prepare (ingestion, or cached_only on the question lane), sampling,
    question, batch, release. `forget()` drops every prepared slide (evicted, cleaned, another replica)."""

    def __init__(self):
        self.mode, self.prepared, self.encoded, self.cancelled, self.lanes = "ok", set(), 0, [], set()

    def prepare(self, source, progress=None, check=None, cached_only=False, **kw):
        import os

        key = os.path.basename(os.fspath(source)) if not hasattr(source, "identity") else source.identity().to_json()
        if key not in self.prepared:
            if cached_only:
                raise NotPrepared(f"{source}: this slide is not prepared (not in memory or in the slide cache)")
            self.encoded += 1
            self.lanes.add(threading.current_thread().name)
            self.prepared.add(key)
        return types.SimpleNamespace(source=str(source), tiles=3, tokens=3, cache_hit=False, tiles_read=3,
                                     timings_ms={})

    def forget(self):
        self.prepared.clear()

    def sampling(self, **overrides):
        if (overrides.get("temperature") or 0) > 50:
            raise LocpathError("temperature is too hot for this fake")
        return overrides

    def question(self, text, **sampling):
        """A checked question (the real one is runtime/question.py's Question; the service only carries it)."""
        if len(text) > 500:
            raise LocpathError("the question is too long for the KV cache")
        return types.SimpleNamespace(text=text, params=self.sampling(**sampling))

    def batch(self):
        return FakeBatch(self)

    def release(self):
        pass


@pytest.fixture
def served(tmp_path):
    root = tmp_path / "root"
    root.mkdir()
    (root / "case.svs").write_bytes(b"II*\x00" + bytes(range(256)) * 64)
    cfg = ServeConfig(bundle=tmp_path / "bundle", data_dir=tmp_path / "data", slide_roots=[root], port=8123)
    pipe = FakePipeline()
    svc = Service(cfg, pipe=pipe)
    with TestClient(create_app(svc), base_url="http://127.0.0.1") as client:
        yield types.SimpleNamespace(c=client, svc=svc, pipe=pipe, root=root, cfg=cfg)


def ready_slide(s) -> str:
    r = s.c.post("/v1/slides", json={"path": str(s.root / "case.svs")})
    assert r.status_code == 202, r.text
    sid = r.json()["slide"]["id"]
    wait_status(s, sid, "ready")
    return sid


def wait_status(s, sid: str, *states, timeout: float = 10) -> dict:
    deadline = time.time() + timeout
    while time.time() < deadline:
        d = s.c.get(f"/v1/slides/{sid}").json()
        if d["status"] in states:
            return d
        time.sleep(0.02)
    raise AssertionError(f"slide {sid} never {states}: {d}")


def error(r, status: int, kind: str, words: str = "") -> dict:
    assert r.status_code == status, (r.status_code, r.text)
    body = r.json()
    assert set(body) == {"error"} and body["error"]["type"] == kind, body
    assert words in body["error"]["message"], body
    return body["error"]


def test_answers_as_json_sse_and_chat(served):
    sid = ready_slide(served)
    r = served.c.post(f"/v1/slides/{sid}/questions", json={"question": Q})
    assert r.status_code == 200 and r.json()["answer"] == "squamous carcinoma", r.text
    r = served.c.post(f"/v1/slides/{sid}/questions", json={"question": Q, "stream": True})
    assert "event: piece" in r.text and "event: done" in r.text and "squamous carcinoma" in r.text
    msg = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": f"slide:{sid}"}},
                                        {"type": "text", "text": Q}]}]
    r = served.c.post("/v1/chat/completions", json={"messages": msg})
    assert r.status_code == 200 and r.json()["choices"][0]["message"]["content"] == "squamous carcinoma"
    r = served.c.post("/v1/chat/completions", json={"messages": msg, "stream": True})
    assert r.text.rstrip().endswith("data: [DONE]") and '"finish_reason": "stop"' in r.text
    assert served.pipe.encoded == 1  # ingested once; the questions answered from what ingestion prepared


def test_client_errors_are_4xx(served):
    sid = ready_slide(served)
    c = served.c
    error(c.post(f"/v1/slides/{sid}/questions", json={"question": "x" * 600}), 400, "invalid_request_error",
          "too long for the KV cache")
    error(c.post(f"/v1/slides/{sid}/questions", json={"question": Q, "temperature": 60.0}), 400,
          "invalid_request_error", "too hot")
    error(c.post(f"/v1/slides/{'0' * 16}/questions", json={"question": Q}), 404, "not_found", "no slide")
    error(c.get("/v1/jobs/zzz"), 404, "not_found", "no job")
    error(c.post("/v1/slides", json={"path": str(served.root / "none.svs")}), 404, "not_found", "no such slide")
    error(c.post("/v1/slides", json={"path": str(served.root)}), 400, "invalid_request_error", "is a directory")
    error(c.post("/v1/chat/completions", json={"messages": []}), 400, "invalid_request_error", "non-empty")
    (served.root / "case.svs").unlink()
    error(c.post(f"/v1/slides/{sid}/questions", json={"question": Q}), 410, "gone", "file is gone")


def test_a_failed_decode_is_a_500_with_a_json_body(served):
    """Non-finite logits are the model's failure, not the client's: 500 inference_error (it was 400)."""
    sid = ready_slide(served)
    served.pipe.mode = "nan"
    e = error(served.c.post(f"/v1/slides/{sid}/questions", json={"question": Q}), 500, "inference_error",
              "non-finite logits")
    r = served.c.post(f"/v1/slides/{sid}/questions", json={"question": Q, "stream": True})
    assert "event: error" in r.text and "inference_error" in r.text
    jobs = served.c.get("/v1/jobs").json()["jobs"]
    assert any(j["status"] == "failed" and "non-finite" in (j["error"] or "") for j in jobs), e


def test_a_crashed_decoder_step_is_a_500_without_its_internals(served):
    sid = ready_slide(served)
    served.pipe.mode = "crash"
    e = error(served.c.post(f"/v1/slides/{sid}/questions", json={"question": Q}), 500, "inference_error",
              "the decoder failed")
    assert "secret" not in e["message"] and "boom" not in e["message"]
    served.pipe.mode = "ok"  # the lane survived with a fresh batch
    assert served.c.post(f"/v1/slides/{sid}/questions", json={"question": Q}).status_code == 200


def test_a_store_failure_is_a_503_with_a_json_body(served):
    ready_slide(served)
    with sqlite3.connect(served.cfg.data_dir / "locpath.db") as db:
        db.execute("DROP TABLE slides")
    e = error(served.c.get("/v1/slides"), 503, "store_unavailable", "job store is unavailable")
    assert "slides" not in e["message"]  # the database's own text stays in the log


def test_a_slide_whose_latents_are_gone_goes_back_to_ingestion(served):
    """The question lane never encodes: it answers 503 + Retry-After naming the slide, the slide is queued for
    ingestion again (its status shows it), and once ready again the question is answered."""
    sid = ready_slide(served)
    served.pipe.forget()
    r = served.c.post(f"/v1/slides/{sid}/questions", json={"question": Q})
    e = error(r, 503, "not_prepared", f"slide {sid} is not prepared")
    assert "being prepared again" in e["message"] and int(r.headers["retry-after"]) >= 1
    assert served.pipe.lanes == {"locpath-ingest"}  # encoded by the ingestion lane only, never the question lane
    wait_status(served, sid, "ready")
    ingests = served.c.get("/v1/jobs", params={"slide_id": sid}).json()["jobs"]
    assert sum(j["kind"] == "ingest" for j in ingests) == 2 and served.pipe.encoded == 2
    assert served.c.post(f"/v1/slides/{sid}/questions", json={"question": Q}).status_code == 200


def test_the_error_table():
    from locpath.serve.errors import describe
    from locpath.serve.slide_files import SlideEscaped, SlideGone
    from locpath.serve.store import StoreError
    from locpath.serve.worker import InferenceError, QueueFull, Reprepared
    from locpath.wsi.identity import SlideChanged

    cases = [(LocpathError("bad"), 400), (SlideEscaped("x"), 403), (SlideGone("x"), 410), (SlideChanged("x"), 409),
             (QueueFull("question", 3), 429), (InferenceError("nan"), 500), (StoreError("down"), 503),
             (Reprepared("abc", 7.2), 503), (NotPrepared("x"), 503), (KeyError("a bug"), 500)]
    for exc, status in cases:
        assert describe(exc).status == status, exc
    assert describe(QueueFull("question", 3)).headers == {"Retry-After": "3"}
    assert describe(Reprepared("abc", 7.2)).headers == {"Retry-After": "7"}
    assert describe(KeyError("secret")).message == "internal error (see the service log)"


def test_every_walk_cancels_its_question():
    """The streaming helper cancels the question however the walk ends: the client left (499), or the request's
    coroutine itself was cancelled while waiting."""
    from locpath.serve import streaming
    from locpath.serve.errors import ApiError
    from locpath.serve.worker import QuestionTask

    svc = types.SimpleNamespace(cfg=types.SimpleNamespace(question_timeout_s=30), server_paths=[])

    async def run(gone: bool):
        async def is_disconnected():
            return gone
        req = types.SimpleNamespace(state=types.SimpleNamespace(caller=types.SimpleNamespace(admin=True)),
                                    is_disconnected=is_disconnected)
        task = QuestionTask("j", "p", types.SimpleNamespace(text=Q), asyncio.get_running_loop(), asyncio.Queue())
        streaming.POLL_S = 0.05
        walk = asyncio.ensure_future(streaming.whole_answer(task, req, svc))
        await asyncio.sleep(0.2)
        if not gone:
            walk.cancel()
        with pytest.raises((ApiError, asyncio.CancelledError)):
            await walk
        return task.cancelled.is_set()

    try:
        assert asyncio.run(run(gone=True)) and asyncio.run(run(gone=False))
    finally:
        streaming.POLL_S = 0.5


def test_a_json_client_that_leaves_frees_its_decoder_row(served):
    """Through a real uvicorn: a JSON question whose client hangs up mid-answer is dropped from the decoding batch
    (its row freed) and its job cancelled."""
    import uvicorn

    from servers import free_port

    sid = ready_slide(served)
    served.pipe.mode = "slow"
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(create_app(served.svc), host="127.0.0.1", port=port, lifespan="off",
                                          log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    try:
        while not server.started:
            time.sleep(0.02)
        with pytest.raises(httpx.ReadTimeout):
            httpx.post(f"http://127.0.0.1:{port}/v1/slides/{sid}/questions", json={"question": Q}, timeout=1.0)
        deadline = time.time() + 10
        while not served.pipe.cancelled and time.time() < deadline:
            time.sleep(0.05)
        assert len(served.pipe.cancelled) == 1, "the decoder row was not freed"
        job = served.c.get(f"/v1/jobs/{served.pipe.cancelled[0]}").json()
        assert job["status"] == "cancelled"
    finally:
        server.should_exit = True
        thread.join(10)


def test_real_server_refuses_an_unprepared_slide_then_answers_it(tmp_path):
    """`locpath serve --memory-slides 0`: a ready slide whose slide-cache entry is deleted is not encoded on the
    question lane: 503 not_prepared with Retry-After at once, the slide re-ingested, then the same answer."""
    from locpath.synth import make_spec, write_slide
    from servers import Server, shipped, wait_ready

    root = tmp_path / "root"
    root.mkdir()
    slide = write_slide(make_spec(7, tiles=(12, 12)), root / "case.tiff", fmt="tiff")
    with Server(shipped(), tmp_path, "--slide-root", root, "--memory-slides", "0") as s, s.client() as c:
        r = c.post("/v1/slides", json={"path": str(slide)})
        sid = wait_ready(c, r.json()["slide"]["id"])["id"]
        first = c.post(f"/v1/slides/{sid}/questions", json={"question": Q})
        assert first.status_code == 200, first.text
        import shutil

        shutil.rmtree(tmp_path / "cache")  # evicted, cleaned, or written by another replica's cache folder
        t0 = time.monotonic()
        r = c.post(f"/v1/slides/{sid}/questions", json={"question": Q})
        e = error(r, 503, "not_prepared", f"slide {sid} is not prepared")
        assert "being prepared again" in e["message"] and int(r.headers["Retry-After"]) >= 1
        assert time.monotonic() - t0 < 5
        assert wait_ready(c, sid)["status"] == "ready"
        again = c.post(f"/v1/slides/{sid}/questions", json={"question": Q})
        assert again.status_code == 200 and again.json()["answer"] == first.json()["answer"], again.text
        kinds = [j["kind"] for j in c.get("/v1/jobs", params={"slide_id": sid}).json()["jobs"]]
        assert kinds.count("ingest") == 2 and kinds.count("question") == 3
