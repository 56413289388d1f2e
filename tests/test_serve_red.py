"""Variants of issue 22's attacks that its own tests did not try, through the real server (uvicorn on loopback):
each test here failed before its fix."""

from __future__ import annotations

import os
import shutil
import subprocess

import pytest

httpx = pytest.importorskip("httpx")
pytest.importorskip("fastapi")

from servers import Server, cli, shipped, wait_ready  # noqa: E402


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    """A server with keys (two `submit` clients, an admin), one slide root and an `outside` folder beside it."""
    work = tmp_path_factory.mktemp("red")
    root, outside = work / "root", work / "outside"
    root.mkdir()
    outside.mkdir()
    keys = {}
    for name, scopes in (("alice", "submit"), ("bob", "submit"), ("boss", "admin")):
        res = cli("keys", "add", name, "--scopes", scopes, "--data-dir", work / "data")
        assert res.returncode == 0, res.stderr
        keys[name] = res.stdout.split()[0]
    with Server(shipped(), work, "--slide-root", root) as srv:
        yield srv, root, outside, keys


def dicomize(svs, out) -> list:
    pytest.importorskip("wsidicomizer")
    exe = shutil.which("wsidicomizer") or os.path.join(os.path.dirname(os.sys.executable), "wsidicomizer")
    res = subprocess.run([exe, "-i", str(svs), "-o", str(out)], capture_output=True, text=True, timeout=300)
    if res.returncode != 0:
        pytest.skip(f"wsidicomizer cannot convert here: {res.stderr[-300:]}")
    return sorted(out.glob("*.dcm"))


def test_dicom_folder_with_links_out_of_the_roots(site, real_svs):
    """A DICOM series folder inside the roots whose level files are symbolic links to another series outside:
    wsidicom, given the folder, followed the links and the slide was ingested from files outside the roots."""
    srv, root, outside, keys = site
    files = dicomize(real_svs, outside / "series")
    folder = root / "series"
    folder.mkdir()
    smallest = min(files, key=lambda f: f.stat().st_size)
    for f in files:
        if f == smallest:
            shutil.copy(f, folder / f.name)  # one real file makes it a DICOM folder
        else:
            os.symlink(f, folder / f.name)
    with srv.client(keys["alice"]) as c:
        r = c.post("/v1/slides", json={"path": str(folder)})
        assert r.status_code == 202, r.text
        s = wait_ready(c, r.json()["slide"]["id"])
        assert s["status"] == "failed", s
        assert "not a readable DICOM WSI series" in s["error"] and str(outside) not in s["error"]
        # the same series as regular files inside the roots still reads (each file pinned), answers and draws
        shutil.copytree(outside / "series", root / "series2")
        r = c.post("/v1/slides", json={"path": str(root / "series2")})
        s = wait_ready(c, r.json()["slide"]["id"])
        assert s["status"] == "ready", s
        r = c.post(f"/v1/slides/{s['id']}/questions", json={"question": "What is it?", "max_new_tokens": 2})
        assert r.status_code == 200, r.text
        assert c.get(f"/v1/slides/{s['id']}/thumbnail.png").content[:4] == b"\x89PNG"


def test_registration_errors_do_not_show_resolved_paths(site):
    """A relative path (resolved against the server's working folder) or one through a link inside the roots:
    the error named the resolved absolute path, the server's own folders, to a non-admin key."""
    srv, root, outside, keys = site
    (root / "folder").mkdir()
    os.symlink(root, root / "alias")
    with srv.client(keys["alice"]) as c:
        for given in (str(root / "alias" / "folder"), str(root / "folder" / ".." / "folder")):
            r = c.post("/v1/slides", json={"path": given})
            assert r.status_code == 400, r.text
            assert r.json()["error"]["message"] == f"{given}: is a directory, not a slide file (nor a folder of " \
                                                   "DICOM files)"
        rel = os.path.relpath(root / "folder")  # the server's working folder is the test's
        r = c.post("/v1/slides", json={"path": rel})
        assert r.status_code == 400 and r.json()["error"]["message"].startswith(f"{rel}: is a directory"), r.text


def test_dicomweb_credentials_not_in_errors(tmp_path):
    """`--dicomweb http://user:password@pacs/...`: a failed retrieval's error (the slide's and the job's, which every
    key reads, and the log) quoted the URL with its password."""
    import http.server
    import threading

    from servers import free_port

    class NoSeries(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            self.send_response(404)
            self.send_header("Content-Length", "0")
            self.end_headers()

        def log_message(self, *a):
            pass

    pacs = http.server.ThreadingHTTPServer(("127.0.0.1", free_port()), NoSeries)
    threading.Thread(target=pacs.serve_forever, daemon=True).start()
    res = cli("keys", "add", "alice", "--scopes", "submit", "--data-dir", tmp_path / "data")
    key = res.stdout.split()[0]
    url = f"http://pacsuser:S3cretPass@127.0.0.1:{pacs.server_address[1]}/dicom-web"
    try:
        with Server(shipped(), tmp_path, "--dicomweb", url) as srv, srv.client(key) as c:
            r = c.post("/v1/slides", json={"dicomweb": {"study": "1.2.3", "series": "1.2.3.4"}})
            assert r.status_code == 202, r.text
            s = wait_ready(c, r.json()["slide"]["id"], timeout=120)
            assert s["status"] == "failed" and "cannot retrieve series 1.2.3.4" in s["error"], s
            jobs = c.get("/v1/jobs").text
            assert "S3cretPass" not in s["error"] and "S3cretPass" not in jobs and "pacsuser" not in jobs
            assert f"127.0.0.1:{pacs.server_address[1]}/dicom-web" in s["error"]  # still says which server
        assert "S3cretPass" not in srv.log_path.read_text()
    finally:
        pacs.shutdown()


def test_upload_name_and_client_key_bounded(site, real_svs):
    """The upload's `name` and `client_key` (query parameters) took any length, where the JSON routes refuse more
    than 256 and 128 characters (the database columns: a 500 on a database that enforces them), after the whole
    file was stored."""
    srv, root, outside, keys = site
    data = real_svs.read_bytes()
    with srv.client(keys["bob"]) as c:
        for params, field in (({"name": "n" * 257}, "name"), ({"client_key": "k" * 129}, "client_key")):
            r = c.post("/v1/slides/upload", params={"filename": "x.svs", **params}, content=data)
            assert r.status_code == 400 and r.json()["error"]["message"].startswith(f"query.{field}:"), r.text
        assert not any((srv.work / "data" / "uploads").iterdir())


def test_data_folder_others_control_is_refused(tmp_path):
    """A --data-dir every user may write (say a folder under /tmp made by someone else), or a database file that
    belongs to another user: the service started on it, so whoever controls it could put a database holding their
    own admin key in place, or swap upload folders."""
    shared = tmp_path / "shared"
    shared.mkdir()
    os.chmod(shared, 0o777)
    try:
        res = cli("serve", shipped(), "--data-dir", shared, "--port", 1, "--cache-dir", tmp_path / "c", timeout=60)
    except subprocess.TimeoutExpired:
        pytest.fail("the service started on a data folder every user may write")
    assert res.returncode == 2 and res.stderr.strip().splitlines() == [
        f"locpath: error: {shared}: the data folder is writable by every user; chmod o-w it or use another "
        "--data-dir"], res.stderr
    os.chmod(shared, 0o700)
    if os.getuid() != 0:
        return
    os.chmod(shared, 0o1777)  # sticky, like /tmp: the folder is fine, but a database file made by another user is not
    assert cli("keys", "add", "evil", "--scopes", "admin", "--data-dir", shared).returncode == 0
    os.chown(shared / "locpath.db", 12345, 12345)
    for args in (("keys", "list", "--data-dir", shared),
                 ("serve", shipped(), "--data-dir", shared, "--port", 1, "--cache-dir", tmp_path / "c")):
        res = cli(*args, timeout=60)
        assert res.returncode == 2 and "locpath.db: the database file belongs to another user (uid 12345)" \
            in res.stderr and len(res.stderr.strip().splitlines()) == 1, res.stderr
