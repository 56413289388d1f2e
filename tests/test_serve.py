"""`locpath serve` as its users meet it: a real uvicorn process on a loopback port, real HTTP clients (httpx, the
official `openai` client), a real SQLite file, a real DICOMweb server (Orthanc, where installed) and a real browser
(Chromium through Playwright, where installed)."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

httpx = pytest.importorskip("httpx")
pytest.importorskip("fastapi")

from servers import Server, browser_api, dicomize, free_port, launch_chromium, register, sse, wait_ready  # noqa: E402

Q = "What is the diagnosis?"


@pytest.fixture(scope="module")
def roots(tmp_path_factory, eval_slide, real_svs):
    root = tmp_path_factory.mktemp("slide-root")
    shutil.copy(eval_slide, root / "case.svs")
    shutil.copy(real_svs, root / "cmu.svs")
    return root


@pytest.fixture(scope="module", params=["local", "ray"])
def server(request, ref_bundle, roots, tmp_path_factory):
    """The same API tests run against `locpath serve` and `locpath serve --ray` (two Ray Serve replicas on a local
    cluster, the job store in PostgreSQL where it is installed, else SQLite)."""
    extra = ["--slide-root", roots]
    env = {}
    if request.param == "ray":
        pytest.importorskip("ray.serve")
        extra += ["--ray", "--replicas", "2", "--cpus-per-replica", "0.5", "--threads", "1"]
        env = {"RAY_USAGE_STATS_ENABLED": "0"}
        try:
            extra += ["--database", request.getfixturevalue("postgres_database")()]
        except pytest.skip.Exception:
            pass
    s = Server(ref_bundle, tmp_path_factory.mktemp(f"serve-{request.param}"), *extra, env=env).start()
    yield s
    s.stop()


@pytest.fixture(scope="module")
def expected(ref_bundle, roots):
    """What `locpath ask` answers (the CLI, in its own process)."""
    out = subprocess.run([sys.executable, "-m", "locpath.cli", "ask", str(ref_bundle), str(roots / "case.svs"), Q,
                          "Which organ is this?", "--json", "--no-cache"], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    return {a["question"]: a for a in json.loads(out.stdout)["answers"]}


# -- the APIs --------------------------------------------------------------------------------------------------------
def test_register_by_path_and_answer_through_both_apis(server, roots, expected):
    openai = pytest.importorskip("openai")
    with server.client() as c:
        s = register(c, roots / "case.svs")
        assert s["status"] == "ready" and s["tiles"] == expected[Q]["slide"]["tiles"]
        r = c.post(f"/v1/slides/{s['id']}/questions", json={"question": Q})
        assert r.status_code == 200, r.text
        a = r.json()
        assert a["answer"] == expected[Q]["answer"] and a["slide"]["cache_hit"]
        assert a["evidence"]["top"] and sum(t["weight"] for t in a["evidence"]["top"]) <= 1.0 + 1e-4  # rounded
        job = c.get(f"/v1/jobs/{a['job']}").json()
        assert job["status"] == "done" and job["result"]["answer"] == a["answer"]  # stored in the database
        r = c.post(f"/v1/slides/{s['id']}/questions", json={"question": "Which organ is this?", "stream": True})
        events = sse(r.text)
        pieces = "".join(json.loads(d)["text"] for e, d in events if e == "piece")
        done = [json.loads(d) for e, d in events if e == "done"][0]
        assert pieces.strip() == done["answer"] == expected["Which organ is this?"]["answer"]
    client = openai.OpenAI(base_url=server.url + "/v1", api_key="unused")
    msg = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": f"slide:{s['id']}"}},
                                        {"type": "text", "text": Q}]}]
    res = client.chat.completions.create(model="locpath", messages=msg)
    assert res.choices[0].message.content == expected[Q]["answer"] and res.usage.completion_tokens >= 1
    stream = client.chat.completions.create(model="locpath", messages=msg, stream=True)
    text = "".join(ch.choices[0].delta.content or "" for ch in stream)
    assert text.strip() == expected[Q]["answer"]
    assert [m.id for m in client.models.list()] == ["locpath"]


def test_register_by_upload(server, roots, expected):
    with server.client() as c:
        data = (roots / "case.svs").read_bytes()
        r = c.post("/v1/slides/upload", params={"filename": "../../escape me.svs"}, content=data)
        assert r.status_code == 202, r.text
        body = r.json()
        assert body["slide"]["name"] == "escape_me.svs"
        s = wait_ready(c, body["slide"]["id"])
        assert s["status"] == "ready" and s["tiles"] == expected[Q]["slide"]["tiles"]
        a = c.post(f"/v1/slides/{s['id']}/questions", json={"question": Q}).json()
        assert a["answer"] == expected[Q]["answer"]
        uploads = list((server.work / "data" / "uploads").rglob("*"))
        assert [p.name for p in uploads if p.is_file()] == ["escape_me.svs"]


def test_bad_requests_get_a_clear_4xx_and_store_nothing(server, roots, tmp_path):
    outside = tmp_path / "outside.svs"
    shutil.copy(roots / "case.svs", outside)
    link = roots / "link.svs"
    link.symlink_to(outside)
    try:
        with server.client() as c:
            ready = register(c, roots / "cmu.svs")
            before = c.get("/v1/slides").json()["slides"]
            uploads = sorted(p.name for p in (server.work / "data" / "uploads").iterdir())
            cases = [
                (c.post("/v1/slides", json={"path": str(outside)}), 404, "no such slide"),
                (c.post("/v1/slides", json={"path": str(link)}), 404, "no such slide"),
                (c.post("/v1/slides", json={"path": str(roots / "none.svs")}), 404, "no such slide"),
                (c.post("/v1/slides", json={"path": str(roots)}), 400, "is a directory"),
                (c.post("/v1/slides", json={"path": "x", "dicomweb": {"study": "1", "series": "2"}}), 400, "exactly one"),
                (c.post("/v1/slides", json={"path": "x", "colour": "red"}), 400, "colour"),
                (c.post("/v1/slides", content=b"{not json", headers={"content-type": "application/json"}), 400, ""),
                (c.post(f"/v1/slides/{'0' * 16}/questions", json={"question": Q}), 404, "no slide"),
                (c.post("/v1/slides/nonsense/questions", json={"question": Q}), 404, "no slide"),
                (c.post("/v1/slides", content=b"x" * 100_000, headers={"content-type": "application/json"}), 413,
                 "exceeds"),
                (c.post("/v1/chat/completions", json={"model": "locpath", "messages": [{"role": "user", "content": Q}]}),
                 400, "no slide referenced"),
            ]
            for resp, status, words in cases:
                assert resp.status_code == status, (resp.status_code, resp.text)
                assert words in resp.json()["error"]["message"], resp.text
            for body, words in (({"question": ""}, "question"), ({"question": Q, "top_p": 3}, "top_p"),
                                ({"question": "word " * 1000}, "characters"), ({"question": Q, "max_new_tokens": 10**6},
                                                                               "does not fit")):
                r = c.post(f"/v1/slides/{ready['id']}/questions", json=body)
                assert r.status_code == 400 and words in r.json()["error"]["message"], r.text
            assert c.get("/v1/slides").json()["slides"] == before
            assert sorted(p.name for p in (server.work / "data" / "uploads").iterdir()) == uploads
    finally:
        link.unlink()


def test_oversized_upload_is_refused_and_leaves_nothing(ref_bundle, roots, tmp_path):
    with Server(ref_bundle, tmp_path, "--slide-root", roots, "--max-upload-mb", "0.5") as s, s.client() as c:
        big = (roots / "cmu.svs").read_bytes()  # 1.9 MB
        r = c.post("/v1/slides/upload", params={"filename": "big.svs"}, content=big)
        assert r.status_code == 413 and "exceeds" in r.json()["error"]["message"]

        def chunks():  # no Content-Length: refused while it streams in
            for i in range(0, len(big), 65536):
                yield big[i:i + 65536]

        r = c.post("/v1/slides/upload", params={"filename": "big.svs"}, content=chunks())
        assert r.status_code == 413
        assert c.get("/v1/slides").json()["slides"] == []
        assert not [p for p in (tmp_path / "data" / "uploads").rglob("*") if p.is_file()]


def test_api_keys_scopes_and_loopback_rule(ref_bundle, roots, tmp_path):
    env_data = ["--data-dir", str(tmp_path / "data")]
    run = lambda *a: subprocess.run([sys.executable, "-m", "locpath.cli", *a], capture_output=True,  # noqa: E731
                                    text=True, timeout=120)
    refused = run("serve", str(ref_bundle), "--host", "0.0.0.0", "--port", str(free_port()), *env_data)
    assert refused.returncode == 2 and "add an API key" in refused.stderr and "Traceback" not in refused.stderr
    reader = run("keys", "add", "reader", "--scopes", "read", *env_data)
    writer = run("keys", "add", "writer", *env_data)
    assert reader.returncode == writer.returncode == 0
    rtok, wtok = reader.stdout.strip(), writer.stdout.strip()
    db = (tmp_path / "data" / "locpath.db").read_bytes()
    assert rtok.encode() not in db and wtok.encode() not in db  # hashed at rest
    assert run("keys", "add", "reader", *env_data).returncode == 2
    s = Server(ref_bundle, tmp_path, "--slide-root", roots).start()
    try:
        with s.client() as anon, s.client("lp_wrong") as wrong, s.client(rtok) as r, s.client(wtok) as w:
            assert anon.get("/v1/slides").status_code == 401
            assert wrong.get("/v1/slides").status_code == 401
            assert r.get("/v1/slides").status_code == 200
            refused = r.post("/v1/slides", json={"path": str(roots / "case.svs")})
            assert refused.status_code == 403 and "submit" in refused.json()["error"]["message"]
            assert w.post("/v1/slides", json={"path": str(roots / "case.svs")}).status_code == 202
            assert anon.get("/healthz").status_code == 200
            assert anon.get("/metrics").status_code == 401 and r.get("/metrics").status_code == 200
        assert run("keys", "revoke", "writer", *env_data).returncode == 0
        with s.client(wtok) as w:
            assert w.get("/v1/slides").status_code == 401
    finally:
        s.stop()


def test_full_queue_answers_429_with_retry_after(ref_bundle, roots, tmp_path):
    with Server(ref_bundle, tmp_path, "--slide-root", roots, "--ingest-queue", "1") as s, s.client() as c:
        codes = [c.post("/v1/slides", json={"path": str(roots / n)}) for n in ("cmu.svs", "case.svs", "cmu.svs")]
        refused = [r for r in codes if r.status_code == 429]
        assert refused, [r.status_code for r in codes]
        assert int(refused[0].headers["Retry-After"]) >= 1
        assert len(c.get("/v1/slides").json()["slides"]) == 3 - len(refused)  # nothing stored for a 429
        metrics = c.get("/metrics").text
        assert 'locpath_rejected_total{lane="ingest"}' in metrics


def test_restart_mid_ingestion_resumes_and_finishes(ref_bundle, tmp_path):
    from locpath.synth import make_spec, write_slide

    root = tmp_path / "root"
    root.mkdir()
    big = write_slide(make_spec(55, tiles=(60, 60)), root / "big.tiff", fmt="tiff")
    s = Server(ref_bundle, tmp_path, "--slide-root", root).start()
    with s.client() as c:
        sid = c.post("/v1/slides", json={"path": str(big)}).json()["slide"]["id"]
        deadline = time.time() + 60
        while c.get(f"/v1/slides/{sid}").json()["status"] != "ingesting" and time.time() < deadline:
            time.sleep(0.05)
    s.stop(signal.SIGKILL)  # mid-ingestion, no chance to clean up
    s2 = Server(ref_bundle, tmp_path, "--slide-root", root)
    s2.port, s2.url = s.port, s.url
    s2.start()
    try:
        with s2.client() as c:
            done = wait_ready(c, sid)
            assert done["status"] == "ready" and done["tiles"] > 500
            (job,) = [j for j in c.get("/v1/jobs", params={"slide_id": sid}).json()["jobs"] if j["kind"] == "ingest"]
            assert job["status"] == "done" and job["attempts"] == 2
            assert c.post(f"/v1/slides/{sid}/questions", json={"question": Q}).status_code == 200
    finally:
        s2.stop()


def test_health_metrics_and_idempotent_submission(server, roots):
    with server.client() as c:
        assert c.get("/healthz").json() == {"status": "ok"} and c.get("/readyz").status_code == 200
        first = c.post("/v1/slides", json={"path": str(roots / "cmu.svs"), "client_key": "scanner-42"})
        again = c.post("/v1/slides", json={"path": str(roots / "cmu.svs"), "client_key": "scanner-42"})
        assert first.status_code == 202 and again.status_code == 200 and again.json()["existing"]
        assert again.json()["slide"]["id"] == first.json()["slide"]["id"]
        s = wait_ready(c, first.json()["slide"]["id"])
        body = {"question": Q, "client_key": "q-1"}
        a1 = c.post(f"/v1/slides/{s['id']}/questions", json=body).json()
        a2 = c.post(f"/v1/slides/{s['id']}/questions", json=body).json()
        assert a1["answer"] == a2["answer"] and a1["timings_ms"] == a2["timings_ms"]  # the stored answer, not a new one
        m = c.get("/metrics").text
        for name in ("locpath_queue_depth", "locpath_jobs", "locpath_time_to_first_token_seconds_bucket",
                     "locpath_answer_seconds_count", "locpath_slide_cache_lookups_total",
                     "locpath_ingest_tiles_per_second"):
            assert name in m, name
        png = c.get(s["thumbnail"])
        assert png.status_code == 200 and png.content[:4] == b"\x89PNG"
        heat = c.get(s["thumbnail"], params={"evidence": a1["job"]})
        assert heat.status_code == 200 and heat.content[:4] == b"\x89PNG" and heat.content != png.content


# -- DICOM in: a real DICOMweb server (the `orthanc` fixture is in conftest.py) -----------------------------------
def test_register_by_dicomweb_uid(ref_bundle, roots, orthanc, tmp_path):
    study, series, files = dicomize(roots / "cmu.svs", tmp_path / "dicom")
    for f in files:
        assert httpx.post(orthanc + "/instances", content=f.read_bytes(), timeout=60).status_code == 200
    from locpath.runtime.pipeline import Pipeline

    local = Pipeline.from_bundle(ref_bundle, use_cache=False).ask(tmp_path / "dicom", Q)  # the series read locally
    with Server(ref_bundle, tmp_path, "--dicomweb", orthanc + "/dicom-web") as s, s.client() as c:
        bad = c.post("/v1/slides", json={"dicomweb": {"study": "../../etc", "series": series}})
        assert bad.status_code == 400 and "DICOM UID" in bad.json()["error"]["message"]
        r = c.post("/v1/slides", json={"dicomweb": {"study": study, "series": series}})
        assert r.status_code == 202, r.text
        slide = wait_ready(c, r.json()["slide"]["id"])
        assert slide["status"] == "ready" and slide["tiles"] == local.slide["tiles"]
        a = c.post(f"/v1/slides/{slide['id']}/questions", json={"question": Q}).json()
        assert a["answer"] == local.answer
        missing = c.post("/v1/slides", json={"dicomweb": {"study": study, "series": "1.2.3"}}).json()["slide"]
        failed = wait_ready(c, missing["id"])
        assert failed["status"] == "failed" and "cannot retrieve series 1.2.3" in failed["error"]


# -- the page, in a real browser --------------------------------------------------------------------------------------
def test_web_page_streams_an_answer_in_chromium(server, roots, expected, tmp_path):
    sync_api, chromium = browser_api()
    with server.client() as c:
        register(c, roots / "case.svs")
    with sync_api.sync_playwright() as p:
        browser = launch_chromium(p, chromium)
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 800})
            page.goto(server.url + "/")
            page.wait_for_selector("#slides li[data-status=ready]", timeout=30000)
            page.click("#slides li[data-status=ready] >> text=case.svs")
            page.wait_for_selector("#question:not([disabled])")
            page.fill("#question", Q)
            page.click("#ask-button")
            page.wait_for_selector("#answer[data-state=done]", timeout=60000)
            assert page.inner_text("#answer").strip() == expected[Q]["answer"]
            assert "time to first token" in page.inner_text("#timings")
            assert "confidence " in page.inner_text("#trust")  # the answer's trust field, shown beside it
            page.wait_for_selector("#view-image[data-evidence]", timeout=60000)  # the evidence heatmap loaded
            page.wait_for_load_state("networkidle")
            page.wait_for_timeout(500)
            assert page.get_attribute("#view-image", "data-evidence"), "a late thumbnail covered the heatmap"
            page.screenshot(path=str(tmp_path / "page.png"), full_page=True)
            shots = os.environ.get("LOCPATH_SCREENSHOTS")
            if shots:
                shutil.copy(tmp_path / "page.png", Path(shots) / "serve-page.png")
        finally:
            browser.close()


# -- load -------------------------------------------------------------------------------------------------------------
def _rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def test_concurrent_clients_while_slides_ingest(ref_bundle, roots, tmp_path):
    """8 clients ask questions about 3 ready slides while more slides are ingested: no error, no lost answer, every
    answer as asked alone, RSS flat. LOCPATH_LOAD_QUESTIONS sets the questions per client (10 here; 100 for the
    numbers in the closing note)."""
    import asyncio

    from locpath.synth import make_spec, write_slide

    per_client = int(os.environ.get("LOCPATH_LOAD_QUESTIONS", "10"))
    for i in range(4):
        write_slide(make_spec(800 + i, tiles=(24, 24)), roots / f"extra{i}.svs")
    s = Server(ref_bundle, tmp_path, "--slide-root", roots, "--question-queue", "64").start()
    try:
        with s.client() as c:
            ready = [register(c, roots / n)["id"] for n in ("case.svs", "cmu.svs")]
            ready.append(register(c, roots / "extra3.svs")["id"])
            questions = ["What is the diagnosis?", "Is necrosis present?", "Which organ is this?"]
            want = {(sid, q): c.post(f"/v1/slides/{sid}/questions", json={"question": q}).json()["answer"]
                    for sid in ready for q in questions}
            rss_before = _rss_mb(s.proc.pid)

        async def client(k: int, ac):
            out = []
            for n in range(per_client):
                sid, q = ready[(k + n) % 3], questions[n % 3]
                t0 = time.perf_counter()
                async with ac.stream("POST", f"/v1/slides/{sid}/questions", json={"question": q, "stream": True}) as r:
                    assert r.status_code == 200
                    first, text = None, ""
                    async for line in r.aiter_lines():
                        if line.startswith("data:") and first is None:
                            first = time.perf_counter() - t0
                        text += line + "\n"
                done = [json.loads(d) for e, d in sse(text) if e == "done"]
                out.append((sid, q, done[0]["answer"] if done else None, first,
                            done[0]["generation"]["decoded_with"] if done else 0))
            return out

        async def main():
            async with httpx.AsyncClient(base_url=s.url, timeout=120) as ac:
                ingest = [await ac.post("/v1/slides", json={"path": str(roots / f"extra{i}.svs")}) for i in range(3)]
                results = await asyncio.gather(*[client(k, ac) for k in range(8)])
                return ingest, [r for rs in results for r in rs]

        ingest, results = asyncio.run(main())
        assert all(r.status_code == 202 for r in ingest)
        assert len(results) == 8 * per_client and all(a == want[(sid, q)] for sid, q, a, _, _ in results)
        # the clients' questions shared decoder steps (continuous batching), and still answered as asked alone
        assert max(r[4] for r in results) > 1, [r[4] for r in results]
        ttft = sorted(r[3] for r in results)
        with s.client() as c:
            for r in ingest:
                assert wait_ready(c, r.json()["slide"]["id"])["status"] == "ready"
        growth = _rss_mb(s.proc.pid) - rss_before
        report = {"questions": len(results), "ttft_p50_ms": round(1000 * ttft[len(ttft) // 2], 1),
                  "ttft_p95_ms": round(1000 * ttft[int(len(ttft) * 0.95) - 1], 1), "rss_growth_mb": round(growth, 1)}
        print("load:", json.dumps(report))
        assert growth < 200, report  # ~120-160 MB measured with trust (OOD references) and the viewer loaded
    finally:
        s.stop()


# -- on Ray Serve -------------------------------------------------------------------------------------------------------
def test_ray_replicas_share_the_job_store_and_the_slide_cache(server, roots, expected):
    """Under `serve --ray` a slide ingested by one replica is answered by both, from the shared slide cache, and the
    jobs are owned by the replicas in the shared database."""
    if "--ray" not in server.extra:
        pytest.skip("a Ray Serve deployment only")
    with server.client() as c:
        slide = register(c, roots / "case.svs")
        seen = set()
        for _ in range(12):
            r = c.post(f"/v1/slides/{slide['id']}/questions", json={"question": Q})
            assert r.status_code == 200, r.text
            assert r.json()["answer"] == expected[Q]["answer"] and r.json()["slide"]["cache_hit"]
            seen.add(r.headers["X-Locpath-Instance"])
        deadline = time.time() + 30
        while len(seen) < 2 and time.time() < deadline:
            seen.add(c.get("/readyz").json()["instance"])
        assert len(seen) == 2 and all(i.startswith("ray:") for i in seen), seen
    import sqlalchemy as sa

    url = server.extra[server.extra.index("--database") + 1] if "--database" in server.extra else \
        f"sqlite:///{server.work / 'data' / 'locpath.db'}"
    with sa.create_engine(url).connect() as conn:
        owners = {row[0] for row in conn.execute(sa.text("SELECT owner FROM jobs WHERE owner IS NOT NULL"))}
    assert owners and all(o.startswith("ray:") for o in owners)
