"""Uploads: the slide's bytes streamed into a private folder, counted against the key's quota as they arrive;
whatever is refused (quota, a bad file, a client that leaves) leaves nothing on disk. File writes and store reads run
in worker threads (anyio), never on the event loop."""

from __future__ import annotations

import os
import re
import shutil
from pathlib import Path

import anyio
from starlette.concurrency import run_in_threadpool

from .errors import ApiError
from .service import Service


def safe_filename(name: str) -> str:
    base = Path(name.replace("\\", "/")).name
    base = re.sub(r"[^A-Za-z0-9._-]+", "_", base).strip("._")[:128]
    if not base:
        raise ApiError(400, "invalid_request_error", f"filename {name!r} has no usable characters")
    return base


class UploadQuota:
    """One upload's share of its key's quota: the key's stored uploads (from the store, refreshed every 64 MiB)
    plus its other uploads in flight on this instance plus this one's bytes so far must stay within the quota.
    Blocking (it reads the store): call it from a worker thread."""

    REFRESH = 64 << 20

    def __init__(self, svc: Service, key_id: str | None, folder: str):
        self.svc, self.key_id, self.folder, self.size = svc, key_id, folder, 0
        self.stored = svc.store.upload_bytes(key_id)
        self.checked = 0
        svc.uploading[folder] = (key_id, 0)

    def grow(self, n: int) -> None:
        self.size += n
        self.svc.uploading[self.folder] = (self.key_id, self.size)
        self.check(self.size, fresh=self.size - self.checked >= self.REFRESH)

    def check(self, size: int, fresh: bool = False) -> None:
        if fresh:
            self.stored, self.checked = self.svc.store.upload_bytes(self.key_id), size
        others = sum(n for f, (k, n) in list(self.svc.uploading.items()) if k == self.key_id and f != self.folder)
        quota = self.svc.cfg.upload_quota_bytes
        if self.stored + others + size > quota:
            raise ApiError(413, "insufficient_quota", f"this upload would take the key's uploads past its quota of "
                           f"{quota} bytes ({self.stored + others} bytes stored or arriving); delete slides first")


async def receive(request, quota: UploadQuota, target: Path) -> None:
    """The request body into `target` (atomically, private), counted against the quota, then checked as a slide
    file; raises (and leaves no file) when refused."""
    from ..fsutil import atomic_file
    from ..wsi.factory import check_slide_file

    declared = request.headers.get("content-length", "")
    await run_in_threadpool(quota.check, int(declared) if declared.isdigit() else 0)  # before a byte is stored
    await anyio.to_thread.run_sync(lambda: target.parent.mkdir(mode=0o700))
    with atomic_file(target, suffix=".part") as tmp:
        os.chmod(tmp, 0o600)
        async with await anyio.open_file(tmp, "wb") as out:
            async for piece in request.stream():
                await out.write(piece)
                if quota.size + len(piece) - quota.checked >= quota.REFRESH:
                    await run_in_threadpool(quota.grow, len(piece))  # reads the store
                else:
                    quota.grow(len(piece))
        if quota.size == 0:
            raise ApiError(400, "invalid_request_error", "the upload is empty")
        await run_in_threadpool(check_slide_file, tmp)
    os.chmod(target, 0o600)
    await run_in_threadpool(quota.check, quota.size, True)


def remove(folder: Path) -> None:
    shutil.rmtree(folder, ignore_errors=True)
