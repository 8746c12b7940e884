"""Jobs: persisted long-running work with an append-only event history, one runner for all services.

A service registers a handler per job kind; `JobRunner.submit` persists the job QUEUED and runs it
on a worker thread. Handlers report through a JobContext and must be idempotent per item so that a
job interrupted by a crash can be resumed: on start, `JobRunner.recover` re-queues interrupted
jobs of resumable kinds and fails the others with an error saying what happened.
"""
from __future__ import annotations

import json
import logging
import threading
import time
import uuid
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import wait as wait_for_futures
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator

from .errors import Cancelled, FailedPrecondition, NotFound, PersonaError
from .metadata import MetadataStore, Migration
from .paging import Page, keyset_clause, next_token

log = logging.getLogger("persona.jobs")

QUEUED, RUNNING, SUCCEEDED, FAILED, CANCELLED = "QUEUED", "RUNNING", "SUCCEEDED", "FAILED", "CANCELLED"
TERMINAL = frozenset({SUCCEEDED, FAILED, CANCELLED})
EVENT_STATE, EVENT_PROGRESS, EVENT_WARNING, EVENT_LOG = "STATE", "PROGRESS", "WARNING", "LOG"

MIGRATIONS = [
    Migration("jobs", 1, (
        """CREATE TABLE jobs (
            job_id TEXT PRIMARY KEY, tenant_id TEXT NOT NULL, kind TEXT NOT NULL,
            subject_id TEXT NOT NULL DEFAULT '', state TEXT NOT NULL, progress REAL NOT NULL DEFAULT 0,
            params_json TEXT NOT NULL, result_json TEXT NOT NULL DEFAULT '{}',
            error_code TEXT NOT NULL DEFAULT '', error_message TEXT NOT NULL DEFAULT '',
            interrupted INTEGER NOT NULL DEFAULT 0, attempts INTEGER NOT NULL DEFAULT 0,
            cancel_requested INTEGER NOT NULL DEFAULT 0,
            created_at REAL NOT NULL, updated_at REAL NOT NULL)""",
        "CREATE INDEX jobs_by_tenant ON jobs (tenant_id, created_at)",
        """CREATE TABLE job_events (
            job_id TEXT NOT NULL REFERENCES jobs(job_id) ON DELETE CASCADE, sequence INTEGER NOT NULL,
            type TEXT NOT NULL, state TEXT NOT NULL DEFAULT '', progress REAL NOT NULL DEFAULT 0,
            message TEXT NOT NULL DEFAULT '', data_json TEXT NOT NULL DEFAULT '{}', created_at REAL NOT NULL,
            PRIMARY KEY (job_id, sequence))""",
    )),
]


@dataclass(frozen=True)
class JobRecord:
    job_id: str
    tenant_id: str
    kind: str
    subject_id: str
    state: str
    progress: float
    params: dict
    result: dict
    error_code: str
    error_message: str
    interrupted: bool
    attempts: int
    cancel_requested: bool
    created_at: float
    updated_at: float

    @classmethod
    def from_row(cls, row: dict) -> "JobRecord":
        return cls(
            job_id=row["job_id"], tenant_id=row["tenant_id"], kind=row["kind"], subject_id=row["subject_id"],
            state=row["state"], progress=row["progress"], params=json.loads(row["params_json"]),
            result=json.loads(row["result_json"]), error_code=row["error_code"],
            error_message=row["error_message"], interrupted=bool(row["interrupted"]),
            attempts=row["attempts"], cancel_requested=bool(row["cancel_requested"]),
            created_at=row["created_at"], updated_at=row["updated_at"],
        )


@dataclass(frozen=True)
class JobEventRecord:
    job_id: str
    sequence: int
    type: str
    state: str
    progress: float
    message: str
    data: dict
    created_at: float


class JobStore:
    """Persistence of jobs and their events, with a condition watchers wait on for new events."""

    def __init__(self, db: MetadataStore):
        self.db = db
        self._new_event = threading.Condition()

    def create(self, tenant_id: str, kind: str, params: dict, subject_id: str = "") -> JobRecord:
        now = time.time()
        job_id = f"job_{uuid.uuid4().hex[:20]}"
        with self.db.transaction():
            self.db.execute(
                "INSERT INTO jobs (job_id, tenant_id, kind, subject_id, state, params_json, created_at, updated_at)"
                " VALUES (:id, :t, :k, :s, :st, :p, :now, :now)",
                {"id": job_id, "t": tenant_id, "k": kind, "s": subject_id, "st": QUEUED,
                 "p": json.dumps(params), "now": now},
            )
            self.append_event(job_id, EVENT_STATE, state=QUEUED, message=f"{kind} job queued")
        return self.get(job_id)

    def get(self, job_id: str, tenant_id: str | None = None) -> JobRecord:
        row = self.db.query_one("SELECT * FROM jobs WHERE job_id = :id", {"id": job_id})
        if row is None or (tenant_id is not None and row["tenant_id"] != tenant_id):
            raise NotFound(f"`job_id` {job_id!r} does not exist: list yours with `persona-cli jobs list`")
        return JobRecord.from_row(row)

    def list(self, tenant_id: str, page: Page, kind: str = "", subject_id: str = "") -> tuple[list[JobRecord], str]:
        where, params = keyset_clause(page, "job_id")
        rows = self.db.query(
            f"SELECT * FROM jobs WHERE tenant_id = :t AND (:k = '' OR kind = :k) AND (:s = '' OR subject_id = :s)"
            f" AND {where} ORDER BY created_at DESC, job_id DESC LIMIT :n",
            {"t": tenant_id, "k": kind, "s": subject_id, "n": page.size + 1, **params},
        )
        return [JobRecord.from_row(r) for r in rows[: page.size]], next_token(rows, page, "job_id")

    def update(self, job_id: str, **fields: Any) -> None:
        """Sets columns of a job (params/result given as dicts are stored as JSON)."""
        for name in ("params", "result"):
            if name in fields:
                fields[f"{name}_json"] = json.dumps(fields.pop(name))
        fields["updated_at"] = time.time()
        assignments = ", ".join(f"{k} = :{k}" for k in fields)
        self.db.execute(f"UPDATE jobs SET {assignments} WHERE job_id = :job_id", {**fields, "job_id": job_id})

    def transition(self, job_id: str, state: str, message: str, **fields: Any) -> None:
        """Moves a job to `state` and records the STATE event in the same transaction."""
        with self.db.transaction():
            self.update(job_id, state=state, **fields)
            progress = fields.get("progress")
            if progress is None:
                progress = self.get(job_id).progress
            self.append_event(job_id, EVENT_STATE, state=state, progress=progress, message=message)

    def append_event(self, job_id: str, type: str, *, state: str = "", progress: float = 0.0,
                     message: str = "", data: dict | None = None) -> None:
        with self.db.transaction():
            row = self.db.query_one("SELECT COALESCE(MAX(sequence), 0) AS s FROM job_events WHERE job_id = :id",
                                    {"id": job_id})
            self.db.execute(
                "INSERT INTO job_events (job_id, sequence, type, state, progress, message, data_json, created_at)"
                " VALUES (:id, :seq, :type, :state, :progress, :message, :data, :now)",
                {"id": job_id, "seq": row["s"] + 1, "type": type, "state": state, "progress": progress,
                 "message": message, "data": json.dumps(data or {}), "now": time.time()},
            )
        with self._new_event:
            self._new_event.notify_all()

    def events_after(self, job_id: str, sequence: int) -> list[JobEventRecord]:
        rows = self.db.query("SELECT * FROM job_events WHERE job_id = :id AND sequence > :seq ORDER BY sequence",
                             {"id": job_id, "seq": sequence})
        return [JobEventRecord(job_id=r["job_id"], sequence=r["sequence"], type=r["type"], state=r["state"],
                               progress=r["progress"], message=r["message"], data=json.loads(r["data_json"]),
                               created_at=r["created_at"]) for r in rows]

    def watch(self, tenant_id: str, job_id: str, after_sequence: int = 0,
              is_active: Callable[[], bool] = lambda: True, poll_s: float = 0.5) -> Iterator[JobEventRecord]:
        """Yields the job's events after `after_sequence`, then new ones, until a terminal STATE event.

        Waits on an in-process condition and re-reads the database every `poll_s`, so it also
        follows jobs another process writes to the same store.
        """
        self.get(job_id, tenant_id)  # NotFound for unknown ids and other tenants' jobs
        seen = after_sequence
        while is_active():
            events = self.events_after(job_id, seen)
            for event in events:
                seen = event.sequence
                yield event
                if event.type == EVENT_STATE and event.state in TERMINAL:
                    return
            if not events:
                if self.get(job_id).state in TERMINAL and not self.events_after(job_id, seen):
                    return  # replay started after the terminal event
                with self._new_event:
                    self._new_event.wait(poll_s)


class JobContext:
    """What a running handler sees: its job, progress/warning/log reporting, and cancellation."""

    def __init__(self, store: JobStore, job: JobRecord):
        self.store = store
        self.job = job

    @property
    def cancel_requested(self) -> bool:
        return self.store.get(self.job.job_id).cancel_requested

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


JobHandler = Callable[[JobContext], dict]


@dataclass
class _Kind:
    handler: JobHandler
    resumable: bool


class JobRunner:
    """Runs jobs of registered kinds on a bounded pool of worker threads."""

    def __init__(self, store: JobStore, workers: int = 2):
        self.store = store
        self._kinds: dict[str, _Kind] = {}
        self._pool = ThreadPoolExecutor(max_workers=max(1, workers), thread_name_prefix="persona-job")
        self._in_flight: set[Future] = set()
        self._in_flight_lock = threading.Lock()

    def register(self, kind: str, handler: JobHandler, *, resumable: bool) -> None:
        """Declares who runs jobs of `kind`; `resumable` handlers skip work already done."""
        self._kinds[kind] = _Kind(handler, resumable)

    def submit(self, tenant_id: str, kind: str, params: dict, subject_id: str = "") -> JobRecord:
        if kind not in self._kinds:
            raise FailedPrecondition(f"no service on this server runs `{kind}` jobs")
        job = self.store.create(tenant_id, kind, params, subject_id)
        self._start(job.job_id)
        return job

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
        return self.store.get(job_id)

    def recover(self, resume: bool = True) -> list[str]:
        """Handles jobs a previous process left QUEUED or RUNNING; returns their ids.

        Assumes one server process per metadata store (the SQLite deployment): at start, nothing
        else can be running them.
        """
        rows = self.store.db.query("SELECT job_id, kind, state FROM jobs WHERE state IN (:q, :r)",
                                   {"q": QUEUED, "r": RUNNING})
        for row in rows:
            kind = self._kinds.get(row["kind"])
            was_running = row["state"] == RUNNING
            if kind is not None and (kind.resumable or not was_running) and resume:
                with self.store.db.transaction():
                    if was_running:
                        self.store.update(row["job_id"], interrupted=1)
                        self.store.transition(row["job_id"], QUEUED,
                                              "interrupted by a server restart; resuming where it stopped")
                self._start(row["job_id"])
            elif kind is not None or was_running:
                self.store.transition(
                    row["job_id"], FAILED, "interrupted by a server restart",
                    interrupted=int(was_running), error_code="ABORTED",
                    error_message=f"job was {row['state']} when the server stopped; start it again",
                )
            # A QUEUED job of a kind this server does not run stays QUEUED for a server that does.
        return [r["job_id"] for r in rows]

    def shutdown(self, wait: bool = False, timeout_s: float | None = None) -> int:
        """Stops taking jobs; with `wait`, waits up to `timeout_s` for running ones.

        Returns how many are still running. Jobs cut off by a process exit stay RUNNING in the store
        and are resumed (or failed, saying so) by `recover` on the next start, as after a crash.
        """
        self._pool.shutdown(wait=False, cancel_futures=True)
        with self._in_flight_lock:
            running = set(self._in_flight)
        if wait and running:
            _, running = wait_for_futures(running, timeout=timeout_s)
        return len(running)

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
        self.store.transition(job_id, RUNNING, f"attempt {job.attempts + 1} started", attempts=job.attempts + 1)
        context = JobContext(self.store, self.store.get(job_id))
        try:
            result = self._kinds[job.kind].handler(context) or {}
        except Cancelled:
            self.store.transition(job_id, CANCELLED, "cancelled")
        except PersonaError as e:
            self.store.transition(job_id, FAILED, e.message, error_code=e.code, error_message=e.message)
        except Exception:
            log.exception("job %s (%s) crashed", job_id, job.kind)
            message = f"internal error in {job.kind} job (job_id={job_id}); the server log has the details"
            self.store.transition(job_id, FAILED, message, error_code="INTERNAL", error_message=message)
        else:
            self.store.transition(job_id, SUCCEEDED, "done", progress=1.0, result=result)
