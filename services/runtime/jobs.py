"""Jobs: persisted long-running work with an append-only event history, one runner for all services.

A service registers a handler per job kind; `JobRunner.submit` persists the job QUEUED and runs it
on a worker thread — or, for a kind registered with a `JobDispatcher` (runtime/dispatch.py), hands it
to a worker process or Kubernetes Job running `persona-cli run-job` and follows it. Handlers report
through a JobContext and must be idempotent per item so that a job interrupted by a crash can be
resumed: on start, `JobRunner.recover` re-queues interrupted jobs of resumable kinds and fails the
others with an error saying what happened.

Jobs and their events are kept by JobStore (job_store.py). Ownership: a job belongs to the runner that
submitted or claimed it (`owner`), which refreshes the job's `heartbeat_at` while it holds it. With SQLite one
process owns the data dir, so at start every unfinished job is its own. With a metadata store several processes
share (Postgres: replicas, pods per service), a runner takes over only jobs whose owner stopped beating, each with
one conditional UPDATE, so two replicas never run the same job.
"""
from __future__ import annotations

import contextlib
import logging
import os
import socket
import threading
import time
import uuid
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import wait as wait_for_futures
from dataclasses import dataclass
from typing import Any, Callable

from . import dispatch
from .errorlog import describe
from .errors import Cancelled, FailedPrecondition, PersonaError, Unavailable
from .job_store import (CANCELLED, EVENT_LOG, EVENT_PROGRESS, EVENT_WARNING, FAILED, QUEUED, RUNNING, SUCCEEDED,
                        TERMINAL, JobRecord, JobStore)

log = logging.getLogger("persona.jobs")


class JobContext:
    """What a running handler sees: its job, progress/warning/log reporting, and cancellation."""

    def __init__(self, store: JobStore, job: JobRecord):
        self.store = store
        self.job = job

    @property
    def cancel_requested(self) -> bool:
        return self.store.get(self.job.job_id).cancel_requested

    def cancel_poll(self, every_s: float = 0.5) -> Callable[[], bool]:
        """A `should_stop` for code that asks very often (every block of a model): reads the store at most once per
        `every_s` seconds, and says yes from the first read that finds a cancellation on."""
        last = [float("-inf"), False]

        def should_stop() -> bool:
            now = time.monotonic()
            if not last[1] and now - last[0] >= every_s:
                last[0], last[1] = now, self.cancel_requested
            return last[1]
        return should_stop

    def check_cancelled(self) -> None:
        """Raises Cancelled when CancelJob was called; call it between units of work."""
        if self.cancel_requested:
            raise Cancelled(f"job {self.job.job_id} was cancelled")

    def progress(self, fraction: float, message: str = "", **data: Any) -> None:
        fraction = max(0.0, min(1.0, fraction))
        with self.store.db.transaction():
            self.store.update(self.job.job_id, progress=fraction)
            self.store.append_event(self.job.job_id, EVENT_PROGRESS, progress=fraction, message=message, data=data)

    def warn(self, message: str, **data: Any) -> None:
        self.store.append_event(self.job.job_id, EVENT_WARNING, progress=self.store.get(self.job.job_id).progress,
                                message=message, data=data)

    def log(self, message: str, **data: Any) -> None:
        self.store.append_event(self.job.job_id, EVENT_LOG, message=message, data=data)


@contextlib.contextmanager
def hold(lock: threading.Lock, ctx: JobContext | None, waiting_message: str):
    """Holds `lock`; a job waiting for it (`ctx`) says so once and stays cancellable while it waits."""
    told = False
    while not lock.acquire(timeout=0.5):
        if ctx is not None:
            if not told:
                ctx.log(waiting_message)
                told = True
            ctx.check_cancelled()
    try:
        yield
    finally:
        lock.release()


JobHandler = Callable[[JobContext], dict]


@dataclass
class _Kind:
    handler: JobHandler
    resumable: bool
    dispatcher: "dispatch.JobDispatcher | None" = None


class JobRunner:
    """Runs jobs of registered kinds on a bounded pool of worker threads, or through a kind's dispatcher.

    `heartbeat_s`: how often this runner refreshes its jobs' heartbeat and checks its dispatched workers;
    a job whose heartbeat is older than `stale_after_s` (default 3 heartbeats) is taken over by another
    runner of a shared store.
    """

    def __init__(self, store: JobStore, workers: int = 2, *, heartbeat_s: float = 10.0,
                 stale_after_s: float | None = None):
        self.store = store
        self.owner = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:6]}"
        self.heartbeat_s = heartbeat_s
        self.stale_after_s = 3 * heartbeat_s if stale_after_s is None else stale_after_s
        # SQLite: one process owns the store (the data dir lock), so every unfinished job at start is ours.
        self.exclusive = not store.db.shared_between_processes
        self._kinds: dict[str, _Kind] = {}
        self._pool = ThreadPoolExecutor(max_workers=max(1, workers), thread_name_prefix="persona-job")
        self._in_flight: set[Future] = set()
        self._in_flight_lock = threading.Lock()
        self._served_kinds: set[str] | None = None  # None: every registered kind runs here
        self._followed: dict[str, str] = {}  # job id -> dispatch handle, for dispatched jobs this runner watches
        self._stopping = threading.Event()
        self._upkeep: threading.Thread | None = None

    def serve_only(self, kinds) -> None:
        """Runs only jobs of `kinds` in this process (a pod that serves some of the services): jobs of other
        kinds are neither started nor recovered here; they belong to the processes serving those kinds."""
        self._served_kinds = set(kinds)

    def runs(self, kind: str) -> bool:
        return kind in self._kinds and (self._served_kinds is None or kind in self._served_kinds)

    def register(self, kind: str, handler: JobHandler, *, resumable: bool,
                 dispatcher: "dispatch.JobDispatcher | None" = None) -> None:
        """Declares who runs jobs of `kind`; `resumable` handlers skip work already done. With `dispatcher`,
        jobs of `kind` run in its workers (`persona-cli run-job`), not on this runner's threads."""
        if dispatcher is not None and ":" in dispatcher.name:
            raise ValueError(f"dispatcher name {dispatcher.name!r} must not contain ':'")
        self._kinds[kind] = _Kind(handler, resumable, dispatcher)

    def submit(self, tenant_id: str, kind: str, params: dict, subject_id: str = "") -> JobRecord:
        if not self.runs(kind):
            raise FailedPrecondition(f"no service on this server runs `{kind}` jobs")
        job = self.store.create(tenant_id, kind, params, subject_id, owner=self.owner)
        if self._kinds[kind].dispatcher is not None:
            self._dispatch(job)
        else:
            self._start(job.job_id)
        self._ensure_upkeep()
        return self.store.get(job.job_id)

    def cancel(self, tenant_id: str, job_id: str) -> JobRecord:
        with self.store.db.transaction():
            job = self.store.get(job_id, tenant_id)
            if job.state in TERMINAL:
                raise FailedPrecondition(f"job {job_id} is already {job.state}; only QUEUED or RUNNING jobs can be cancelled")
            if job.state == QUEUED:
                self.store.transition(job_id, CANCELLED, "cancelled before it started", cancel_requested=1)
            else:
                self.store.update(job_id, cancel_requested=1)
                self.store.append_event(job_id, EVENT_LOG, progress=job.progress, message="cancellation requested")
        if job.state == QUEUED and job.dispatch_handle:
            # A worker that has not started (a pod waiting for a GPU) is removed; a running one stops itself at
            # its next check_cancelled, through the store, and records CANCELLED.
            dispatcher = self._dispatcher_of(job)
            if dispatcher is not None:
                dispatcher.cancel(job.dispatch_handle.partition(":")[2])
        return self.store.get(job_id)

    def recover(self, resume: bool = True) -> list[str]:
        """Handles jobs that no live runner holds; returns their ids.

        With an exclusive store (SQLite: the data dir lock) that is every QUEUED or RUNNING job a previous
        process left; with a shared one (Postgres), the jobs whose owner's heartbeat is stale, each taken
        with a compare-and-set so that replicas starting together do not both take it. Dispatched jobs are
        followed again (their workers may still run); the others are re-queued if their kind is resumable,
        else failed saying why.
        """
        taken = []
        now = time.time()
        for job in self.store.unfinished():
            if self._served_kinds is not None and job.kind not in self._served_kinds:
                continue  # another process's kind (a pod serving other services): not ours to resume or fail
            if job.dispatch_handle:
                if self.runs(job.kind):
                    self._follow_again(job)
                    taken.append(job.job_id)
                continue
            if not self.exclusive and (job.heartbeat_at > now - self.stale_after_s or job.kind not in self._kinds):
                continue  # its owner is alive (or it is a kind only another server runs)
            if not self.store.claim(job, self.owner):
                continue  # another runner took it first
            taken.append(job.job_id)
            kind = self._kinds.get(job.kind)
            was_running = job.state == RUNNING
            if kind is not None and (kind.resumable or not was_running) and resume:
                with self.store.db.transaction():
                    if was_running:
                        self.store.update(job.job_id, interrupted=1)
                        self.store.transition(job.job_id, QUEUED,
                                              "interrupted by a server restart; resuming where it stopped")
                self._start(job.job_id)
            elif kind is not None or was_running:
                self.store.transition(
                    job.job_id, FAILED, "interrupted by a server restart",
                    interrupted=int(was_running), error_code="ABORTED",
                    error_message=f"job was {job.state} when the server stopped; start it again",
                )
            # A QUEUED job of a kind this server does not run stays QUEUED for a server that does.
        self._ensure_upkeep()
        return taken

    def run_here(self, job_id: str) -> JobRecord:
        """Runs one job in the calling thread, whatever its kind's dispatcher: the worker side of
        `persona-cli run-job`. A job left RUNNING by a worker that died is resumed if its kind is resumable."""
        job = self.store.get(job_id)
        kind = self._kinds.get(job.kind)
        if kind is None:
            raise FailedPrecondition(f"job {job_id} is a `{job.kind}` job, which this worker cannot run")
        if job.state == RUNNING:
            if not kind.resumable:
                self.store.transition(job_id, FAILED, "its worker stopped before finishing", error_code="ABORTED",
                                      error_message="the worker running it stopped; start it again")
                return self.store.get(job_id)
            with self.store.db.transaction():
                self.store.update(job_id, interrupted=1)
                self.store.transition(job_id, QUEUED, "its worker stopped; resuming where it stopped")
        self.store.claim(self.store.get(job_id), self.owner)
        self._execute(job_id)
        return self.store.get(job_id)

    def shutdown(self, wait: bool = False, timeout_s: float | None = None) -> int:
        """Stops taking jobs; with `wait`, waits up to `timeout_s` for running ones.

        Returns how many are still running. Jobs cut off by a process exit stay RUNNING in the store
        and are resumed (or failed, saying so) by `recover` on the next start, as after a crash.
        Dispatched workers go on: the next server follows them.
        """
        self._stopping.set()
        self._pool.shutdown(wait=False, cancel_futures=True)
        with self._in_flight_lock:
            running = set(self._in_flight)
        if wait and running:
            _, running = wait_for_futures(running, timeout=timeout_s)
        return len(running)

    # Threads ------------------------------------------------------------------------------------

    def _start(self, job_id: str) -> None:
        future = self._pool.submit(self._execute, job_id)
        with self._in_flight_lock:
            self._in_flight.add(future)
        future.add_done_callback(self._finished)

    def _finished(self, future: Future) -> None:
        with self._in_flight_lock:
            self._in_flight.discard(future)

    def _execute(self, job_id: str) -> None:
        job = self.store.get(job_id)
        if job.state != QUEUED:
            return  # cancelled while queued
        if job.cancel_requested:
            self.store.transition(job_id, CANCELLED, "cancelled before it started")
            return
        self.store.transition(job_id, RUNNING, f"attempt {job.attempts + 1} started", attempts=job.attempts + 1,
                              heartbeat_at=time.time())
        context = JobContext(self.store, self.store.get(job_id))
        try:
            result = self._kinds[job.kind].handler(context) or {}
        except Cancelled:
            self.store.transition(job_id, CANCELLED, "cancelled")
        except PersonaError as e:
            self.store.transition(job_id, FAILED, e.message, error_code=e.code, error_message=e.message)
        except Exception as e:
            log.exception("job %s (%s) crashed", job_id, job.kind)
            # The cause, so a user without the server's log sees what went wrong; the trace stays in the log.
            message = (f"{describe(e)} (internal error in {job.kind} job {job_id}; the server's error log has the "
                       "full trace)")
            self.store.transition(job_id, FAILED, message, error_code="INTERNAL", error_message=message)
        else:
            self.store.transition(job_id, SUCCEEDED, "done", progress=1.0, result=result)

    # Dispatched jobs ----------------------------------------------------------------------------

    def _dispatcher_of(self, job: JobRecord) -> "dispatch.JobDispatcher | None":
        """The dispatcher that started the job's worker, if this runner still uses it for the job's kind."""
        kind = self._kinds.get(job.kind)
        dispatcher = kind.dispatcher if kind is not None else None
        if dispatcher is None or dispatcher.name != job.dispatch_handle.partition(":")[0]:
            return None
        return dispatcher

    def _dispatch(self, job: JobRecord) -> None:
        dispatcher = self._kinds[job.kind].dispatcher
        try:
            handle = f"{dispatcher.name}:{dispatcher.submit(job)}"
        except PersonaError as e:
            self.store.transition(job.job_id, FAILED, e.message, error_code=e.code, error_message=e.message)
            raise
        except Exception as e:
            log.exception("could not start a %s worker for job %s", dispatcher.name, job.job_id)
            message = (f"could not start a {dispatcher.name} worker for job {job.job_id} "
                       f"({type(e).__name__}); the server log has the details")
            self.store.transition(job.job_id, FAILED, message, error_code="UNAVAILABLE", error_message=message)
            raise Unavailable(message) from None
        with self.store.db.transaction():
            self.store.update(job.job_id, dispatch_handle=handle)
            self.store.append_event(job.job_id, EVENT_LOG, message=f"handed to a {dispatcher.name} worker ({handle})")
        with self._in_flight_lock:
            self._followed[job.job_id] = handle

    def _follow_again(self, job: JobRecord) -> None:
        if self._dispatcher_of(job) is None:
            self.store.transition(
                job.job_id, FAILED, "its worker is no longer followed", error_code="ABORTED",
                error_message=f"job was handed to a {job.dispatch_handle.partition(':')[0]} worker, which this "
                              f"server does not use any more; start it again")
            return
        with self._in_flight_lock:
            self._followed[job.job_id] = job.dispatch_handle

    def check_dispatched(self) -> None:
        """One look at every followed worker: a worker that ended or vanished while its job is unfinished
        in the store died without recording an outcome (killed, out of memory, evicted): the job fails
        (or is CANCELLED, when that was asked) saying where to look."""
        with self._in_flight_lock:
            followed = dict(self._followed)
        for job_id, handle in followed.items():
            job = self.store.get(job_id)
            dispatcher = self._dispatcher_of(job)
            if job.state in TERMINAL or dispatcher is None:
                with self._in_flight_lock:
                    self._followed.pop(job_id, None)
                continue
            try:
                state = dispatcher.state(handle.partition(":")[2])
            except Exception:
                log.warning("could not read the %s worker of job %s; trying again", dispatcher.name, job_id,
                            exc_info=True)
                continue
            if state in (dispatch.PENDING, dispatch.RUNNING):
                continue
            # A worker that recorded its outcome just before exiting: the transition below changes nothing.
            if job.cancel_requested:
                self.store.transition(job_id, CANCELLED, "cancelled (its worker stopped)")
            else:
                ended = "exited without recording an outcome" if state == dispatch.SUCCEEDED else (
                    "failed" if state == dispatch.FAILED else "disappeared")
                message = f"the {dispatcher.name} worker of job {job_id} ({handle}) {ended}; its logs tell why"
                self.store.transition(job_id, FAILED, message, error_code="ABORTED", error_message=message)
            with self._in_flight_lock:
                self._followed.pop(job_id, None)

    # Upkeep: heartbeat, dispatched workers, stale jobs --------------------------------------------

    def _ensure_upkeep(self) -> None:
        with self._in_flight_lock:
            if self._upkeep is not None or self._stopping.is_set():
                return
            self._upkeep = threading.Thread(target=self._upkeep_loop, name="persona-job-upkeep", daemon=True)
        self._upkeep.start()

    def _upkeep_loop(self) -> None:
        while not self._stopping.wait(self.heartbeat_s):
            try:
                self.store.beat(self.owner)
                self.check_dispatched()
                if not self.exclusive:
                    self.recover()  # jobs of a replica that died
            except Exception:
                log.warning("job upkeep failed; trying again in %.0f s", self.heartbeat_s, exc_info=True)
