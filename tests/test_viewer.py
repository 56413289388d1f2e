"""The page's deep-zoom viewer through the real service (uvicorn in a subprocess, the shipped bundle, the real SVS):
the Deep Zoom descriptor and tiles, their refusals (outside the slide, impossible levels, bad names and formats, no
key or a wrong one, another key's evidence, a swapped file), the overlays, the vendored OpenSeadragon, and the page
in Chromium: the viewer loads, zooming in asks for deeper tiles, an evidence item moves the viewport to its tile.

LOCPATH_SCREENSHOTS=DIR keeps the screenshot of the viewer zoomed on an evidence tile as DIR/viewer.png (the copy in
docs/img/ was made so: `LOCPATH_SCREENSHOTS=docs/img pytest tests/test_viewer.py -k chromium`)."""

import io
import os
import re
import shutil
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

httpx = pytest.importorskip("httpx")
pytest.importorskip("fastapi")

from PIL import Image  # noqa: E402
from servers import Server, browser_api, cli, launch_chromium, register, shipped  # noqa: E402

Q = "What is the diagnosis?"
ROOT = Path(__file__).resolve().parent.parent
DZ = "{http://schemas.microsoft.com/deepzoom/2008}"


def add_key(data: Path, name: str, scopes: str = "read,submit") -> str:
    out = cli("keys", "add", name, "--scopes", scopes, "--data-dir", data, timeout=60)
    assert out.returncode == 0, out.stderr
    return out.stdout.strip()


@pytest.fixture(scope="module")
def srv(tmp_path_factory, real_svs):
    """One server with keys alice and bob, the real slide ready and one answered question of alice's."""
    work = tmp_path_factory.mktemp("viewer")
    root = work / "slides"
    root.mkdir()
    shutil.copy(real_svs, root / "cmu.svs")
    shutil.copy(real_svs, root / "swap.svs")
    toks = {name: add_key(work / "data", name) for name in ("alice", "bob")}
    s = Server(shipped(), work, "--slide-root", root).start()
    try:
        with s.client(toks["alice"]) as c:
            s.slide = register(c, root / "cmu.svs")
            assert s.slide["status"] == "ready", s.slide
            answer = c.post(f"/v1/slides/{s.slide['id']}/questions", json={"question": Q})
            assert answer.status_code == 200, answer.text
            s.answer = answer.json()
        s.toks, s.root = toks, root
        yield s
    finally:
        s.stop()


def error(r, status: int, *fragments) -> dict:
    """One JSON error with this status, holding each fragment."""
    assert r.status_code == status, (r.status_code, r.text)
    body = r.json()
    assert set(body) == {"error"} and set(body["error"]) == {"type", "message"}, body
    for f in fragments:
        assert f in body["error"]["message"], (f, body)
    return body["error"]


def dzi_of(c, sid: str) -> dict:
    r = c.get(f"/v1/slides/{sid}/viewer.dzi")
    assert r.status_code == 200 and r.headers["content-type"].startswith("application/xml"), r.text
    img = ET.fromstring(r.text)
    size = img.find(f"{DZ}Size")
    return {"tile": int(img.get("TileSize")), "overlap": int(img.get("Overlap")), "format": img.get("Format"),
            "width": int(size.get("Width")), "height": int(size.get("Height"))}


def test_descriptor_and_tiles_match_the_slide(srv):
    sid = srv.slide["id"]
    with srv.client(srv.toks["bob"]) as c:  # slides are shared by every reader key, as thumbnail.png is
        d = dzi_of(c, sid)
        assert (d["width"], d["height"], d["tile"], d["overlap"], d["format"]) == (2220, 2967, 254, 1, "jpeg")
        top = (max(d["width"], d["height"]) - 1).bit_length()  # the full-resolution Deep Zoom level
        r = c.get(f"/v1/slides/{sid}/viewer_files/{top}/0_0.jpeg")
        assert r.status_code == 200 and r.headers["content-type"] == "image/jpeg"
        assert "no-store" in r.headers["cache-control"]
        assert Image.open(io.BytesIO(r.content)).size == (255, 255)  # 254 + the overlap on its inner sides
        cols, rows = -(-d["width"] // 254), -(-d["height"] // 254)
        last = Image.open(io.BytesIO(c.get(f"/v1/slides/{sid}/viewer_files/{top}/{cols - 1}_{rows - 1}.jpeg").content))
        assert last.size == (d["width"] - 254 * (cols - 1) + 1, d["height"] - 254 * (rows - 1) + 1)
        again = c.get(f"/v1/slides/{sid}/viewer_files/{top}/0_0.jpeg")
        assert again.content == r.content  # the cached bytes
        one = Image.open(io.BytesIO(c.get(f"/v1/slides/{sid}/viewer_files/0/0_0.jpeg").content))
        assert one.size == (1, 1)
        # the coarsest tile that still holds the slide whole reads all of level 0 (this SVS has one level)
        whole = Image.open(io.BytesIO(c.get(f"/v1/slides/{sid}/viewer_files/{top - 4}/0_0.jpeg").content))
        assert whole.size == (-(-d["width"] // 16), -(-d["height"] // 16))


def test_tiles_outside_the_slide_and_bad_names_are_refused(srv):
    sid = srv.slide["id"]
    with srv.client(srv.toks["alice"]) as c:
        d = dzi_of(c, sid)
        top = (max(d["width"], d["height"]) - 1).bit_length()
        cols, rows = -(-d["width"] // 254), -(-d["height"] // 254)
        base = f"/v1/slides/{sid}/viewer_files"
        error(c.get(f"{base}/{top}/{cols}_0.jpeg"), 404, f"{cols}x{rows} tiles", f"tile {cols}_0 is outside")
        error(c.get(f"{base}/{top}/0_{rows}.jpeg"), 404, "is outside")
        error(c.get(f"{base}/0/1_0.jpeg"), 404, "1x1 tiles at Deep Zoom level 0")
        error(c.get(f"{base}/{top + 1}/0_0.jpeg"), 404, f"levels 0-{top}", f"no level {top + 1}")
        error(c.get(f"{base}/{10 ** 30}/0_0.jpeg"), 404, "no level")
        error(c.get(f"{base}/{top}/{10 ** 40}_0.jpeg"), 404, "is outside")
        for level in ("-1", "x", "1.5", "%C2%B2"):  # superscript two: a Unicode digit int() would take
            error(c.get(f"{base}/{level}/0_0.jpeg"), 400, "level must be a non-negative integer")
        for name in ("0_0", "a_0.jpeg", "0_-1.jpeg", "0-0.jpeg", "0_0_0.jpeg", "0_0.jpeg.png"):
            error(c.get(f"{base}/{top}/{name}"), 400, "<col>_<row>.jpeg")
        error(c.get(f"{base}/{top}/0_0.png"), 400, "served as .jpeg", "'.png'")
        error(c.get(f"{base}/{top}/0_0.JPEG"), 400, "served as .jpeg")
        error(c.get("/v1/slides/0123456789abcdef/viewer.dzi"), 404, "no slide")
        error(c.get("/v1/slides/0123456789abcdef/viewer_files/0/0_0.jpeg"), 404, "no slide")
        error(c.get("/v1/slides/../viewer.dzi"), 404)


def test_without_a_key_or_with_a_wrong_one_everything_is_401(srv):
    sid = srv.slide["id"]
    job = srv.answer["job"]
    paths = [f"/v1/slides/{sid}/viewer.dzi", f"/v1/slides/{sid}/viewer_files/12/0_0.jpeg",
             f"/v1/slides/{sid}/viewer_files/x/y", f"/v1/slides/{sid}/viewer/grid.json",
             f"/v1/slides/{sid}/viewer/heatmap.png?evidence={job}"]
    for key in (None, "lp_not-a-key"):
        with srv.client(key) as c:
            for p in paths:
                e = error(c.get(p), 401)
                assert e["type"] == "authentication_error"
    with httpx.Client(base_url=srv.url) as c:  # the key in the query string is not a key
        error(c.get(paths[1], params={"api_key": srv.toks["alice"]}), 401)


def test_heatmap_is_the_asking_keys_only_and_matches_the_evidence(srv):
    sid, job = srv.slide["id"], srv.answer["job"]
    top = srv.answer["evidence"]["top"]
    with srv.client(srv.toks["alice"]) as a, srv.client(srv.toks["bob"]) as b:
        r = a.get(f"/v1/slides/{sid}/viewer/heatmap.png", params={"evidence": job})
        assert r.status_code == 200 and r.headers["content-type"] == "image/png"
        img = Image.open(io.BytesIO(r.content))
        assert img.mode == "RGBA" and abs(img.size[0] / img.size[1] - 2220 / 2967) < 0.01
        ds = 2967 / img.size[1]
        best = top[0]
        size = srv.answer["evidence"]["tile_size_level0"]
        cx, cy = (best["x"] + size / 2) / ds, (best["y"] + size / 2) / ds
        assert img.getpixel((int(cx), int(cy)))[3] > 200  # the strongest tile is the most opaque
        assert img.getpixel((0, 0))[3] == 0 or (best["x"] < size and best["y"] < size)
        # bob: alice's question reads as a missing one (same status and type), nothing of it in the answer
        theirs = b.get(f"/v1/slides/{sid}/viewer/heatmap.png", params={"evidence": job})
        missing = b.get(f"/v1/slides/{sid}/viewer/heatmap.png", params={"evidence": "0123456789abcdef"})
        assert error(theirs, 404, "no finished question")["type"] == error(missing, 404)["type"] == "not_found"
        assert "diagnosis" not in theirs.text
        error(a.get(f"/v1/slides/{sid}/viewer/heatmap.png"), 400, "evidence")
        grid = a.get(f"/v1/slides/{sid}/viewer/grid.json").json()
        assert (grid["width"], grid["height"]) == (2220, 2967) and grid["tile_size_level0"] == size
        assert len(grid["tiles"]) == srv.slide["tiles"]
        assert [best["x"], best["y"]] in grid["tiles"]


def test_a_swapped_file_stops_showing_even_when_cached(srv):
    with srv.client(srv.toks["alice"]) as c:
        s = register(c, srv.root / "swap.svs")
        tile = f"/v1/slides/{s['id']}/viewer_files/12/0_0.jpeg"
        assert c.get(tile).status_code == 200
        data = bytearray((srv.root / "swap.svs").read_bytes())
        data[-1000:] = bytes(1000)
        (srv.root / "swap.svs").write_bytes(bytes(data))
        refused = error(c.get(tile), 409, "register it again")  # the cached tile is not served
        assert str(srv.root) not in refused["message"]  # no server path for a reader key
        error(c.get(tile), 409, "is failed")  # and the slide is marked failed, as every slide route does


def test_vendored_openseadragon_is_the_recorded_one_and_served(srv):
    check = subprocess.run([sys.executable, str(ROOT / "scripts" / "vendor_openseadragon.py"), "--check"],
                           capture_output=True, text=True, timeout=60)
    assert check.returncode == 0, check.stderr
    assert "openseadragon 6.1.1" in check.stdout
    with httpx.Client(base_url=srv.url) as c:
        js = c.get("/static/vendor/openseadragon/openseadragon.min.js")
        assert js.status_code == 200 and b"OpenSeadragon" in js.content[:2000]
        assert js.headers["content-type"].split(";")[0] in ("text/javascript", "application/javascript")
        assert c.get("/static/vendor/openseadragon/images/zoomin_rest.png").headers["content-type"] == "image/png"
        for bad in ("SHA256SUMS_", "..%2F..%2Fapp.js", "images%2F..%2F..%2Fviewer.js", "openseadragon.js"):
            assert c.get(f"/static/vendor/openseadragon/{bad}").status_code == 404
        assert c.get("/static/viewer.js").status_code == 200


# -- the tiles themselves, in process: OpenSlide's generator over every backend ------------------------------------
def _pixels(img):
    import numpy as np

    return np.asarray(img.convert("RGB"), np.int16)


def test_tiles_equal_openslides_own_generator_and_tiffslides_reads(real_svs, small_tiff):
    """The adapter is faithful: DeepZoomGenerator over the package's Slide gives OpenSlide's own generator's tiles
    (over the raw handle) pixel for pixel, at full resolution and at coarse levels; over tiffslide, the pixels of
    tiffslide's own read of each tile's box. (tiffslide's TiffSlide reads RGB, which DeepZoomGenerator cannot use as
    its alpha mask: 'bad transparency mask'. Hence the adapter, for every backend.)"""
    import openslide
    import tiffslide
    from openslide.deepzoom import DeepZoomGenerator

    from locpath.wsi import open_slide
    from locpath.wsi.deepzoom import deep_zoom

    with open_slide(real_svs, backend="openslide") as s, openslide.OpenSlide(str(real_svs)) as r:
        ours, theirs = deep_zoom(s), DeepZoomGenerator(r, tile_size=254, overlap=1)
        assert ours.level_tiles == theirs.level_tiles and ours.get_dzi("jpeg") == theirs.get_dzi("jpeg")
        top = ours.level_count - 1
        for level, addr in ((top, (0, 0)), (top, (1, 2)), (top - 1, (1, 1)), (top - 3, (0, 0)), (3, (0, 0))):
            a, b = ours.get_tile(level, addr), theirs.get_tile(level, addr)
            assert a.size == b.size and (_pixels(a) == _pixels(b)).all(), (level, addr)
    with open_slide(small_tiff, backend="tiffslide") as s, tiffslide.TiffSlide(str(small_tiff)) as r:
        assert s.level_count == r.level_count == 2
        dz = deep_zoom(s)
        top = dz.level_count - 1
        for addr in ((0, 0), (3, 2), (8, 7)):
            (x, y), level, size = dz.get_tile_coordinates(top, addr)
            assert (_pixels(dz.get_tile(top, addr)) == _pixels(r.read_region((x, y), level, size))).all(), addr
        coarse = dz.get_tile(top - 2, (0, 0))  # read from tiffslide's level 1 (downsample 4), not level 0
        assert dz.get_tile_coordinates(top - 2, (0, 0))[1] == 1 and coarse.size == (255, 255)


def test_dicom_series_tiles_match_the_svs(real_svs, tmp_path):
    """A DICOM series (the same slide through wsidicomizer) has the same Deep Zoom pyramid and, up to JPEG, tiles."""
    pytest.importorskip("wsidicomizer")
    exe = shutil.which("wsidicomizer") or os.path.join(os.path.dirname(sys.executable), "wsidicomizer")
    res = subprocess.run([exe, "-i", str(real_svs), "-o", str(tmp_path / "dcm")], capture_output=True, text=True,
                         timeout=300)
    if res.returncode != 0:
        pytest.skip(f"wsidicomizer cannot convert here: {res.stderr[-300:]}")
    from locpath.wsi import open_slide
    from locpath.wsi.deepzoom import deep_zoom

    with open_slide(real_svs) as svs, open_slide(tmp_path / "dcm") as dcm:
        assert dcm.backend_name == "wsidicom"
        a, b = deep_zoom(svs), deep_zoom(dcm)
        assert a.get_dzi("jpeg") == b.get_dzi("jpeg")
        for level, addr in ((a.level_count - 1, (3, 4)), (a.level_count - 3, (0, 1))):
            ta, tb = _pixels(a.get_tile(level, addr)), _pixels(b.get_tile(level, addr))
            assert ta.shape == tb.shape and abs(ta - tb).mean() < 6, (level, addr, abs(ta - tb).mean())


def test_a_tile_that_would_read_too_much_is_refused_before_reading(monkeypatch):
    import numpy as np

    from locpath.wsi import deepzoom
    from locpath.wsi.slide import ArraySlide

    monkeypatch.setattr(deepzoom, "MAX_READ_PIXELS", 600 * 600)
    slide = ArraySlide([np.full((2000, 2000, 3), 200, np.uint8)], mpp=0.5, name="flat.svs")  # one level only
    reads = []
    slide._read = lambda *a, _read=slide._read: reads.append(a) or _read(*a)
    dz = deepzoom.deep_zoom(slide)
    top = dz.level_count - 1
    assert len(deepzoom.tile_jpeg(dz, slide, top - 1, 0, 0)) > 0  # 508x508 of level 0: within the budget
    reads.clear()
    with pytest.raises(deepzoom.TileTooCostly, match=r"flat.svs: Deep Zoom level 8 would read 2000x2000 pixels"):
        deepzoom.tile_jpeg(dz, slide, top - 3, 0, 0)
    assert reads == []


def test_tile_cache_stays_within_its_bytes():
    from locpath.serve.tilecache import ByteLRU

    c = ByteLRU(100)
    for i in range(10):
        c.put(i, bytes(30))
        assert c.size <= 100
    assert len(c) == 3 and c.get(0) is None and c.get(9) == bytes(30)
    c.get(7)
    c.put("x", bytes(30))  # 8, the least recently used, goes
    assert c.get(8) is None and c.get(7) is not None
    c.put("huge", bytes(101))
    assert c.get("huge") is None and c.size <= 100


# -- the page, in a real browser --------------------------------------------------------------------------------------
TILE_URL = re.compile(r"/v1/slides/[0-9a-f]{16}/viewer_files/(\d+)/(\d+)_(\d+)\.jpeg$")


def _tile_levels(requests: list) -> list[int]:
    return [int(m.group(1)) for r in requests if (m := TILE_URL.search(r.url))]


def _bounds(page) -> dict:
    """The viewport's target bounds in level-0 pixels of the slide."""
    return page.evaluate("""() => { const v = LocpathViewer.viewer, img = v.world.getItemAt(0);
        const r = img.viewportToImageRectangle(v.viewport.getBounds());
        return {x: r.x, y: r.y, width: r.width, height: r.height}; }""")


def _settle(page) -> None:
    """Wait until the viewport stops moving and the slide's tiles for it are drawn."""
    page.wait_for_function("""() => { const v = LocpathViewer.viewer; return v && v.world.getItemAt(0) &&
        Math.abs(v.viewport.getZoom(true) - v.viewport.getZoom()) < 1e-6 &&
        v.viewport.getCenter(true).distanceTo(v.viewport.getCenter()) < 1e-6 &&
        v.world.getItemAt(0).getFullyLoaded(); }""", timeout=30000)


def test_viewer_in_chromium(srv, tmp_path):
    sync_api, chromium = browser_api()
    key = srv.toks["alice"]
    with sync_api.sync_playwright() as p:
        browser = launch_chromium(p, chromium)
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 1000})
            seen = []
            page.on("request", lambda r: seen.append(r))
            page.goto(srv.url + "/")
            page.fill("#apikey", key)
            page.dispatch_event("#apikey", "change")
            page.click("#slides li[data-status=ready] >> text=cmu.svs", timeout=30000)
            page.wait_for_selector("#osd[data-state=open]", timeout=30000)
            _settle(page)
            # the descriptor and tiles went with the key in a header, never in the URL
            viewer_requests = [r for r in seen if "/v1/slides/" in r.url and "/viewer" in r.url]
            assert any(r.url.endswith("/viewer.dzi") for r in viewer_requests)
            first = _tile_levels(seen)
            assert first, "no tile was drawn"
            for r in viewer_requests:
                assert key not in r.url and r.all_headers().get("authorization") == f"Bearer {key}", r.url
            # zooming in asks for deeper levels
            page.evaluate("() => LocpathViewer.viewer.viewport.zoomBy(8)")
            _settle(page)
            assert max(_tile_levels(seen)) > max(first), (sorted(set(first)), sorted(set(_tile_levels(seen))))
            _ask_and_go_to_evidence(page, srv, tmp_path)
        finally:
            browser.close()


def _ask_and_go_to_evidence(page, srv, tmp_path) -> None:
    page.fill("#question", Q)
    page.click("#ask-button")
    page.wait_for_selector("#answer[data-state=done]", timeout=60000)
    page.wait_for_selector("#osd[data-heatmap]", timeout=30000)
    page.wait_for_selector("#view-image[data-evidence]", timeout=30000)  # the page's own heatmap, as before
    items = page.locator("#evidence-list li")
    top = srv.answer["evidence"]["top"]
    assert items.count() == len(top)
    page.evaluate("() => { const o = document.getElementById('heat-opacity'); o.value = '0.6';"
                  " o.dispatchEvent(new Event('input')); }")
    assert page.evaluate("() => LocpathViewer.viewer.world.getItemAt(1).getOpacity()") == pytest.approx(0.6)
    # the second tile, so the viewport surely moves away from where the zoom left it
    pick = items.nth(1)
    x, y, size = (int(pick.get_attribute(f"data-{k}")) for k in ("x", "y", "size"))
    assert {"x": x, "y": y} == {k: top[1][k] for k in ("x", "y")}
    before = _bounds(page)
    pick.locator("button").click()
    b = _bounds(page)
    assert b != before
    assert b["x"] <= x - size / 2 + 1 and b["y"] <= y - size / 2 + 1  # the tile with half a tile around it...
    assert b["x"] + b["width"] >= x + 1.5 * size - 1 and b["y"] + b["height"] >= y + 1.5 * size - 1
    assert min(b["width"], b["height"]) == pytest.approx(2 * size, rel=0.05)  # ...filling the viewer's short side
    page.check("#grid-toggle")
    page.wait_for_selector("#osd[data-grid=shown] svg.tissue-grid path")
    assert page.get_attribute("svg.tissue-grid path", "d").count("M") == srv.slide["tiles"]
    _settle(page)
    page.wait_for_timeout(300)
    shot = tmp_path / "viewer.png"
    page.locator("#viewer-panel").screenshot(path=str(shot))
    assert Image.open(shot).size[0] > 600
    keep = os.environ.get("LOCPATH_SCREENSHOTS")
    if keep:  # 256 colours: half the bytes in git, the same picture to the eye
        Image.open(shot).convert("RGB").quantize(256).save(Path(keep) / "viewer.png", optimize=True)
