"""Answers back to the archive (`serve --store-results`): after a question about a slide pulled from DICOMweb is
answered, its DICOM SR and bulk annotations (locpath.dicomout) are made from the retrieved series' headers and
stored with STOW-RS on the DICOMweb server the slide came from. The work runs on a thread of its own, never on the
answering path; a failed store is retried a bounded number of times with doubling waits, and every step is
recorded in the job (`dicom_store`: status, study/series/SOP instance UIDs, attempts, last error without
credentials), so `GET /v1/jobs/{id}` shows it. Stores still waiting when the service stops are marked failed."""

from __future__ import annotations

import heapq
import itertools
import logging
import threading
import time
from dataclasses import dataclass, field

from ..dicomout import build_objects
from ..dicomout.identity import ModelIdentity
from ..dicomout.sources import read_source
from ..errors import LocpathError
from .dicomweb import series_folder, shown, store_instances, why

log = logging.getLogger("locpath.serve")
MAX_BACKOFF_S = 300.0


@dataclass(order=True)
class _Due:
    at: float
    seq: int
    job_id: str = field(compare=False)
    slide_id: str = field(compare=False)
    answer: dict = field(compare=False)
    attempts: int = field(compare=False, default=0)
    objects: tuple | None = field(compare=False, default=None)  # (sr, ann or None), made once
    state: dict = field(compare=False, default_factory=dict)


class ResultsStore:
    def __init__(self, cfg, store, identity: ModelIdentity, attempts: int, backoff_s: float = 1.0):
        """`store`: the job store (JobStore) the status is written to; `attempts`: STOW-RS tries per answer."""
        self.cfg, self.store, self.identity = cfg, store, identity
        self.attempts, self.backoff_s = max(1, attempts), backoff_s
        self._heap: list[_Due] = []
        self._seq = itertools.count()
        self._cv = threading.Condition()
        self._stopping = False
        self._thread = threading.Thread(target=self._run, name="locpath-results-store", daemon=True)

    def start(self) -> "ResultsStore":
        self._thread.start()
        return self

    def stop(self, timeout: float = 10.0) -> None:
        """Stop after the store under way; stores still waiting are recorded as failed (not resumed)."""
        with self._cv:
            self._stopping = True
            self._cv.notify_all()
        self._thread.join(timeout)
        for due in self._heap:
            self._record(due, "failed", error=(due.state.get("last_error") or "") + " (the service stopped)")
        self._heap.clear()

    def submit(self, job_id: str, slide_id: str | None, answer: dict) -> None:
        """Called by the question lane once an answer is done: only queues (no I/O on the answering path)."""
        if slide_id is None:
            return
        with self._cv:
            heapq.heappush(self._heap, _Due(time.time(), next(self._seq), job_id, slide_id, answer))
            self._cv.notify()

    # -- the storing thread -----------------------------------------------------------------------------------------
    def _run(self) -> None:
        while True:
            with self._cv:
                while not self._stopping and (not self._heap or self._heap[0].at > time.time()):
                    self._cv.wait(None if not self._heap else max(0.0, self._heap[0].at - time.time()))
                if self._stopping:
                    return
                due = heapq.heappop(self._heap)
            try:
                self._attempt(due)
            except Exception:  # a bug must not kill the thread: the job says so
                log.exception("storing results crashed", extra={"job": due.job_id})
                self._record(due, "failed", error="internal error")

    def _attempt(self, due: _Due) -> None:
        if due.objects is None and not self._prepare(due):
            return
        due.attempts += 1
        self._record(due, "storing")
        try:
            stored = store_instances(self.cfg.dicomweb_url, [d for d in due.objects if d is not None])
        except LocpathError as exc:
            error = " ".join(str(exc).split())
            if due.attempts >= self.attempts:
                self._record(due, "failed", error=error)
                log.warning("storing results failed", extra={"job": due.job_id, "attempts": due.attempts,
                                                             "error": error})
                return
            wait = min(self.backoff_s * 2 ** (due.attempts - 1), MAX_BACKOFF_S)
            self._record(due, "retrying", error=error, next_attempt_in_s=round(wait, 3))
            with self._cv:
                due.at, due.seq = time.time() + wait, next(self._seq)
                heapq.heappush(self._heap, due)
            return
        self._record(due, "stored", error=None, stored=stored)
        log.info("results stored", extra={"job": due.job_id, "instances": len(stored)})

    def _prepare(self, due: _Due) -> bool:
        """The SR and annotations of a DICOMweb slide's answer; False (recorded) when there is nothing to store."""
        slide = self.store.slide(due.slide_id)
        if slide is None or slide.source_kind != "dicomweb":
            return False  # a slide file or upload: no archive to store to
        try:
            if not self.cfg.dicomweb_url:
                raise LocpathError("no DICOMweb server is configured (--dicomweb URL)")
            study, series = slide.source.split("/", 1)
            source = read_source(series_folder(self.cfg.data_dir, study, series))
            due.objects = build_objects(source, self.identity, [due.answer])
        except (LocpathError, ValueError) as exc:
            self._record(due, "failed", error=" ".join(str(exc).split()))
            return False
        sr, ann = due.objects
        due.state = {"server": shown(self.cfg.dicomweb_url), "study": source.study_uid,
                     "sr": {"series": str(sr.SeriesInstanceUID), "sop_instance": str(sr.SOPInstanceUID)},
                     "annotations": None if ann is None else {"series": str(ann.SeriesInstanceUID),
                                                              "sop_instance": str(ann.SOPInstanceUID)}}
        return True

    def _record(self, due: _Due, status: str, error: str | None = None, **extra) -> None:
        """The job's `dicom_store` (a failing database is logged, never raised into the thread)."""
        if error is not None or status in ("stored", "failed"):
            due.state["last_error"] = why(Exception(error)) if error else None
        due.state.pop("next_attempt_in_s", None)
        due.state.update(status=status, attempts=due.attempts, max_attempts=self.attempts, updated=time.time(),
                         **extra)
        try:
            self.store.update_job(due.job_id, dicom_store=due.state)
        except Exception:
            log.exception("could not record the results store status", extra={"job": due.job_id})
