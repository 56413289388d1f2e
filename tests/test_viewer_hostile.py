"""The viewer under a hostile reader, through the real service (uvicorn in a subprocess, the shipped bundle, the real
SVS): floods of tile requests, requests abandoned while they wait, and cached tiles asked for during a flood.

The SVS has one pyramid level, so its coarse Deep Zoom tiles read a lot of level 0 (levels 8-10: 1-6.6 Mpx each):
a few of them hold every render slot (ServeConfig.tile_renders, 4) for a while, and what is asked for meanwhile waits.
Each test uses its own registration of the slide (same file content: ingested from the slide cache), so its tiles
are not in the viewer's cache yet."""

import asyncio
import json
import shutil
import time

import pytest

httpx = pytest.importorskip("httpx")
pytest.importorskip("fastapi")

from servers import Server, register, shipped  # noqa: E402

# the expensive tiles of the 2220x2967 one-level SVS (Deep Zoom levels 8-10), then its cheap full-resolution ones
EXPENSIVE = [(8, 0, 0)] + [(9, c, r) for c in range(2) for r in range(2)] + [(10, c, r) for c in range(3)
                                                                            for r in range(3)]
CHEAP = [(12, c, r) for c in range(9) for r in range(12)] + [(11, c, r) for c in range(5) for r in range(6)]


@pytest.fixture(scope="module")
def srv(tmp_path_factory, real_svs):
    work = tmp_path_factory.mktemp("viewer-hostile")
    root = work / "slides"
    root.mkdir()
    for name in ("flood", "gone", "cached", "busy"):
        shutil.copy(real_svs, root / f"{name}.svs")
    s = Server(shipped(), work, "--slide-root", root).start()
    try:
        with s.client() as c:
            s.ids = {}
            for name in ("flood", "gone", "cached", "busy"):
                slide = register(c, root / f"{name}.svs")
                assert slide["status"] == "ready", slide
                s.ids[name] = slide["id"]
        yield s
    finally:
        s.stop()


def _url(sid: str, tile: tuple[int, int, int]) -> str:
    return f"/v1/slides/{sid}/viewer_files/{tile[0]}/{tile[1]}_{tile[2]}.jpeg"


async def _get_all(base: str, urls: list[str], timeout: float, pause: float = 0.0, first: int = 0) -> list:
    """GET every URL at once, each on its own connection (the first `first` sent `pause` seconds ahead); a request
    whose client gives up (timeout) reads as 'gone'."""
    async with httpx.AsyncClient(base_url=base, timeout=timeout, limits=httpx.Limits(max_connections=None)) as c:
        async def one(u):
            try:
                return await c.get(u)
            except httpx.TimeoutException:
                return "gone"
        head = [asyncio.create_task(one(u)) for u in urls[:first]]
        await asyncio.sleep(pause)
        return await asyncio.gather(*head, *(one(u) for u in urls[first:]))


def test_a_flood_of_tile_renders_is_bounded_with_429(srv):
    """Waiting renders are bounded (4 slots x 16): beyond that a request is refused at once with 429 and
    Retry-After, not queued without bound (the old code queued all of them)."""
    sid = srv.ids["flood"]
    urls = [_url(sid, t) for t in EXPENSIVE[:5] + CHEAP]
    rs = asyncio.run(_get_all(srv.url, urls, timeout=120, pause=0.1, first=5))
    codes = [r.status_code for r in rs]
    assert set(codes) <= {200, 429}, codes
    refused = [r for r in rs if r.status_code == 429]
    assert refused, f"{len(urls)} renders at once were all queued"
    r = refused[0]
    assert r.headers["retry-after"] == "1"
    assert r.json()["error"]["type"] == "rate_limit_error" and "waiting to be rendered" in r.json()["error"]["message"]
    assert codes.count(200) >= 4 * 16  # the bound itself: every request within it was served
    with srv.client() as c:  # and the service is fine afterwards
        assert c.get(urls[-1]).status_code == 200


def _viewer_statuses(srv, since: int) -> list[int]:
    lines = srv.log_path.read_bytes()[since:].decode().splitlines()
    return [d["status"] for d in map(json.loads, (ln for ln in lines if ln.startswith("{")))
            if d.get("route") == "/v1/slides/{slide_id}/viewer_files/{level}/{name}"]


def test_requests_abandoned_while_waiting_are_not_rendered(srv):
    """Clients that give up while their tiles wait for a render slot leave nothing behind: those tiles are not
    rendered (499 in the log); the old code rendered every one of them after the clients had gone."""
    sid = srv.ids["gone"]
    urls = [_url(sid, t) for t in EXPENSIVE[:5] + CHEAP[:40]]
    since = srv.log_path.stat().st_size
    rs = asyncio.run(_get_all(srv.url, urls, timeout=0.15, pause=0.05, first=5))
    assert rs.count("gone") >= 30, rs
    deadline = time.time() + 60
    while len(statuses := _viewer_statuses(srv, since)) < len(urls) and time.time() < deadline:
        time.sleep(0.2)
    assert len(statuses) == len(urls), statuses
    assert statuses.count(499) >= 25, sorted(statuses)  # all but the few in progress when the clients left
    assert set(statuses) <= {200, 499}


def test_cached_tiles_do_not_wait_behind_renders(srv):
    """A tile already in the viewer's cache is answered while renders hold every slot (the old code queued the
    cached one behind all of them)."""
    sid, other = srv.ids["busy"], srv.ids["cached"]
    cached = _url(other, (12, 0, 0))
    with srv.client() as c:
        assert c.get(cached).status_code == 200
    burst = [_url(sid, t) for t in EXPENSIVE]

    async def run():
        async with httpx.AsyncClient(base_url=srv.url, timeout=120,
                                     limits=httpx.Limits(max_connections=None)) as c:
            tasks = [asyncio.create_task(c.get(u)) for u in burst]
            await asyncio.sleep(0.1)
            r = await c.get(cached)
            pending = sum(not t.done() for t in tasks)
            rs = await asyncio.gather(*tasks)
            return r, pending, rs
    r, pending, rs = asyncio.run(run())
    assert r.status_code == 200 and [x.status_code for x in rs] == [200] * len(burst)
    # FIFO behind 14 renders in 4 slots, the cached tile came back with at most 3 still running
    assert pending >= 5, f"the cached tile came back with only {pending} of {len(burst)} renders left"
