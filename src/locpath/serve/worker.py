"""The inference worker: it owns the Pipeline of one device. Two lanes (threads) share it, each behind a bounded
queue: ingestion (tiles -> encoder -> STM -> resampler, into the slide cache) and questions (TIS, cross-KV,
decoder), so an hour-long slide never holds up a question about a slide that is ready. Everything else in the
service is asynchronous and talks to the lanes through these queues; a full queue is refused at once (the HTTP
layer answers 429), never waited on.

The question lane decodes the questions of concurrent clients as one batch (runtime/answer_batch.py): a queued
question joins as soon as a row is free, between two decoder steps. Results flow back to the event loop that
asked, piece by piece (`loop.call_soon_threadsafe`); a question whose client went away or timed out is dropped
from the batch between two decoded tokens.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import queue
import threading
import time
from dataclasses import dataclass, field

from ..errors import LocpathError
from ..runtime.pipeline import NotPrepared
from ..runtime.question import Question

log = logging.getLogger("locpath.serve")


class QueueFull(Exception):
    """The lane's queue is full: retry after `retry_after` seconds."""

    def __init__(self, lane: str, retry_after: int):
        super().__init__(f"the {lane} queue is full")
        self.lane, self.retry_after = lane, retry_after


class InferenceError(Exception):
    """The model failed on a question (non-finite logits, a crashed decoder step): the service's fault, not the
    client's (HTTP 500)."""


class Reprepared(Exception):
    """The question lane found the slide neither in memory nor in the slide cache (evicted, cleaned, or ingested by
    another replica): the slide went back to the ingestion lane; ask again when it is ready (HTTP 503)."""

    def __init__(self, slide_id: str | None, retry_after: float):
        super().__init__(f"slide {slide_id} is not prepared on this instance (its latents are gone from memory and the "
                         "slide cache); it is being prepared again: ask when it is ready")
        self.slide_id, self.retry_after = slide_id, retry_after


MAX_ATTEMPTS = 3  # an ingestion interrupted this many times (stop, crash, kill) is failed for good at the next


class Interrupted(Exception):
    """The service is stopping: the ingestion under way stops between two tile batches and resumes at next start."""


@dataclass
class IngestTask:
    job_id: str
    slide_id: str
    path: str
    fetch: object = None  # callable() -> local path, run first in the lane (a DICOMweb retrieval)
    timeout_s: float | None = None  # the ingestion's time bound (ServeConfig.ingest_timeout_s)


@dataclass
class QuestionTask:
    job_id: str
    slide_path: str
    question: Question  # checked once, when the request came (Pipeline.question)
    loop: asyncio.AbstractEventLoop
    events: asyncio.Queue  # ("piece", str) ... then ("done", Answer) or ("error", the exception)
    cancelled: threading.Event = field(default_factory=threading.Event)
    submitted: float = field(default_factory=time.perf_counter)
    slide_id: str | None = None  # opened through Worker.opener when set (the registered file, checked)

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
        self._threads = [threading.Thread(target=self._question_lane, name="locpath-questions", daemon=True),
                         threading.Thread(target=self._lane, args=(self.ingests, self._run_ingest),
                                          name="locpath-ingest", daemon=True)]
        self.answer_seconds = 1.0  # running estimate, for Retry-After
        self.ingest_seconds = 10.0
        self.busy_ingest: str | None = None
        # opener(slide_id) -> context manager giving what the pipeline reads: the registered slide file, checked
        # and pinned (serve/slide_files.py); None reads task paths as they are
        self.opener = None
        self.reprepare = None  # reprepare(slide_id): a slide the question lane found unprepared, ingested again
        # on_answer(job_id, slide_id, answer dict): after an answer is delivered (serve --store-results queues its
        # DICOM objects for STOW-RS); must only queue work, never do it on this lane
        self.on_answer = None
        self.stopping = threading.Event()  # set by stop(): the ingestion under way stops between tile batches

    def start(self) -> "Worker":
        for t in self._threads:
            t.start()
        return self

    def stop(self, timeout: float = 10.0) -> None:
        """Stop both lanes: the ingestion under way is interrupted between two tile batches (its job stays queued
        for the next start), waiting ingestions are left in the database, answers under way finish."""
        self.stopping.set()
        while True:  # the waiting ingestions stay queued in the database: resumed at the next start
            try:
                self.ingests.get_nowait()
            except queue.Empty:
                break
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
    def _lane(self, tasks: queue.Queue, run) -> None:
        """One lane: its tasks in order, until the stop marker (or stop())."""
        while (task := tasks.get()) is not _STOP and not self.stopping.is_set():
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
        job = self.store.job(task.job_id)
        if job is not None and job.attempts > MAX_ATTEMPTS:
            self._fail(task, f"ingestion stopped before its end {MAX_ATTEMPTS} times (the service stopped or crashed "
                             "while reading this slide); failed for good: register the slide again to retry")
            return
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

        def check() -> None:
            if self.stopping.is_set():
                raise Interrupted()
            if task.timeout_s is not None and time.perf_counter() - t0 > task.timeout_s:
                raise LocpathError(f"ingestion stopped after {task.timeout_s:g} s (the service's --ingest-timeout); "
                                   "the slide is too large or too slow to read")

        try:
            path = task.fetch() if task.fetch is not None else task.path
            check()
            opened = self.opener(task.slide_id) if self.opener is not None else contextlib.nullcontext(path)
            with opened as source:
                ctx = self.pipe.prepare(source, progress=progress, check=check)
        except Interrupted:
            self.store.update_slide(task.slide_id, status="registered")
            log.info("ingestion interrupted: resumed at the next start", extra={"job": task.job_id})
            return
        except LocpathError as exc:
            self._fail(task, " ".join(str(exc).split()))
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

    def _fail(self, task: IngestTask, msg: str) -> None:
        self.store.update_job(task.job_id, status="failed", error=msg, finished=time.time())
        self.store.update_slide(task.slide_id, status="failed", error=msg)
        log.warning("ingestion failed", extra={"job": task.job_id, "slide": task.slide_id, "error": msg})

    # -- the question lane: concurrent questions decoded as one batch -------------------------------------------
    def _question_lane(self) -> None:
        """Questions join the decoding batch as rows free up (continuous batching): the lane waits only when
        nothing is decoding; between two steps it admits what is queued and drops cancelled questions. At the stop
        marker the answers under way finish first."""
        batch = self.pipe.batch()
        live: dict[str, _LiveQuestion] = {}
        stopping = False
        while True:
            if not live:
                if stopping:
                    return
                task = self.questions.get()
                if task is _STOP:
                    return
                self._admit(batch, live, task)
            while not stopping and batch.free:
                try:
                    task = self.questions.get_nowait()
                except queue.Empty:
                    break
                if task is _STOP:
                    stopping = True
                    break
                self._admit(batch, live, task)
            for job_id, q in list(live.items()):
                if q.task.cancelled.is_set():
                    batch.cancel(job_id)
                    del live[job_id]
                    self.store.update_job(job_id, status="cancelled", error="the client went away or timed out",
                                          finished=time.time())
            if not live:
                continue
            try:
                events = batch.step()
            except Exception:  # a bug must not kill the lane: every answer under way says what happened
                log.exception("question batch crashed")
                for q in live.values():
                    self._fail_question(q.task, InferenceError("the decoder failed (see the service log)"))
                live.clear()
                batch = self.pipe.batch()
                continue
            for ev in events:
                self._deliver(live, ev)

    def _admit(self, batch, live: dict, task: QuestionTask) -> None:
        """TIS, cross-KV and prefill in a free row, for a slide in memory or the slide cache only: a slide whose
        latents are gone goes back to the ingestion lane, never encoded here while every decoding client waits."""
        if task.cancelled.is_set():
            self.store.update_job(task.job_id, status="cancelled", error="cancelled before it ran",
                                  finished=time.time())
            return
        try:
            self.store.update_job(task.job_id, status="running", started=time.time())
            if self.opener is not None and task.slide_id is not None:
                with self.opener(task.slide_id) as source:  # the registered file, checked (serve/slide_files.py)
                    ctx = self.pipe.prepare(source, cached_only=True)
            else:
                ctx = self.pipe.prepare(task.slide_path, cached_only=True)
            batch.add(ctx, task.question, tag=task.job_id, t_start=task.submitted)
        except NotPrepared:
            self._fail_question(task, self._send_back(task))
            return
        except Exception as exc:  # a bad question, a refused file, a bug: the job and the client say which
            if not isinstance(exc, LocpathError):
                log.exception("question crashed", extra={"job": task.job_id})
            self._fail_question(task, exc)
            return
        live[task.job_id] = _LiveQuestion(task)
        self.metrics.decode_batch.set(len(live))

    def _send_back(self, task: QuestionTask) -> Exception:
        """The slide back to the ingestion lane (once: a slide already re-queued is left as it is)."""
        try:
            if self.reprepare is not None and task.slide_id is not None:
                self.reprepare(task.slide_id)
        except Exception as exc:  # a full ingestion queue, the store: the client hears of it
            log.warning("could not queue a slide for preparation again", extra={"slide": task.slide_id,
                                                                                 "error": str(exc)})
            return exc
        log.info("slide not prepared: ingested again", extra={"slide": task.slide_id, "job": task.job_id})
        return Reprepared(task.slide_id, self.ingest_seconds)

    def _fail_question(self, task: QuestionTask, exc: Exception) -> None:
        """The job records a one-line reason (a bug's text stays in the log); the client gets the exception."""
        known = isinstance(exc, (LocpathError, InferenceError, Reprepared, QueueFull))
        try:
            self.store.update_job(task.job_id, status="failed", error=" ".join(str(exc).split()) if known
                                  else "internal error", finished=time.time())
        except Exception:  # the store is down: the client still hears why its question failed
            log.exception("could not record a failed question", extra={"job": task.job_id})
        task.emit("error", exc)

    def _deliver(self, live: dict, ev) -> None:
        q = live.get(ev.tag)
        if q is None:
            return
        task = q.task
        if ev.piece is not None:
            if q.first is None:
                q.first = time.perf_counter()
                self.metrics.ttft.observe(q.first - task.submitted)
            task.emit("piece", ev.piece)
            return
        del live[ev.tag]
        self.metrics.decode_batch.set(len(live))
        if ev.error is not None:  # this answer failed alone (non-finite logits): the model's fault, not the client's
            self._fail_question(task, InferenceError(" ".join(ev.error.split())))
            return
        answer = ev.answer
        elapsed = time.perf_counter() - task.submitted
        self.metrics.answer.observe(elapsed)
        if q.first is None:
            self.metrics.ttft.observe(elapsed)
        self.answer_seconds = 0.8 * self.answer_seconds + 0.2 * elapsed
        self.metrics.cache.labels("hit" if answer.slide["cache_hit"] else "miss").inc()
        result = answer.to_dict()
        self.store.update_job(task.job_id, status="done", progress=1.0, result=result, finished=time.time())
        task.emit("done", answer)
        if self.on_answer is not None:
            try:
                self.on_answer(task.job_id, task.slide_id, result)
            except Exception:  # the answer is delivered; a failing hook must not kill the lane
                log.exception("after-answer hook failed", extra={"job": task.job_id})


@dataclass
class _LiveQuestion:
    task: QuestionTask
    first: float | None = None
