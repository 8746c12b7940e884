"""Metadata store: one small interface (MetadataStore) and its SQLite implementation.

Services own their tables through Migrations (component, version, SQL) applied once, in order,
and recorded in `schema_migrations`. SQL uses named parameters (`:name`) and portable types so a
Postgres store can implement the same interface.
"""
from __future__ import annotations

import sqlite3
import threading
import time
from abc import ABC, abstractmethod
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Mapping, Sequence

Row = dict[str, Any]


@dataclass(frozen=True)
class Migration:
    """One schema step of one component (e.g. ("subjects", 1, [CREATE TABLE …]))."""

    component: str
    version: int
    statements: tuple[str, ...]


class MetadataStore(ABC):
    """Transactions and queries over the metadata database."""

    # Whether several processes may use this database at once (PostgreSQL), or one owns it (SQLite: the data dir
    # lock): the job runner then takes over only jobs whose owner stopped beating.
    shared_between_processes = False

    @abstractmethod
    def migrate(self, migrations: Sequence[Migration]) -> list[tuple[str, int]]:
        """Applies the migrations not applied yet, in (component, version) order; returns them."""

    @abstractmethod
    def transaction(self):
        """Context manager: every statement inside commits together or not at all."""

    @abstractmethod
    def execute(self, sql: str, params: Mapping[str, Any] | None = None) -> int:
        """Runs one statement; returns the number of rows changed."""

    @abstractmethod
    def query(self, sql: str, params: Mapping[str, Any] | None = None) -> list[Row]:
        """Runs a query; returns its rows as dicts."""

    def query_one(self, sql: str, params: Mapping[str, Any] | None = None) -> Row | None:
        rows = self.query(sql, params)
        return rows[0] if rows else None

    @abstractmethod
    def close(self) -> None:
        """Releases the connection."""


class SQLiteMetadataStore(MetadataStore):
    """SQLite in WAL mode: readers never block the writer, and a crash keeps every committed write.

    One connection guarded by a re-entrant lock: persona's metadata traffic is small, and this
    keeps transactions simple and correct across the gRPC worker threads.
    """

    def __init__(self, path: Path):
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        self._lock = threading.RLock()
        self._depth = 0
        self._conn = sqlite3.connect(str(path), check_same_thread=False, isolation_level=None, timeout=30)
        self._conn.row_factory = sqlite3.Row
        self._conn.execute("PRAGMA journal_mode=WAL")
        self._conn.execute("PRAGMA synchronous=NORMAL")
        self._conn.execute("PRAGMA foreign_keys=ON")
        self._conn.execute("PRAGMA busy_timeout=30000")
        self._conn.execute(
            "CREATE TABLE IF NOT EXISTS schema_migrations ("
            " component TEXT NOT NULL, version INTEGER NOT NULL, applied_at REAL NOT NULL,"
            " PRIMARY KEY (component, version))"
        )

    def migrate(self, migrations: Sequence[Migration]) -> list[tuple[str, int]]:
        applied = []
        with self.transaction():
            done = {(r["component"], r["version"]) for r in self.query("SELECT component, version FROM schema_migrations")}
            for m in sorted(migrations, key=lambda m: (m.component, m.version)):
                if (m.component, m.version) in done:
                    continue
                for statement in m.statements:
                    self._conn.execute(statement)
                self.execute(
                    "INSERT INTO schema_migrations (component, version, applied_at) VALUES (:c, :v, :t)",
                    {"c": m.component, "v": m.version, "t": time.time()},
                )
                applied.append((m.component, m.version))
        return applied

    @contextmanager
    def transaction(self) -> Iterator[None]:
        with self._lock:
            outermost = self._depth == 0
            if outermost:
                self._conn.execute("BEGIN IMMEDIATE")
            self._depth += 1
            try:
                yield
            except BaseException:
                self._depth -= 1
                if outermost:
                    self._conn.execute("ROLLBACK")
                raise
            self._depth -= 1
            if outermost:
                self._conn.execute("COMMIT")

    def execute(self, sql: str, params: Mapping[str, Any] | None = None) -> int:
        with self._lock:
            return self._conn.execute(sql, dict(params or {})).rowcount

    def query(self, sql: str, params: Mapping[str, Any] | None = None) -> list[Row]:
        with self._lock:
            return [dict(r) for r in self._conn.execute(sql, dict(params or {})).fetchall()]

    def close(self) -> None:
        with self._lock:
            self._conn.close()
