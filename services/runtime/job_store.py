"""The job store: jobs and their append-only event history in the metadata store, and the condition watchers
wait on for new events. What runs jobs (JobRunner) and what a handler sees (JobContext) live in jobs.py.

Ownership columns: a job belongs to the runner that submitted or claimed it (`owner`), which refreshes the
job's `heartbeat_at` while it holds it; `claim` is one conditional UPDATE, so two replicas of a shared store
never take the same job.
"""
from __future__ import annotations

import json
import threading
import time
import uuid
from dataclasses import dataclass
from typing import Any, Callable, Iterator

from .errors import NotFound
from .metadata import MetadataStore, Migration
from .paging import Page, keyset_clause, next_token

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
    Migration("jobs", 2, (
        "ALTER TABLE jobs ADD COLUMN owner TEXT NOT NULL DEFAULT ''",
        "ALTER TABLE jobs ADD COLUMN heartbeat_at REAL NOT NULL DEFAULT 0",
        # "<dispatcher>:<handle>" of the worker running a dispatched job; '' for jobs on a runner's threads.
        "ALTER TABLE jobs ADD COLUMN dispatch_handle TEXT NOT NULL DEFAULT ''",
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
    owner: str = ""
    heartbeat_at: float = 0.0
    dispatch_handle: str = ""

    @classmethod
    def from_row(cls, row: dict) -> "JobRecord":
        return cls(
            job_id=row["job_id"], tenant_id=row["tenant_id"], kind=row["kind"], subject_id=row["subject_id"],
            state=row["state"], progress=row["progress"], params=json.loads(row["params_json"]),
            result=json.loads(row["result_json"]), error_code=row["error_code"],
            error_message=row["error_message"], interrupted=bool(row["interrupted"]),
            attempts=row["attempts"], cancel_requested=bool(row["cancel_requested"]),
            created_at=row["created_at"], updated_at=row["updated_at"], owner=row["owner"],
            heartbeat_at=row["heartbeat_at"], dispatch_handle=row["dispatch_handle"],
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

    def create(self, tenant_id: str, kind: str, params: dict, subject_id: str = "", owner: str = "") -> JobRecord:
        now = time.time()
        job_id = f"job_{uuid.uuid4().hex[:20]}"
        with self.db.transaction():
            self.db.execute(
                "INSERT INTO jobs (job_id, tenant_id, kind, subject_id, state, params_json, created_at, updated_at,"
                " owner, heartbeat_at) VALUES (:id, :t, :k, :s, :st, :p, :now, :now, :owner, :now)",
                {"id": job_id, "t": tenant_id, "k": kind, "s": subject_id, "st": QUEUED,
                 "p": json.dumps(params), "now": now, "owner": owner},
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

    def transition(self, job_id: str, state: str, message: str, **fields: Any) -> bool:
        """Moves a job to `state` and records the STATE event in the same transaction.

        A finished job stays finished: moving one that is already SUCCEEDED, FAILED or CANCELLED changes
        nothing and returns False (two processes may notice the same dead worker)."""
        with self.db.transaction():
            current = self.get(job_id)
            if current.state in TERMINAL:
                return False
            self.update(job_id, state=state, **fields)
            progress = fields.get("progress")
            if progress is None:
                progress = current.progress
            self.append_event(job_id, EVENT_STATE, state=state, progress=progress, message=message)
        return True

    def claim(self, job: JobRecord, owner: str) -> bool:
        """Makes `owner` the job's owner if nobody took it since `job` was read (compare-and-set)."""
        return self.db.execute(
            "UPDATE jobs SET owner = :owner, heartbeat_at = :now WHERE job_id = :id AND owner = :was"
            " AND heartbeat_at = :beat AND state = :state",
            {"owner": owner, "now": time.time(), "id": job.job_id, "was": job.owner, "beat": job.heartbeat_at,
             "state": job.state}) == 1

    def beat(self, owner: str) -> None:
        """Refreshes the heartbeat of every unfinished job `owner` holds."""
        self.db.execute("UPDATE jobs SET heartbeat_at = :now WHERE owner = :owner AND state IN (:q, :r)",
                        {"now": time.time(), "owner": owner, "q": QUEUED, "r": RUNNING})

    def unfinished(self) -> list[JobRecord]:
        rows = self.db.query("SELECT * FROM jobs WHERE state IN (:q, :r) ORDER BY created_at",
                             {"q": QUEUED, "r": RUNNING})
        return [JobRecord.from_row(r) for r in rows]

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
