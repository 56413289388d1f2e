"""The HTTP boundary of `locpath serve` under attack, through a real uvicorn process and crafted requests: Host
allow-list (DNS rebinding), Origin and Content-Type checks (cross-site "simple" requests), JSON bodies that once
gave tracebacks (deep nesting, wrong types), a client leaving mid-upload, loose booleans and numbers, the Bearer
scheme's case, probing for files outside the slide roots, and one error shape everywhere."""

import json
import os
import socket
import time

import pytest

httpx = pytest.importorskip("httpx")
pytest.importorskip("fastapi")

from servers import Server, browser_api, cli, launch_chromium, shipped  # noqa: E402

SLIDE = "0123456789abcdef"
CHAT = {"model": "locpath", "messages": [{"role": "user", "content": [
    {"type": "image_url", "image_url": {"url": f"slide:{SLIDE}"}}, {"type": "text", "text": "What is it?"}]}]}


@pytest.fixture(scope="module")
def roots(tmp_path_factory):
    root = tmp_path_factory.mktemp("roots")
    (root / "folder").mkdir()
    return root


@pytest.fixture(scope="module")
def server(tmp_path_factory, roots):
    s = Server(shipped(), tmp_path_factory.mktemp("guard"), "--slide-root", roots, "--allowed-host", "Lab.Example.org.",
               "--plain-logs").start()
    yield s
    s.stop()


def raw(port: int, head: bytes, body: bytes = b"") -> tuple[int, bytes]:
    """One request written byte for byte; (status, body)."""
    with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
        sock.sendall(head + body)
        data = b""
        while chunk := sock.recv(65536):
            data += chunk
    head_, _, payload = data.partition(b"\r\n\r\n")
    return int(head_.split()[1]), payload


def error(r, status: int, text: str = "") -> dict:
    assert r.status_code == status, (r.status_code, r.text)
    body = r.json()
    assert set(body) == {"error"} and set(body["error"]) == {"type", "message"}, body
    assert text.lower() in body["error"]["message"].lower(), body
    return body["error"]


# -- Host: DNS rebinding -----------------------------------------------------------------------------------------------
def test_host_allow_list(server):
    with server.client() as c:
        for host in ("evil.example", "127.0.0.1.evil.example", "localhost.evil.example", "10.0.0.1",
                     "lab.example.org.evil.example", "xn--lcalhost-ofa"):
            error(c.get("/v1/slides", headers={"Host": host}), 421, "does not answer for host")
            error(c.post("/v1/slides", json={"path": "x"}, headers={"Host": f"{host}:{server.port}"}), 421)
        for host in ("127.0.0.1@evil.example", "evil example", "a..b", "localhost:99999", "[::1", "x" * 5000):
            error(c.get("/v1/slides", headers={"Host": host}), 400, "host header is malformed")
        for host in ("localhost", "LOCALHOST.", f"localhost:{server.port}", "127.0.0.1:1", "[::1]", "[0:0::1]:80",
                     "lab.example.org", "LAB.example.ORG.:443"):
            assert c.get("/v1/slides", headers={"Host": host}).status_code == 200, host
    status, body = raw(server.port, b"GET /v1/slides HTTP/1.0\r\n\r\n")  # HTTP/1.0 may leave Host out: we may not
    assert status == 400 and json.loads(body)["error"]["message"] == "the request has no Host header"
    for head in (b"GET /v1/slides HTTP/1.1\r\nConnection: close\r\n\r\n",  # refused by the HTTP layer (h11)
                 b"GET /v1/slides HTTP/1.1\r\nHost: 127.0.0.1\r\nHost: evil.example\r\nConnection: close\r\n\r\n",
                 b"GET /v1/slides HTTP/1.0\r\nHost: 127.0.0.1\r\nHost: evil.example\r\n\r\n"):
        assert raw(server.port, head)[0] == 400, head


def test_header_block_is_bounded(server):
    """httptools took headers of any size (200 MB of one header grew the server by 300 MB); h11 stops at 64 KiB."""
    ok = b"GET /v1/models HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\nX-Pad: "
    assert raw(server.port, ok + b"a" * 30_000 + b"\r\n\r\n")[0] == 200
    with socket.create_connection(("127.0.0.1", server.port), timeout=30) as sock:
        sock.sendall(ok)
        sent = 0
        try:
            for sent in range(64):
                sock.sendall(b"a" * (1 << 20))
        except OSError:  # reset once the limit is passed
            pass
        assert sent < 32, f"{sent} MiB of one header accepted"
    with server.client() as c:
        assert c.get("/readyz").status_code == 200


def test_host_checked_with_keys_too(tmp_path):
    env = ["--data-dir", tmp_path / "data"]
    token = cli("keys", "add", "writer", *env).stdout.split()[0]
    with Server(shipped(), tmp_path) as s, s.client() as c:
        auth = {"Authorization": f"Bearer {token}"}
        error(c.get("/v1/models", headers={**auth, "Host": "evil.example"}), 421)
        for scheme in ("bearer", "BEARER", "Bearer", "bEaReR"):
            assert c.get("/v1/models", headers={"Authorization": f"{scheme} {token}"}).status_code == 200, scheme
        error(c.get("/v1/models", headers={"Authorization": f"Basic {token}"}), 401)
        error(c.get("/v1/models"), 401)


# -- cross-site requests: Origin, Content-Type -----------------------------------------------------------------------
def test_origin_of_state_changing_requests(server, roots):
    own = f"http://127.0.0.1:{server.port}"
    probe = {"path": str(roots / "none.svs")}  # passes the guard -> the route's 404
    with server.client() as c:
        for headers in ({}, {"Origin": own}, {"Origin": f"https://127.0.0.1:{server.port}"},
                        {"Sec-Fetch-Site": "same-origin", "Origin": own}, {"Sec-Fetch-Site": "none"},
                        {"Host": f"localhost:{server.port}", "Origin": f"http://localhost:{server.port}"}):
            error(c.post("/v1/slides", json=probe, headers=headers), 404, "no such slide")
        for headers in ({"Origin": "http://evil.example"}, {"Origin": "null"}, {"Origin": "http://127.0.0.1:1"},
                        {"Origin": f"http://localhost:{server.port}"}, {"Origin": f"{own}/"},
                        {"Origin": f"http://user@127.0.0.1:{server.port}"}, {"Sec-Fetch-Site": "cross-site"},
                        {"Sec-Fetch-Site": "same-site"}, {"Origin": own, "Sec-Fetch-Site": "cross-site"}):
            error(c.post("/v1/slides", json=probe, headers=headers), 403, "refused")
            error(c.post("/v1/chat/completions", json=CHAT, headers=headers), 403)
            error(c.post("/v1/slides/upload", params={"filename": "a.svs"}, content=b"x", headers=headers), 403)
            error(c.delete(f"/v1/slides/{SLIDE}", headers=headers), 403)
        r = c.get("/v1/slides", headers={"Origin": "http://evil.example"})  # reads stay unreadable to other origins
        assert r.status_code == 200 and "access-control-allow-origin" not in r.headers
        assert c.options("/v1/slides", headers={"Origin": "http://evil.example",
                                                "Access-Control-Request-Method": "POST"}).status_code == 405


def test_json_routes_take_only_json(server, roots):
    probe = json.dumps({"path": str(roots / "none.svs")}).encode()
    with server.client() as c:
        for ctype in ("text/plain", "text/plain; charset=utf-8", "application/x-www-form-urlencoded",
                      "multipart/form-data; boundary=x", None, "application/json; charset=latin-1",
                      "application/jsonx", "text/json", "application/json, text/plain"):
            headers = {"Content-Type": ctype} if ctype else {}
            for path in ("/v1/slides", f"/v1/slides/{SLIDE}/questions", "/v1/chat/completions"):
                error(c.post(path, content=probe, headers=headers), 415, "must be json")
        for ctype in ("application/json", "Application/JSON", "application/json; charset=utf-8",
                      'application/json;charset="UTF-8"'):
            error(c.post("/v1/slides", content=probe, headers={"Content-Type": ctype}), 404, "no such slide")


def test_upload_content_types(server):
    before = set(os.listdir(server.work / "data" / "uploads"))
    with server.client() as c:
        for ctype in ("text/plain", "application/x-www-form-urlencoded", "multipart/form-data; boundary=x",
                      "TEXT/HTML"):
            error(c.post("/v1/slides/upload", params={"filename": "a.svs"}, content=b"II*\0junk",
                         headers={"Content-Type": ctype}), 415, "octet-stream")
        for headers in ({}, {"Content-Type": "application/octet-stream"}, {"Content-Type": "image/tiff"}):
            r = c.post("/v1/slides/upload", params={"filename": "a.svs"}, content=b"", headers=headers)
            error(r, 400, "the upload is empty")  # past the guard: the route's own check
    assert set(os.listdir(server.work / "data" / "uploads")) == before


# -- bodies that gave tracebacks ---------------------------------------------------------------------------------------
def test_deep_and_loose_json(server):
    deep = b'{"a": ' + b"[" * 20000 + b"]" * 20000 + b"}"
    with server.client() as c:
        for path in ("/v1/slides", f"/v1/slides/{SLIDE}/questions", "/v1/chat/completions"):
            post = lambda body: c.post(path, content=body, headers={"Content-Type": "application/json"})  # noqa: E731
            error(post(deep), 400, "nests deeper")
            error(post(b'{"messages": ' + b'{"a": ' * 5000 + b"1" + b"}" * 5001), 400, "nests deeper")
            error(post(b"\xef\xbb\xbf{}"), 400, "byte-order mark")
            error(post(b'{"temperature": NaN}'), 400, "not json")
            error(post(b'{"temperature": 1e999}'), 400, "out of range")
            error(post(b'{"stream": false, "stream": true}'), 400, "repeated")
            error(post(b'{"a": ' + b"9" * 5000 + b"}"), 400, "not json")
            error(post(b"[1]"), 400, "json object")
            error(post(b"\xff\xfe{}"), 400, "utf-8")
            error(post(b'{"path": "\\ud800x", "question": "\\udc00"}'), 400, "unpaired surrogate")
            error(post(b'{"a": "' + b"x" * 100_000 + b'"}'), 413)
        deep_parts = dict(CHAT, messages=[{"role": "user", "content": [[[[{"type": "text", "text": "q"}]]]]}])
        error(c.post("/v1/chat/completions", json=deep_parts), 400, "must be an object")
    assert "Traceback" not in server.log_path.read_text()


@pytest.mark.parametrize("change, message", [
    ({"image_url": {"url": 5}}, "image parts"), ({"image_url": {"url": None}}, "image parts"),
    ({"image_url": None}, "image parts"), ({"image_url": "slide:x"}, "image parts"),
    ({"image_url": {"url": ["slide:x"]}}, "image parts")])
def test_chat_image_url_types(server, change, message):
    body = dict(CHAT, messages=[{"role": "user", "content": [{"type": "image_url", **change},
                                                              {"type": "text", "text": "q"}]}])
    with server.client() as c:
        error(c.post("/v1/chat/completions", json=body), 400, message)


def test_chat_fields(server):
    bad = [({"temperature": -0.5}, "temperature"), ({"temperature": 101}, "temperature"),
           ({"temperature": "0.7"}, "temperature"), ({"temperature": True}, "temperature"),
           ({"top_p": 0}, "top_p"), ({"top_p": 1.5}, "top_p"), ({"top_p": True}, "top_p"),
           ({"max_tokens": "5"}, "max_tokens"), ({"max_tokens": 0}, "max_tokens"), ({"max_tokens": True}, "max_tokens"),
           ({"max_completion_tokens": 2.5}, "max_completion_tokens"), ({"seed": -1}, "seed"), ({"seed": 1.5}, "seed"),
           ({"seed": 2**64}, "seed"), ({"stream": "no"}, "stream"), ({"stream": 0}, "stream"), ({"n": True}, "n must"),
           ({"n": 2}, "n must"), ({"model": 5}, "model"), ({"slide_id": "fedcba9876543210"}, "one slide per request"),
           ({"slide_id": 7}, "slide_id"),
           ({"messages": [{"role": "user", "content": [{"type": "slide", "slide_id": "fedcba9876543210"},
                                                       *CHAT["messages"][0]["content"]]}]}, "one slide per request"),
           ({"messages": [{"role": "user", "content": {"text": "q"}}]}, "content"),
           ({"messages": [{"role": "user", "content": [{"type": "text", "text": {"t": "q"}}]}]}, "text must be"),
           ({"messages": [{"content": "q"}]}, "role")]
    with server.client() as c:
        for change, message in bad:
            error(c.post("/v1/chat/completions", json={**CHAT, **change}), 400, message)
        for change in ({"temperature": 0}, {"temperature": 0.7, "top_p": 0.9, "seed": 3, "max_tokens": 4},
                       {"stream": False}, {"stream": None}, {"slide_id": SLIDE}):
            error(c.post("/v1/chat/completions", json={**CHAT, **change}), 404, "no slide")  # parsed, then looked up


def test_native_route_strict_types(server):
    with server.client() as c:
        for change in ({"stream": "no"}, {"stream": "false"}, {"stream": 0}, {"sample": "yes"}, {"temperature": -1},
                       {"temperature": "0.5"}, {"top_p": 0}, {"top_p": True}, {"seed": "5"}, {"seed": 2**64},
                       {"max_new_tokens": 4.0}, {"evidence_tiles": True}, {"top_k": "3"}):
            error(c.post(f"/v1/slides/{SLIDE}/questions", json={"question": "q", **change}), 400)
        ok = {"question": "q", "stream": False, "temperature": 1, "top_p": 0.5, "seed": 3, "max_new_tokens": 4}
        error(c.post(f"/v1/slides/{SLIDE}/questions", json=ok), 404, "no slide")


def test_client_leaving_mid_body(server):
    uploads = server.work / "data" / "uploads"
    before = set(os.listdir(uploads))
    for path, ctype in (("/v1/slides/upload?filename=half.svs", "application/octet-stream"),
                        ("/v1/chat/completions", "application/json")):
        with socket.create_connection(("127.0.0.1", server.port)) as sock:
            sock.sendall(f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: {ctype}\r\n"
                         f"Content-Length: 40000\r\n\r\n".encode() + b"{" + b"x" * 20000)
            time.sleep(0.5)
    deadline = time.time() + 10
    while time.time() < deadline and "upload abandoned" not in server.log_path.read_text():
        time.sleep(0.2)
    time.sleep(0.5)
    log = server.log_path.read_text()
    assert "upload abandoned" in log and "Traceback" not in log and "ClientDisconnect" not in log, log[-3000:]
    assert set(os.listdir(uploads)) == before
    with server.client() as c:
        assert c.get("/readyz").status_code == 200


# -- registering by path: no existence oracle ----------------------------------------------------------------------
def test_paths_outside_the_roots_all_look_missing(server, roots, tmp_path):
    outside = tmp_path / "real.svs"
    outside.write_bytes(b"II*\0")
    (roots / "to-real.svs").symlink_to(outside)
    (roots / "to-none.svs").symlink_to(tmp_path / "none.svs")
    (roots / "loop.svs").symlink_to(roots / "loop.svs")
    assert tmp_path.parent == roots.parent  # so roots/../<tmp_path name> reaches the file outside
    probes = [str(outside), str(tmp_path / "none.svs"), str(roots / "to-real.svs"), str(roots / "to-none.svs"),
              f"{roots}/../{tmp_path.name}/real.svs", f"{roots}/../{tmp_path.name}/none.svs",
              f"{roots}/../../{roots.parent.name}/{tmp_path.name}/real.svs", str(roots / "loop.svs"), "/etc/passwd",
              "/etc/no-such-file", "/root/.ssh/id_rsa", "relative.svs", str(roots / "none.svs")]
    with server.client() as c:
        for p in probes:
            e = error(c.post("/v1/slides", json={"path": p}), 404)
            assert e == {"type": "not_found", "message": f"{p}: no such slide under the slide roots"}, e
        error(c.post("/v1/slides", json={"path": str(roots / "folder")}), 400, "directory")  # inside: looked at


# -- one error shape -------------------------------------------------------------------------------------------------
def test_every_error_is_json(server):
    with server.client() as c:
        assert error(c.get("/no/such/route"), 404)["type"] == "not_found"
        r = c.delete("/v1/models")
        assert error(r, 405)["type"] == "method_not_allowed" and "GET" in r.headers["allow"]
        error(c.put("/v1/slides", json={}), 405)
        error(c.get("/v1/jobs", params={"limit": "many"}), 400, "limit")
        error(c.get("/static/../../etc/passwd"), 404)
        for r in (c.get("/nope"), c.post("/nope", json={}), c.patch("/v1/slides", json={})):
            assert "detail" not in r.json()


# -- a real browser: the page still works, an attacker's page does not -------------------------------------------------
ATTACK = """<!doctype html><body><form id=f method=POST enctype=text/plain action="{url}/v1/slides">
<input name='{{"path": "{target}", "x": "' value='"}}'></form><script>
(async () => {{
  const post = (path, body, type) => fetch("{url}" + path, {{method: "POST", mode: "no-cors", body,
                                                             headers: type ? {{"Content-Type": type}} : {{}}}});
  await post("/v1/slides/upload?filename=a.svs", new Blob([new Uint8Array([73, 73, 42, 0, 1, 2])]));
  await post("/v1/slides/upload?filename=b.svs", "II*", "text/plain");
  await post("/v1/chat/completions", JSON.stringify({chat}), "text/plain");
  await post("/v1/slides", JSON.stringify({{path: "{target}"}}), "application/x-www-form-urlencoded");
  document.getElementById("f").submit();
}})();
</script>"""


def _refused(c) -> int:
    text = c.get("/metrics").text
    return sum(float(line.split()[-1]) for line in text.splitlines()
               if line.startswith("locpath_http_requests_total{") and 'status="403"' in line)


def test_in_chromium_the_page_works_and_a_cross_site_page_is_refused(server, roots, small_svs, tmp_path):
    import shutil
    import threading
    from functools import partial
    from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer

    sync_api, chromium = browser_api()
    shutil.copy(small_svs, roots / "target.svs")
    (tmp_path / "upload.svs").write_bytes(small_svs.read_bytes())
    (tmp_path / "www").mkdir()
    (tmp_path / "www" / "index.html").write_text(ATTACK.format(url=server.url, target=roots / "target.svs",
                                                               chat=json.dumps(CHAT)))
    evil = ThreadingHTTPServer(("127.0.0.1", 0), partial(SimpleHTTPRequestHandler, directory=tmp_path / "www"))
    threading.Thread(target=evil.serve_forever, daemon=True).start()
    with server.client() as c:
        before, names = _refused(c), {s["name"] for s in c.get("/v1/slides").json()["slides"]}
    try:
        with sync_api.sync_playwright() as p:
            browser = launch_chromium(p, chromium, ["--host-resolver-rules=MAP evil.test 127.0.0.1"])
            try:
                page = browser.new_page()  # the attacker's page, on another site
                page.goto(f"http://evil.test:{evil.server_address[1]}/")
                page.wait_for_url(f"{server.url}/v1/slides", timeout=30000)  # the form posted, after the fetches
                assert json.loads(page.inner_text("body"))["error"]["type"] == "permission_error"
                with server.client() as c:
                    assert _refused(c) - before == 5
                    assert {s["name"] for s in c.get("/v1/slides").json()["slides"]} == names  # nothing registered
                page = browser.new_page()  # the service's own page: registering and uploading still work
                page.goto(server.url + "/")
                page.fill("#register-path", str(roots / "target.svs"))
                page.click("#register-form button")
                page.set_input_files("#upload-file", str(tmp_path / "upload.svs"))
                page.click("#upload-form button")
                page.wait_for_selector("#slides li >> text=upload.svs", timeout=30000)
                page.wait_for_selector("#slides li >> text=target.svs", timeout=30000)
                assert page.inner_text("#slides-error").strip() == ""
            finally:
                browser.close()
    finally:
        evil.shutdown()
