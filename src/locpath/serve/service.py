"""The service's shared state: settings, job store, pipeline, worker lanes, metrics, and the sweeper that keeps
instances sharing one database honest (heartbeats, adopted ingestions, removed failed uploads)."""

from __future__ import annotations

import logging
import os
import shutil
import socket
import threading
import time
from pathlib import Path

from ..errors import ConfigError, LocpathError
from .config import ServeConfig
from .dicomweb import retrieve_series
from .metrics import Metrics
from .store import JobStore
from .views import server_paths
from .worker import IngestTask, Worker

log = logging.getLogger("locpath.serve")
SWEEP_S = 15.0  # how often an instance says it is alive and looks for the work of lost ones
CLEAN_S = 2.0  # how often the files of failed uploads are removed
ORPHAN_AGE_S = 3600.0  # an upload folder with no slide row, untouched this long, is removed (another replica's crash)


MALLOC_ARENAS = 2  # glibc malloc arenas for the whole process (see limit_malloc_arenas)


def limit_malloc_arenas(n: int = MALLOC_ARENAS) -> None:
    """Blocking route work runs on the threadpool's threads, and glibc gives every thread that allocates an arena
    of its own (up to 8 per core) that keeps what it freed: 80 questions from 8 clients grew the RSS by ~170 MB,
    with 2 arenas by ~13 MB. Best effort: nothing happens off glibc."""
    import ctypes
    import ctypes.util

    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.mallopt(-8, n)  # M_ARENA_MAX
    except (OSError, AttributeError):
        pass


def open_checked(cfg: ServeConfig) -> JobStore:
    """The settings checked and the job store opened (no model loaded): what `serve --ray` runs in the driver,
    where an error can be shown, before any replica builds its Service."""
    _private_dirs(cfg.data_dir)
    cfg.validate()
    store = JobStore(cfg.database_url, init=cfg.init_database)
    if not cfg.loopback and not store.active_keys():
        store.close()
        raise ConfigError(f"--host {cfg.host} is not a loopback address: add an API key first "
                          f"(locpath keys add NAME --data-dir {cfg.data_dir}), or bind to 127.0.0.1")
    return store


class Service:
    """What the routes share: config, store, pipeline, worker, metrics. `owner` names this instance in the job
    table (one per Ray Serve replica when several share a database)."""

    def __init__(self, cfg: ServeConfig, pipe=None, owner: str | None = None):
        from ..runtime.pipeline import Pipeline

        self.store = open_checked(cfg)
        self.cfg = cfg
        # stable across restarts of the same server (its unfinished jobs resume at once), distinct between servers
        self.owner = owner or f"{socket.gethostname()}:{cfg.port}"
        self.uploading: dict[str, tuple[str | None, int]] = {}  # upload folder -> (API key id, bytes so far)
        self.server_paths = server_paths(cfg)
        try:
            self.pipe = pipe or Pipeline.from_bundle(cfg.bundle, cfg.runtime)
        except BaseException:
            self.store.close()
            raise
        self.metrics = Metrics(self.store)
        self.worker = Worker(self.pipe, self.store, self.metrics, cfg.question_queue, cfg.ingest_queue, self.owner)
        self.worker.opener = self.open_slide
        self.worker.reprepare = self.reprepare
        self.results = None  # --store-results: answers' DICOM objects back to the DICOMweb server (a thread)
        if cfg.store_results:
            self.results = _results_store(cfg, self.store, self.pipe)
            self.worker.on_answer = self.results.submit
        self.started = False

    @property
    def auth_required(self) -> bool:
        """Read from the store each time: a key added or revoked while the service runs counts at once."""
        return self.store.active_keys() > 0 or not self.cfg.loopback

    def start(self) -> None:
        if self.started:
            return
        self.started = True
        limit_malloc_arenas()
        self.worker.start()
        if self.results is not None:
            self.results.start()
        self.store.beat(self.owner)
        cancelled = self.store.abandon_questions(self.owner, include_own=True)
        resumed = self._resume(self.store.adopt_ingestions(self.owner, include_own=True))
        self._clean_uploads(at_start=True)
        self._stopping = threading.Event()
        self._sweeper = threading.Thread(target=self._sweep, name="locpath-sweep", daemon=True)
        self._sweeper.start()
        log.info("service started", extra={"bundle": str(self.cfg.bundle), "instance": self.owner,
                                           "resumed_ingestions": resumed, "abandoned_questions": cancelled,
                                           "auth": self.auth_required})

    def _resume(self, jobs) -> int:
        n = 0
        for job in jobs:
            slide = self.store.slide(job.slide_id)
            if slide is None:
                self.store.update_job(job.id, status="cancelled", error="slide deleted", finished=time.time())
                continue
            self.worker.submit_ingest(self.ingest_task(job.id, slide), force=True)
            n += 1
        return n

    def _sweep(self) -> None:
        """Every few seconds: say this instance is alive, take over the ingestions of instances that are gone
        (a lost node or replica) and close their questions; remove the files of failed uploads."""
        last = time.monotonic()
        while not self._stopping.wait(CLEAN_S):
            try:
                self._clean_failed_uploads()
                if time.monotonic() - last < SWEEP_S:
                    continue
                last = time.monotonic()
                self._clean_uploads()
                self.store.beat(self.owner)
                self.store.abandon_questions(self.owner, include_own=False)
                taken = self._resume(self.store.adopt_ingestions(self.owner))
                if taken:
                    log.warning("took over ingestions of a lost instance", extra={"jobs": taken})
            except Exception:  # the database may be briefly unreachable; try again next round
                log.exception("sweep failed")

    def _clean_failed_uploads(self) -> None:
        """Uploads whose ingestion failed for good lose their file (the slide row keeps its error, and the key's
        quota gets the bytes back)."""
        uploads = self.cfg.data_dir / "uploads"
        for slide in self.store.failed_uploads():
            folder = Path(slide.path).parent
            if folder.parent == uploads:
                shutil.rmtree(folder, ignore_errors=True)
            self.store.update_slide(slide.id, bytes=None)

    def _clean_uploads(self, at_start: bool = False) -> None:
        """Failed uploads' files, and upload folders no slide refers to (a server killed mid-upload: `.part`
        files): at start, when no other instance shares the database, all of them; otherwise those untouched for
        ORPHAN_AGE_S."""
        self._clean_failed_uploads()
        uploads = self.cfg.data_dir / "uploads"
        busy = set(self.uploading.copy())  # before the slide rows: an upload registers its row, then leaves
        keep = {Path(p).parent.name for p in self.store.upload_paths()}
        alone = at_start and not (self.store.live_owners() - {self.owner})
        try:
            entries = list(uploads.iterdir())
        except OSError:
            return
        for entry in entries:
            if entry.name in keep or entry.name in busy or not (alone or _age(entry) > ORPHAN_AGE_S):
                continue
            log.warning("removing an unfinished upload", extra={"folder": entry.name})
            if entry.is_dir() and not entry.is_symlink():
                shutil.rmtree(entry, ignore_errors=True)
            else:
                entry.unlink(missing_ok=True)

    def stop(self) -> None:
        """Stop the lanes and the sweeper when started; always free the pipeline's sessions and the database."""
        if self.started:
            self.started = False
            self._stopping.set()
            self._sweeper.join(5)
            self.worker.stop()
            if self.results is not None:
                self.results.stop()
        self.pipe.release()
        self.store.close()

    def open_slide(self, slide_id: str):
        """The registered slide's file, checked and pinned (serve/slide_files.py): what every reader gets."""
        from .slide_files import SlideGone, open_registered

        slide = self.store.slide(slide_id)
        if slide is None:
            raise SlideGone(f"slide {slide_id} was deleted")
        return open_registered(self.cfg, self.store, slide)

    def ingest_task(self, job_id: str, slide) -> IngestTask:
        if slide.source_kind != "dicomweb":
            return IngestTask(job_id, slide.id, slide.path, timeout_s=self.cfg.ingest_timeout_s)
        study, series = slide.source.split("/", 1)
        url = self.cfg.dicomweb_url

        def retrieve():
            if not url:
                raise LocpathError("no DICOMweb server is configured (--dicomweb URL)")
            return str(retrieve_series(url, study, series, self.cfg.data_dir))
        return IngestTask(job_id, slide.id, slide.path, retrieve, self.cfg.ingest_timeout_s)

    def reprepare(self, slide_id: str) -> None:
        """A ready slide whose latents are gone (the question lane found it neither in memory nor in the slide
        cache) goes back to the ingestion lane with a new job; its status shows it until it is ready again."""
        slide = self.store.slide(slide_id)
        if slide is None or slide.status != "ready":
            return  # deleted, or already being prepared again
        job, _ = self.store.add_job("ingest", slide.id, {"source_kind": slide.source_kind, "source": slide.source,
                                                         "again": "its latents were gone"},
                                    owner=self.owner, key_id=slide.key_id)
        self.store.update_slide(slide.id, status="registered", progress=0.0, error=None)
        self.worker.submit_ingest(self.ingest_task(job.id, self.store.slide(slide.id)), force=True)


def _results_store(cfg: ServeConfig, store: JobStore, pipe):
    """The STOW-RS thread's state, with the bundle's identity (read once, here: a bad bundle fails the start)."""
    from ..dicomout.identity import pipeline_identity
    from .results_store import ResultsStore

    try:
        return ResultsStore(cfg, store, pipeline_identity(pipe), cfg.store_attempts)
    except LocpathError as exc:
        raise ConfigError(f"--store-results: {exc}") from None


def _private_dirs(data_dir: Path) -> None:
    """The data folder (when made here) and its subfolders: this user's only (uploads are patients' data)."""
    try:
        data_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        for sub in ("uploads", "dicomweb", "thumbnails"):
            (data_dir / sub).mkdir(exist_ok=True, mode=0o700)
            st = (data_dir / sub).stat()
            if st.st_mode & 0o077 and st.st_uid == os.getuid():
                os.chmod(data_dir / sub, 0o700)
    except OSError:
        pass  # ServeConfig.validate says what is wrong


def _age(path: Path) -> float:
    """Seconds since anything in an upload folder last changed."""
    try:
        times = [path.lstat().st_mtime] + ([p.lstat().st_mtime for p in path.iterdir()] if path.is_dir() else [])
    except OSError:
        return 0.0
    return time.time() - max(times)
