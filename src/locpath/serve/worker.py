"""The inference worker: it owns the Pipeline of one device. Two lanes (threads) share it, each behind a bounded
queue: ingestion (tiles -> encoder -> STM -> resampler, into the slide cache) and questions (TIS, cross-KV,
decoder), so an hour-long slide never holds up a question about a slide that is ready. Everything else in the
service is asynchronous and talks to the lanes through these queues; a full queue is refused at once (the HTTP
layer answers 429), never waited on.

Question results flow back to the event loop that asked, piece by piece (`loop.call_soon_threadsafe`); a question
whose client went away or timed out is cancelled between two decoded tokens.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
from dataclasses import dataclass, field

from ..errors import LocpathError

log = logging.getLogger("locpath.serve")


class QueueFull(Exception):
    """The lane's queue is full: retry after `retry_after` seconds."""

    def __init__(self, lane: str, retry_after: int):
        super().__init__(f"the {lane} queue is full")
        self.lane, self.retry_after = lane, retry_after


@dataclass
class IngestTask:
    job_id: str
    slide_id: str
    path: str
    fetch: object = None  # callable() -> local path, run first in the lane (a DICOMweb retrieval)


@dataclass
class QuestionTask:
    job_id: str
    slide_path: str
    question: str
    sampling: dict
    loop: asyncio.AbstractEventLoop
    events: asyncio.Queue  # ("piece", str) ... then ("done", Answer) or ("error", str)
    cancelled: threading.Event = field(default_factory=threading.Event)
    submitted: float = field(default_factory=time.perf_counter)

    def emit(self, kind: str, value) -> None:
        try:
            self.loop.call_soon_threadsafe(self.events.put_nowait, (kind, value))
        except RuntimeError:  # the loop is closed: the service is stopping
            self.cancelled.set()


_STOP = object()


class Worker:
    def __init__(self, pipe, store, metrics, question_queue: int, ingest_queue: int, owner: str):
        """`owner`: this service instance's name in the job table (one per replica when several share a database)."""
        self.pipe, self.store, self.metrics, self.owner = pipe, store, metrics, owner
        self.questions: queue.Queue = queue.Queue(maxsize=question_queue)
        self.ingests: queue.Queue = queue.Queue(maxsize=ingest_queue)
        self._threads = [threading.Thread(target=self._lane, args=(self.questions, self._run_question),
                                          name="locpath-questions", daemon=True),
                         threading.Thread(target=self._lane, args=(self.ingests, self._run_ingest),
                                          name="locpath-ingest", daemon=True)]
        self.answer_seconds = 1.0  # running estimate, for Retry-After
        self.ingest_seconds = 10.0
        self.busy_ingest: str | None = None

    def start(self) -> "Worker":
        for t in self._threads:
            t.start()
        return self

    def stop(self, timeout: float = 10.0) -> None:
        for q in (self.questions, self.ingests):
            try:
                q.put(_STOP, timeout=timeout)
            except queue.Full:
                pass
        for t in self._threads:
            t.join(timeout)

    def publish_queue_depth(self) -> None:
        """The queue-depth gauges, set when /metrics is scraped (not on every task)."""
        self.metrics.queue_depth.labels("questions").set(self.questions.qsize())
        self.metrics.queue_depth.labels("ingest").set(self.ingests.qsize())

    # -- submission (from the event loop) -------------------------------------------------------------------------
    def submit_question(self, task: QuestionTask) -> None:
        try:
            self.questions.put_nowait(task)
        except queue.Full:
            self.metrics.rejected.labels("questions").inc()
            raise QueueFull("question", max(1, round(self.answer_seconds * self.questions.maxsize / 2))) from None

    def submit_ingest(self, task: IngestTask, force: bool = False) -> None:
        """`force`: resuming jobs at start may exceed the bound (they were accepted before the restart)."""
        try:
            if force:
                self.ingests.put(task)
            else:
                self.ingests.put_nowait(task)
        except queue.Full:
            self.metrics.rejected.labels("ingest").inc()
            raise QueueFull("ingestion", max(1, round(self.ingest_seconds))) from None

    # -- the lanes -------------------------------------------------------------------------------------------------
    @staticmethod
    def _lane(tasks: queue.Queue, run) -> None:
        """One lane: its tasks in order, until the stop marker."""
        while (task := tasks.get()) is not _STOP:
            run(task)

    def _run_ingest(self, task: IngestTask) -> None:
        self.busy_ingest = task.slide_id
        try:
            self._ingest(task)
        except Exception:  # a bug must not kill the lane: the job says what happened
            log.exception("ingestion crashed", extra={"job": task.job_id})
            self.store.update_job(task.job_id, status="failed", error="internal error", finished=time.time())
            self.store.update_slide(task.slide_id, status="failed", error="internal error")
        finally:
            self.busy_ingest = None

    def _ingest(self, task: IngestTask) -> None:
        if not self.store.claim(task.job_id, self.owner):
            return  # deleted, finished, or running on another live replica
        t0 = time.perf_counter()
        self.store.update_slide(task.slide_id, status="ingesting", error=None)
        last = [0.0]

        def progress(done: int, total: int) -> None:
            now = time.perf_counter()
            if now - last[0] > 0.5 or done == total:
                last[0] = now
                frac = done / max(total, 1)
                self.store.heartbeat(task.job_id, self.owner, progress=frac)
                self.store.update_slide(task.slide_id, progress=frac)

        try:
            path = task.fetch() if task.fetch is not None else task.path
            ctx = self.pipe.prepare(path, progress=progress)
        except LocpathError as exc:
            msg = " ".join(str(exc).split())
            self.store.update_job(task.job_id, status="failed", error=msg, finished=time.time())
            self.store.update_slide(task.slide_id, status="failed", error=msg)
            log.warning("ingestion failed", extra={"job": task.job_id, "slide": task.slide_id, "error": msg})
            return
        seconds = time.perf_counter() - t0
        self.ingest_seconds = 0.7 * self.ingest_seconds + 0.3 * seconds
        self.metrics.cache.labels("hit" if ctx.cache_hit else "miss").inc()
        if ctx.tiles_read:
            self.metrics.tiles.inc(ctx.tiles_read)
            self.metrics.tiles_per_s.set(ctx.tiles_read / max(seconds, 1e-9))
        result = {"tiles": ctx.tiles, "tokens_after_stm": ctx.tokens, "cache_hit": ctx.cache_hit,
                  "seconds": round(seconds, 3), "timings_ms": ctx.timings_ms}
        self.store.update_slide(task.slide_id, status="ready", progress=1.0, tiles=ctx.tiles, tokens=ctx.tokens)
        self.store.update_job(task.job_id, status="done", progress=1.0, result=result, finished=time.time())
        log.info("ingested", extra={"job": task.job_id, "slide": task.slide_id, "tiles": ctx.tiles,
                                    "cache_hit": ctx.cache_hit, "seconds": round(seconds, 3)})

    def _run_question(self, task: QuestionTask) -> None:
        if task.cancelled.is_set():
            self.store.update_job(task.job_id, status="cancelled", error="cancelled before it ran",
                                  finished=time.time())
            return
        try:
            self._answer(task)
        except Exception:  # a bug must not kill the lane: the job says what happened
            log.exception("question crashed", extra={"job": task.job_id})
            self.store.update_job(task.job_id, status="failed", error="internal error", finished=time.time())
            task.emit("error", "internal error")

    def _answer(self, task: QuestionTask) -> None:
        self.store.update_job(task.job_id, status="running", started=time.time())
        first = None
        try:
            stream = self.pipe.stream(task.slide_path, task.question, **task.sampling)
            for piece in stream:
                if task.cancelled.is_set():
                    break
                if first is None:
                    first = time.perf_counter()
                    self.metrics.ttft.observe(first - task.submitted)
                task.emit("piece", piece)
        except LocpathError as exc:
            msg = " ".join(str(exc).split())
            self.store.update_job(task.job_id, status="failed", error=msg, finished=time.time())
            task.emit("error", msg)
            return
        if task.cancelled.is_set():
            self.store.update_job(task.job_id, status="cancelled", error="the client went away or timed out",
                                  finished=time.time())
            return
        answer = stream.result
        elapsed = time.perf_counter() - task.submitted
        self.metrics.answer.observe(elapsed)
        if first is None:
            self.metrics.ttft.observe(elapsed)
        self.answer_seconds = 0.8 * self.answer_seconds + 0.2 * elapsed
        self.metrics.cache.labels("hit" if answer.slide["cache_hit"] else "miss").inc()
        self.store.update_job(task.job_id, status="done", progress=1.0, result=answer.to_dict(), finished=time.time())
        task.emit("done", answer)
