"""Slide files under attack, through the real server (uvicorn on loopback): a registered slide swapped for a link
out of the roots (the file, or a folder above it) or for another slide of the same size is refused on every use
(question, thumbnail, resumed ingestion) and nothing of the outside file comes back; a decompression bomb and a
corrupt slide are refused with one line; SIGTERM stops the server within seconds mid-ingestion; a slide interrupted
too often is failed for good."""

from __future__ import annotations

import os
import shutil
import time

import pytest

httpx = pytest.importorskip("httpx")
pytest.importorskip("fastapi")

from servers import Server, shipped, wait_ready  # noqa: E402
from test_slide_files_hostile import SECRET, corrupt_svs, write_tiff  # noqa: E402

Q = {"question": "What is the diagnosis?", "max_new_tokens": 4}


@pytest.fixture(scope="module")
def site(tmp_path_factory, small_svs):
    """A server with one slide root, and an `outside` folder beside it holding a secret and a valid slide."""
    work = tmp_path_factory.mktemp("hostile")
    root, outside = work / "root", work / "outside"
    root.mkdir()
    outside.mkdir()
    (outside / "secret.svs").write_text(SECRET + "\n" * 50)
    shutil.copy(small_svs, outside / "other.svs")
    with Server(shipped(), work, "--slide-root", root) as srv:
        yield srv, root, outside


def registered(c, path) -> dict:
    r = c.post("/v1/slides", json={"path": str(path)})
    assert r.status_code == 202, r.text
    s = wait_ready(c, r.json()["slide"]["id"])
    assert s["status"] == "ready", s
    return s


def refused(r, status: int, *needles) -> str:
    assert r.status_code == status, (r.status_code, r.text)
    err = r.json()["error"]
    assert set(err) == {"type", "message"} and "\n" not in err["message"]
    for n in needles:
        assert n in err["message"], err
    assert "TOPSECRET" not in r.text and "root:x" not in r.text
    return err["message"]


def test_file_swapped_for_link_out_of_roots(site, small_svs):
    srv, root, outside = site
    target = root / "a.svs"
    shutil.copy(small_svs, target)
    with srv.client() as c:
        s = registered(c, target)
        assert c.post(f"/v1/slides/{s['id']}/questions", json=Q).status_code == 200
        target.unlink()
        os.symlink(outside / "secret.svs", target)  # the issue: the thumbnail quoted /etc/passwd's first bytes
        refused(c.get(f"/v1/slides/{s['id']}/thumbnail.png"), 403, "outside the slide roots")
        # the slide is marked: every later use is refused too, and says why
        refused(c.post(f"/v1/slides/{s['id']}/questions", json=Q), 409, "failed", "outside the slide roots")
        assert c.get(f"/v1/slides/{s['id']}").json()["status"] == "failed"
        # registering the link again is refused like any path outside the roots (no existence oracle)
        refused(c.post("/v1/slides", json={"path": str(target)}), 404, "no such slide under the slide roots")
        # a link to a missing file outside the roots is refused exactly like one to an existing file
        t2 = root / "a2.svs"
        shutil.copy(small_svs, t2)
        s2 = registered(c, t2)
        t2.unlink()
        os.symlink(outside / "does-not-exist.svs", t2)
        refused(c.get(f"/v1/slides/{s2['id']}/thumbnail.png"), 403, "outside the slide roots")


def test_file_swapped_for_link_to_a_valid_slide(site, small_svs):
    """The issue: questions were answered about a slide outside the roots."""
    srv, root, outside = site
    target = root / "b.svs"
    shutil.copy(small_svs, target)
    with srv.client() as c:
        s = registered(c, target)
        target.unlink()
        os.symlink(outside / "other.svs", target)
        refused(c.post(f"/v1/slides/{s['id']}/questions", json=Q), 403, "outside the slide roots")
        r = c.post("/v1/chat/completions", json={"slide_id": s["id"], "max_tokens": 4,
                                                 "messages": [{"role": "user", "content": "What is the diagnosis?"}]})
        assert r.status_code in (403, 409) and "TOPSECRET" not in r.text, r.text


def test_parent_folder_swapped_for_link(site, small_svs):
    srv, root, outside = site
    (root / "case").mkdir()
    target = root / "case" / "c.svs"
    shutil.copy(small_svs, target)
    elsewhere = outside / "case"
    elsewhere.mkdir()
    shutil.copy(outside / "other.svs", elsewhere / "c.svs")
    with srv.client() as c:
        s = registered(c, target)
        os.rename(root / "case", root / "case-old")
        os.symlink(elsewhere, root / "case")
        refused(c.get(f"/v1/slides/{s['id']}/thumbnail.png"), 403, "outside the slide roots")
    # the same inside the roots: a folder link to another case's folder is refused (the path changed under it)
    inside = root / "case2"
    inside.mkdir()
    shutil.copy(small_svs, inside / "d.svs")
    (root / "other-case").mkdir()
    shutil.copy(outside / "other.svs", root / "other-case" / "d.svs")
    with srv.client() as c:
        s = registered(c, inside / "d.svs")
        os.rename(inside, root / "case2-old")
        os.symlink(root / "other-case", inside)
        refused(c.post(f"/v1/slides/{s['id']}/questions", json=Q), 403, "link")


def test_replaced_by_another_slide_of_the_same_size(site, small_svs):
    srv, root, _ = site
    data = small_svs.read_bytes()
    with srv.client() as c:
        # a new file renamed over the old one: another inode
        target = root / "e.svs"
        target.write_bytes(data)
        s = registered(c, target)
        forged = bytearray(data)
        forged[len(data) // 2: len(data) // 2 + 4096] = bytes(4096)
        (root / ".e.tmp").write_bytes(bytes(forged))
        os.replace(root / ".e.tmp", target)
        assert target.stat().st_size == len(data)
        refused(c.post(f"/v1/slides/{s['id']}/questions", json=Q), 409, "not the file that was registered")
        # overwritten in place with the modification time put back: the sampled fingerprint differs
        target = root / "f.svs"
        target.write_bytes(data)
        s = registered(c, target)
        st = target.stat()
        with open(target, "r+b") as f:
            f.seek(len(data) // 2)
            f.write(bytes(4096))
        os.utime(target, ns=(st.st_atime_ns, st.st_mtime_ns))
        refused(c.get(f"/v1/slides/{s['id']}/thumbnail.png"), 409, "content changed")
        # the same between the sampled offsets, where the fingerprint cannot see it: the status change time does
        from locpath.wsi.identity import FINGERPRINT_CHUNK, FINGERPRINT_CHUNKS, identity_of_fd
        target = root / "g.svs"
        target.write_bytes(data + bytes(4 << 20))  # bytes after the TIFF's own are read by nothing but the check
        s = registered(c, target)
        st = target.stat()
        span = st.st_size - FINGERPRINT_CHUNK
        starts = [round(span * i / (FINGERPRINT_CHUNKS - 1)) for i in range(FINGERPRINT_CHUNKS)]
        edit = next(o for o in range(len(data), st.st_size - 4096, 4096)  # in the padding, between two samples
                    if all(o + 4096 <= a or o >= a + FINGERPRINT_CHUNK for a in starts))
        fd = os.open(target, os.O_RDONLY)
        before = identity_of_fd(fd)
        with open(target, "r+b") as f:
            f.seek(edit)
            f.write(b"\xff" * 4096)
        os.utime(target, ns=(st.st_atime_ns, st.st_mtime_ns))
        after = identity_of_fd(fd)
        os.close(fd)
        assert (after.size, after.mtime_ns, after.fingerprint) == (before.size, before.mtime_ns, before.fingerprint)
        refused(c.post(f"/v1/slides/{s['id']}/questions", json=Q), 409, "status change time differs")


def test_uploaded_bomb_and_corrupt_slides(site, tmp_path, real_svs):
    srv, _, _ = site
    bomb = write_tiff(tmp_path / "bomb.tif", 100_000, 100_000, 256)
    one, _ = corrupt_svs(real_svs, tmp_path / "one.svs", "one")
    most, _ = corrupt_svs(real_svs, tmp_path / "most.svs", "most")
    with srv.client() as c:
        def upload(p):
            t0 = time.monotonic()
            r = c.post("/v1/slides/upload", params={"filename": p.name}, content=p.read_bytes())
            if r.status_code == 400:
                return r.json()["error"]["message"], time.monotonic() - t0
            assert r.status_code == 202, r.text
            s = wait_ready(c, r.json()["slide"]["id"], timeout=60)
            return s, time.monotonic() - t0

        s, dt = upload(bomb)
        msg = s if isinstance(s, str) else s["error"]
        assert "point at another tile's data" in msg and "\n" not in msg and dt < 20, (msg, dt)
        s, _ = upload(one)
        assert s["status"] == "ready", s
        r = c.post(f"/v1/slides/{s['id']}/questions", json=Q)
        assert r.status_code == 200 and r.json()["answer"], r.text
        s, _ = upload(most)
        assert s["status"] == "failed" and "unreadable" in s["error"] and "\n" not in s["error"], s


# -- stopping mid-ingestion and slides that never finish -----------------------------------------------------------
@pytest.fixture(scope="module")
def big_tiff(tmp_path_factory):
    """13,440 px square, ~2,500 tissue tiles: ingestion takes seconds to tens of seconds here."""
    from locpath.synth import make_spec, write_slide

    return write_slide(make_spec(7, tiles=(60, 60)), tmp_path_factory.mktemp("big") / "big.tiff", fmt="tiff",
                       write_truth=False)


def wait_ingesting(c, slide_id, timeout=60) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        s = c.get(f"/v1/slides/{slide_id}").json()
        assert s["status"] != "ready", "the ingestion ended before the stop: make the slide larger"
        if s["status"] == "ingesting" and s["progress"] > 0:
            return
        time.sleep(0.1)
    raise AssertionError(f"not ingesting: {s}")


def test_sigterm_mid_ingestion_and_retries(tmp_path, big_tiff, small_svs):
    """SIGTERM while a large slide is ingested stops the server within seconds (it waited on the ingestion, and was
    resumed at every start for ever); the third interrupted ingestion is failed for good at the next start. A slide
    swapped for a link while the server was down is refused when its ingestion resumes."""
    root, outside = tmp_path / "root", tmp_path / "outside"
    root.mkdir()
    outside.mkdir()
    shutil.copy(big_tiff, root / "big.tiff")
    shutil.copy(small_svs, root / "later.svs")
    (outside / "secret.svs").write_text(SECRET)
    srv = Server(shipped(), tmp_path, "--slide-root", root).start()
    try:
        with srv.client() as c:
            big = c.post("/v1/slides", json={"path": str(root / "big.tiff")}).json()["slide"]["id"]
            later = c.post("/v1/slides", json={"path": str(root / "later.svs")}).json()["slide"]["id"]
            wait_ingesting(c, big)
        assert srv.stop() < 10
        (root / "later.svs").unlink()
        os.symlink(outside / "secret.svs", root / "later.svs")
        for _ in range(2):  # resumed at each start (same port: the same instance), interrupted again
            srv.start()
            with srv.client() as c:
                wait_ingesting(c, big)
            assert srv.stop() < 10
        srv.start()
        with srv.client() as c:
            s = wait_ready(c, big, timeout=30)
            assert s["status"] == "failed" and "failed for good" in s["error"], s
            s = wait_ready(c, later, timeout=30)
            assert s["status"] == "failed" and "outside the slide roots" in s["error"], s
            jobs = c.get("/v1/jobs", params={"slide_id": later}).json()["jobs"]
            assert jobs[0]["status"] == "failed" and "TOPSECRET" not in str(jobs)
    finally:
        srv.stop()
