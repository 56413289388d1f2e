"""Who may read what in `locpath serve`, and what it leaves on disk: jobs and answers belong to the API key that
made them, non-admin keys never see the server's paths, keys count from the moment they are added, client_key
retries run again after a refusal or a restart, uploads are cleaned up and bounded by a per-key quota, and the
database file is checked (and private). Every test runs the real server (uvicorn in a subprocess) or the CLI."""

import json
import os
import shutil
import signal
import stat
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

httpx = pytest.importorskip("httpx")
pytest.importorskip("fastapi")

from servers import Server, cli, register, shipped, sse, wait_ready  # noqa: E402

SECRET = "PATIENT-SECRET-1234"
Q = "What is the diagnosis?"


def add_key(data: Path, name: str, scopes: str = "read,submit") -> str:
    out = cli("keys", "add", name, "--scopes", scopes, "--data-dir", data, timeout=60)
    assert out.returncode == 0, out.stderr
    return out.stdout.strip()


def restart(s: Server, *extra) -> Server:
    """A new server process on the same port and data (the same instance name, as after a crash)."""
    s2 = Server(s.bundle, s.work, *(extra or s.extra))
    s2.port, s2.url = s.port, s.url
    return s2.start()


@pytest.fixture(scope="module")
def root(tmp_path_factory, real_svs):
    r = tmp_path_factory.mktemp("slide-root")
    shutil.copy(real_svs, r / "cmu.svs")
    (r / "junk.svs").write_bytes(b"not a slide at all " * 100)  # passes registration, fails ingestion
    return r


@pytest.fixture(scope="module")
def keyed(root, tmp_path_factory):
    """A server with three keys: admin, alice and bob (read+submit), and the real slide ready."""
    work = tmp_path_factory.mktemp("keyed")
    data = work / "data"
    toks = {name: add_key(data, name, "admin" if name == "admin" else "read,submit")
            for name in ("admin", "alice", "bob")}
    s = Server(shipped(), work, "--slide-root", root).start()
    with s.client(toks["admin"]) as c:
        slide = register(c, root / "cmu.svs")
    assert slide["status"] == "ready"
    s.toks, s.slide, s.root, s.data = toks, slide, root, data
    yield s
    s.stop()


# -- 1. jobs and answers belong to their key -------------------------------------------------------------------
def test_another_keys_question_and_answer_are_unreachable(keyed):
    sid = keyed.slide["id"]
    secret_q = f"Is this {SECRET} tumour?"
    with keyed.client(keyed.toks["alice"]) as a, keyed.client(keyed.toks["bob"]) as b, \
            keyed.client(keyed.toks["admin"]) as adm:
        r = a.post(f"/v1/slides/{sid}/questions", json={"question": secret_q, "client_key": "shared-ck"})
        assert r.status_code == 200, r.text
        ajob = r.json()["job"]
        with a.stream("POST", f"/v1/slides/{sid}/questions", json={"question": secret_q, "stream": True}) as st:
            sjob = json.loads([d for e, d in sse(st.read().decode()) if e == "done"][0])["job"]
        chat = a.post("/v1/chat/completions", json={"model": "locpath", "messages": [
            {"role": "user", "content": [{"type": "text", "text": secret_q},
                                         {"type": "image_url", "image_url": {"url": f"slide:{sid}"}}]}]})
        assert chat.status_code == 200, chat.text
        assert SECRET in a.get("/v1/jobs").text and a.get(f"/v1/jobs/{ajob}").status_code == 200

        # bob: not in any listing, by id the same 404 as a missing job, no evidence heatmap, no replay
        for params in ({}, {"slide_id": sid}, {"limit": 1000}, {"limit": -5}, {"limit": 10 ** 30}):
            listing = b.get("/v1/jobs", params=params)
            assert listing.status_code == 200 and SECRET not in listing.text, params
        assert b.get("/v1/jobs", params={"limit": "lots"}).status_code == 400
        for job in (ajob, sjob):
            theirs, missing = b.get(f"/v1/jobs/{job}"), b.get("/v1/jobs/0123456789abcdef")
            assert theirs.status_code == missing.status_code == 404 and SECRET not in theirs.text
            assert theirs.json()["error"]["type"] == missing.json()["error"]["type"]
            ev = b.get(f"/v1/slides/{sid}/thumbnail.png", params={"evidence": job})
            assert ev.status_code == 404 and SECRET not in ev.text
        assert a.get(f"/v1/slides/{sid}/thumbnail.png", params={"evidence": ajob}).status_code == 200
        # the same client_key string from bob is bob's own question: a new job, not alice's answer
        mine = b.post(f"/v1/slides/{sid}/questions", json={"question": Q, "client_key": "shared-ck"})
        assert mine.status_code == 200 and SECRET not in mine.text and mine.json()["job"] != ajob
        again = b.post(f"/v1/slides/{sid}/questions", json={"question": Q, "client_key": "shared-ck"})
        assert again.status_code == 200 and again.json()["job"] == mine.json()["job"]  # bob's stored answer
        # alice's replay still gives alice's answer; another question under her key is a conflict, not her answer
        replay = a.post(f"/v1/slides/{sid}/questions", json={"question": secret_q, "client_key": "shared-ck"})
        assert replay.status_code == 200 and replay.json()["job"] == ajob
        other = a.post(f"/v1/slides/{sid}/questions", json={"question": Q, "client_key": "shared-ck"})
        assert other.status_code == 409
        assert mine.json()["job"] not in a.get("/v1/jobs").text
        # bob registers with a client_key, alice asks about it: his repeat shows his ingestion, not her question
        breg = b.post("/v1/slides", json={"path": str(keyed.root / "cmu.svs"), "client_key": "reg-b"})
        bsid = wait_ready(b, breg.json()["slide"]["id"])["id"]
        assert a.post(f"/v1/slides/{bsid}/questions", json={"question": secret_q}).status_code == 200
        brepeat = b.post("/v1/slides", json={"path": str(keyed.root / "cmu.svs"), "client_key": "reg-b"})
        assert brepeat.status_code == 200 and brepeat.json()["job"]["kind"] == "ingest" and SECRET not in brepeat.text
        # the same client_key from alice is hers: a new slide
        areg = a.post("/v1/slides", json={"path": str(keyed.root / "cmu.svs"), "client_key": "reg-b"})
        assert areg.status_code == 202 and areg.json()["slide"]["id"] != bsid
        # the admin sees both
        every = adm.get("/v1/jobs").text
        assert ajob in every and mine.json()["job"] in every
        assert adm.get(f"/v1/jobs/{ajob}").status_code == 200


# -- 2. no server paths for non-admin keys ------------------------------------------------------------------------
def test_no_server_paths_in_non_admin_responses(keyed):
    sid = keyed.slide["id"]
    hidden = {str(keyed.root), str(keyed.root.resolve()), str(keyed.data), str(keyed.data.resolve())}
    bodies = []
    with keyed.client(keyed.toks["alice"]) as a, keyed.client(keyed.toks["admin"]) as adm:
        reg = a.post("/v1/slides", json={"path": str(keyed.root / "cmu.svs"), "client_key": "paths-reg"})
        bad = a.post("/v1/slides", json={"path": str(keyed.root / "junk.svs"), "client_key": "junk-ck"})
        assert reg.status_code == 202 and bad.status_code == 202, (reg.text, bad.text)
        failed = wait_ready(a, bad.json()["slide"]["id"])
        assert failed["status"] == "failed" and failed["error"]
        assert "junk.svs" in adm.get(f"/v1/slides/{failed['id']}").json()["error"]
        retry = a.post("/v1/slides", json={"path": str(keyed.root / "junk.svs"), "client_key": "junk-ck"})
        assert retry.status_code == 202 and retry.json()["slide"]["id"] != failed["id"]  # a failed one runs again
        bodies.append(retry.text)
        bodies += [reg.text, bad.text, json.dumps(failed)]
        bodies.append(a.post("/v1/slides", json={"path": str(keyed.root / "cmu.svs"),
                                                 "client_key": "paths-reg"}).text)  # the existing-slide answer
        q = {"question": Q, "client_key": "paths-q"}
        bodies += [a.post(f"/v1/slides/{sid}/questions", json=q).text,
                   a.post(f"/v1/slides/{sid}/questions", json=q).text]  # stored answer
        with a.stream("POST", f"/v1/slides/{sid}/questions", json={"question": Q, "stream": True}) as st:
            bodies.append(st.read().decode())
        msg = {"model": "locpath", "messages": [{"role": "user", "content": [
            {"type": "text", "text": Q}, {"type": "image_url", "image_url": {"url": f"slide:{sid}"}}]}]}
        bodies.append(a.post("/v1/chat/completions", json=msg).text)
        with a.stream("POST", "/v1/chat/completions", json=dict(msg, stream=True)) as st:
            bodies.append(st.read().decode())
        for url in ("/v1/jobs", "/v1/slides", f"/v1/slides/{sid}", f"/v1/slides/{failed['id']}"):
            bodies.append(a.get(url).text)
        bodies += [a.get(f"/v1/jobs/{j['id']}").text for j in a.get("/v1/jobs").json()["jobs"]]
        ask_failed = a.post(f"/v1/slides/{failed['id']}/questions", json={"question": Q})
        assert ask_failed.status_code == 409
        bodies.append(ask_failed.text)
        shutil.copy(keyed.root / "cmu.svs", keyed.root / "gone.svs")  # ready, then removed: the thumbnail fails
        gone = register(a, keyed.root / "gone.svs")
        (keyed.root / "gone.svs").unlink()
        thumb = a.get(f"/v1/slides/{gone['id']}/thumbnail.png")
        assert thumb.status_code >= 400 and "gone.svs" in thumb.text, thumb.text
        bodies.append(thumb.text)
        for body in bodies:
            for h in hidden:
                assert h not in body, (h, body[:500])
        assert reg.json()["slide"]["source"] == "cmu.svs"
        # the admin keeps them
        assert str(keyed.root.resolve()) in adm.post(f"/v1/slides/{sid}/questions", json={"question": Q}).text
        assert str(keyed.root) in adm.get("/v1/jobs").text


# -- 3. keys count from the moment they exist -------------------------------------------------------------------
def test_a_key_added_while_running_is_required_at_once(root, tmp_path):
    with Server(shipped(), tmp_path, "--slide-root", root) as s, s.client() as anon:
        assert anon.get("/v1/slides").status_code == 200
        tok = add_key(tmp_path / "data", "late")
        t0 = time.monotonic()
        r = anon.get("/v1/slides")
        assert r.status_code == 401 and r.json()["error"]["type"] == "authentication_error"
        assert anon.post("/v1/slides", json={"path": str(root / "cmu.svs")}).status_code == 401
        assert time.monotonic() - t0 < 1
        with s.client(tok) as k:
            assert k.get("/v1/slides").status_code == 200
        assert cli("keys", "revoke", "late", "--data-dir", tmp_path / "data").returncode == 0
        with s.client(tok) as k:
            assert anon.get("/v1/slides").status_code == 200  # loopback with no active key: open, as documented
            assert k.get("/v1/slides").status_code == 200


def test_a_public_service_whose_keys_are_all_revoked_stays_closed(root, tmp_path):
    data = tmp_path / "data"
    adm = add_key(data, "boss", "admin")
    with Server(shipped(), tmp_path, "--host", "0.0.0.0", "--slide-root", root) as s, \
            s.client() as anon, s.client(adm) as k:
        assert k.get("/v1/jobs").status_code == 200 and anon.get("/v1/jobs").status_code == 401
        assert cli("keys", "revoke", "boss", "--data-dir", data).returncode == 0
        for c in (anon, k):  # the revoked admin key too
            for r in (c.get("/v1/jobs"), c.get("/v1/slides"), c.post("/v1/slides", json={"path": "x"})):
                assert r.status_code == 401, r.text


# -- 4. client_key retries -----------------------------------------------------------------------------------------
def test_client_key_refused_with_429_runs_on_retry(root, tmp_path):
    long = {"sample": True, "temperature": 100, "max_new_tokens": 400, "seed": 3}
    with Server(shipped(), tmp_path, "--slide-root", root, "--question-queue", "1", "--decode-batch", "1") as s, \
            s.client() as c:
        sid = register(c, root / "cmu.svs")["id"]

        def ask(i):
            with s.client() as ci:
                body = {"question": Q, "client_key": f"burst-{i}", **long}
                return i, ci.post(f"/v1/slides/{sid}/questions", json=body)
        refused = []
        for attempt in range(5):
            with ThreadPoolExecutor(8) as ex:
                refused = [i for i, r in ex.map(ask, range(attempt * 8, attempt * 8 + 8)) if r.status_code == 429]
            if refused:
                break
        assert refused, "no 429 in five bursts"
        for i in refused:
            r = c.post(f"/v1/slides/{sid}/questions", json={"question": Q, "client_key": f"burst-{i}", **long})
            assert r.status_code == 200 and r.json()["answer"] is not None, r.text
            again = c.post(f"/v1/slides/{sid}/questions", json={"question": Q, "client_key": f"burst-{i}", **long})
            assert again.status_code == 200 and again.json()["job"] == r.json()["job"]


def test_client_key_cut_by_a_restart_runs_on_retry(tmp_path):
    """A question about a slide whose cache is gone is refused at once (503, the slide re-ingested: the question lane
    never re-reads a slide) and its client_key runs again once the slide is ready, also when the server is killed
    during that re-ingestion."""
    from locpath.synth import make_spec, write_slide

    root = tmp_path / "root"
    root.mkdir()
    big = write_slide(make_spec(55, tiles=(30, 30)), root / "big.tiff", fmt="tiff")
    s = Server(shipped(), tmp_path, "--slide-root", root).start()
    with s.client() as c:
        sid = register(c, big)["id"]
    s.stop()
    shutil.rmtree(tmp_path / "cache")
    s = restart(s)
    body = {"question": Q, "client_key": "cut-1"}
    with s.client() as c:
        r = c.post(f"/v1/slides/{sid}/questions", json=body)
        assert r.status_code == 503 and r.json()["error"]["type"] == "not_prepared", r.text
        assert sid in r.json()["error"]["message"] and int(r.headers["Retry-After"]) >= 1
        ingests = [j for j in c.get("/v1/jobs").json()["jobs"] if j["kind"] == "ingest"]
        assert len(ingests) == 2, ingests  # queued for ingestion again (its slide's status shows it)
    s.stop(signal.SIGKILL)
    s = restart(s)
    try:
        with s.client() as c:
            assert wait_ready(c, sid)["status"] == "ready"  # the re-ingestion resumed after the kill
            (job,) = [j for j in c.get("/v1/jobs").json()["jobs"] if j["kind"] == "question"]
            assert job["status"] == "failed" and "being prepared again" in job["error"], job
            r = c.post(f"/v1/slides/{sid}/questions", json=body)
            assert r.status_code == 200 and r.json()["answer"] is not None and r.json()["job"] != job["id"], r.text
            assert c.post(f"/v1/slides/{sid}/questions", json=body).json()["job"] == r.json()["job"]
    finally:
        s.stop()


# -- 5. uploads -----------------------------------------------------------------------------------------------------
def files_under(folder: Path) -> list[Path]:
    return [p for p in folder.rglob("*") if p.is_file()] if folder.exists() else []


def test_upload_refused_with_429_leaves_nothing(tmp_path, real_svs):
    from locpath.synth import make_spec, write_slide

    root = tmp_path / "root"
    root.mkdir()
    big = write_slide(make_spec(56, tiles=(40, 40)), root / "big.tiff", fmt="tiff")
    shutil.copy(real_svs, root / "cmu.svs")
    with Server(shipped(), tmp_path, "--slide-root", root, "--ingest-queue", "1") as s, s.client() as c:
        first = c.post("/v1/slides", json={"path": str(big)})
        deadline = time.time() + 30  # the lane takes the big slide; the next one fills the queue
        while c.get(f"/v1/slides/{first.json()['slide']['id']}").json()["status"] != "ingesting" \
                and time.time() < deadline:
            time.sleep(0.05)
        codes = [first.status_code, c.post("/v1/slides", json={"path": str(root / "cmu.svs")}).status_code]
        up = c.post("/v1/slides/upload", params={"filename": "a.svs", "client_key": "up-1"},
                    content=real_svs.read_bytes())
        assert codes == [202, 202] and up.status_code == 429, (codes, up.text)
        assert files_under(tmp_path / "data" / "uploads") == []
        for sl in c.get("/v1/slides").json()["slides"]:
            wait_ready(c, sl["id"])
        up = c.post("/v1/slides/upload", params={"filename": "a.svs", "client_key": "up-1"},
                    content=real_svs.read_bytes())
        assert up.status_code == 202, up.text  # the refused client_key runs on retry


def test_upload_cut_by_a_kill_is_removed_at_start(tmp_path):
    s = Server(shipped(), tmp_path).start()
    uploads = tmp_path / "data" / "uploads"

    def slow_body():
        yield b"II*\x00" + b"\x00" * 65532
        time.sleep(30)
        yield b"\x00" * 10
    threading.Thread(target=lambda: _quiet_upload(s.url, slow_body()), daemon=True).start()
    deadline = time.time() + 20
    while time.time() < deadline and not [p for p in files_under(uploads) if p.name.endswith(".part")]:
        time.sleep(0.05)
    assert [p for p in files_under(uploads) if p.name.endswith(".part")], "no .part file seen"
    s.stop(signal.SIGKILL)
    s = restart(s)
    try:
        assert list(uploads.iterdir()) == []
    finally:
        s.stop()


def _quiet_upload(url, body):
    try:
        httpx.post(url + "/v1/slides/upload", params={"filename": "cut.svs"}, content=body, timeout=60)
    except httpx.HTTPError:
        pass


def test_failed_upload_file_is_removed_and_the_slide_keeps_its_error(tmp_path):
    with Server(shipped(), tmp_path) as s, s.client() as c:
        r = c.post("/v1/slides/upload", params={"filename": "junk.svs"}, content=b"not a slide at all " * 100)
        assert r.status_code == 202, r.text
        failed = wait_ready(c, r.json()["slide"]["id"])
        assert failed["status"] == "failed" and failed["error"]
        deadline = time.time() + 10
        while time.time() < deadline and files_under(tmp_path / "data" / "uploads"):
            time.sleep(0.2)
        assert list((tmp_path / "data" / "uploads").iterdir()) == []
        again = c.get(f"/v1/slides/{failed['id']}").json()
        assert again["status"] == "failed" and again["error"] == failed["error"]


def test_upload_quota_per_key_checked_while_streaming(tmp_path, real_svs):
    data = tmp_path / "data"
    toks = {n: add_key(data, n, "admin" if n == "admin" else "read,submit") for n in ("admin", "alice", "bob")}
    blob = real_svs.read_bytes()
    quota = int(len(blob) * 1.5)
    with Server(shipped(), tmp_path, "--upload-quota", str(quota)) as s, s.client(toks["alice"]) as a, \
            s.client(toks["bob"]) as b, s.client(toks["admin"]) as adm:
        first = a.post("/v1/slides/upload", params={"filename": "one.svs"}, content=blob)
        assert first.status_code == 202, first.text
        # with Content-Length: refused before anything is stored
        second = a.post("/v1/slides/upload", params={"filename": "two.svs"}, content=blob)
        assert second.status_code == 413 and second.json()["error"]["type"] == "insufficient_quota", second.text

        # without Content-Length (chunked): refused while streaming, never more than the quota on disk
        seen = []

        def chunks():
            for i in range(0, len(blob), 1 << 16):
                seen.append(sum(p.stat().st_size for p in files_under(data / "uploads")))
                yield blob[i:i + (1 << 16)]
        third = a.post("/v1/slides/upload", params={"filename": "three.svs"}, content=chunks())
        assert third.status_code == 413, third.text
        assert max(seen) <= quota + (1 << 16)
        assert len(files_under(data / "uploads")) == 1  # only the first upload
        # another key has its own quota
        assert b.post("/v1/slides/upload", params={"filename": "b.svs"}, content=blob).status_code == 202
        # deleting the slide frees alice's share
        wait_ready(adm, first.json()["slide"]["id"])
        assert adm.delete(f"/v1/slides/{first.json()['slide']['id']}").status_code == 200
        assert a.post("/v1/slides/upload", params={"filename": "two.svs"}, content=blob).status_code == 202

        # 7. private files: data folder, uploads, the uploaded file, the database and its journal files
        for p in (data, data / "uploads", *[f.parent for f in files_under(data / "uploads")]):
            assert stat.S_IMODE(p.stat().st_mode) == 0o700, p
        for p in files_under(data / "uploads") + [data / "locpath.db", data / "locpath.db-wal",
                                                   data / "locpath.db-shm"]:
            assert stat.S_IMODE(p.stat().st_mode) == 0o600, p


# -- 6. the database file ------------------------------------------------------------------------------------------
def one_line_error(out, *words):
    assert out.returncode == 2, (out.returncode, out.stderr)
    lines = [ln for ln in out.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("locpath: ") and "Traceback" not in out.stderr, out.stderr
    for w in words:
        assert w in lines[0], (w, lines[0])


def test_empty_or_foreign_database_file_is_refused_unless_init(tmp_path):
    import sqlite3

    data = tmp_path / "data"
    data.mkdir()
    db = data / "locpath.db"
    db.touch()
    serve = ("serve", shipped(), "--port", "1", "--data-dir", data)
    one_line_error(cli(*serve, timeout=120), str(db), "empty", "--init")
    one_line_error(cli("keys", "list", "--data-dir", data), str(db), "empty")
    one_line_error(cli("keys", "add", "x", "--data-dir", data), str(db), "empty")
    assert db.stat().st_size == 0  # untouched
    other = tmp_path / "other.db"
    con = sqlite3.connect(other)
    con.execute("CREATE TABLE patients (name TEXT)")
    con.commit()
    con.close()
    one_line_error(cli("keys", "list", "--database", f"sqlite:///{other}"), str(other), "not a locpath database")
    one_line_error(cli(*serve, "--database", f"sqlite:///{other}", timeout=120), str(other), "not a locpath database")
    (tmp_path / "junk.db").write_bytes(b"\x00garbage" * 100)
    one_line_error(cli("keys", "list", "--database", f"sqlite:///{tmp_path / 'junk.db'}"), "junk.db")
    # --init makes a database there; a missing file is created without it
    assert cli("keys", "add", "x", "--data-dir", data, "--init").returncode == 0
    assert "x\t" in cli("keys", "list", "--data-dir", data).stdout
    fresh = tmp_path / "fresh"
    assert cli("keys", "list", "--data-dir", fresh).returncode == 0
    assert stat.S_IMODE((fresh / "locpath.db").stat().st_mode) == 0o600
    assert stat.S_IMODE(fresh.stat().st_mode) == 0o700
    db.write_bytes(b"")  # a zero-byte file again: with --init the service starts on it
    (tmp_path / "w").mkdir()
    with Server(shipped(), tmp_path / "w", "--database", f"sqlite:///{db}", "--init") as s, s.client() as c:
        assert c.get("/v1/slides").status_code == 200


def test_read_only_database_is_one_line(tmp_path):
    data = tmp_path / "data"
    assert cli("keys", "add", "x", "--data-dir", data).returncode == 0
    db = data / "locpath.db"
    ro = f"sqlite:///file:{db}?mode=ro&uri=true"  # read-only as the OS would make it for another user
    one_line_error(cli("keys", "list", "--database", ro), "read-only")
    one_line_error(cli("serve", shipped(), "--port", "1", "--data-dir", data, "--database", ro, timeout=120),
                   "read-only")
    if os.getuid() != 0:  # a root process writes a 0444 file anyway
        os.chmod(db, 0o444)
        one_line_error(cli("keys", "list", "--data-dir", data), str(db), "read-only")
        one_line_error(cli("serve", shipped(), "--port", "1", "--data-dir", data, timeout=120), str(db), "read-only")
