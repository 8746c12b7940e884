"""Settings of the shared runtime: one frozen dataclass, one documented field per knob, env PERSONA_*."""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

from .errors import InvalidArgument


def default_home() -> Path:
    """PERSONA_HOME, else ~/.persona: where the embedded CLI and `serve` keep their data."""
    return Path(os.environ.get("PERSONA_HOME") or Path.home() / ".persona")


def _env_number(name: str, default, parse, kind: str):
    raw = os.environ.get(name)
    if raw is None or raw == "":
        return default
    try:
        return parse(raw)
    except ValueError:
        raise InvalidArgument(f"`{name}` is {raw!r}, not {kind}: set it to e.g. {default}") from None


def env_int(name: str, default: int) -> int:
    """Reads an integer environment variable, naming it when it is not an integer."""
    return _env_number(name, default, int, "an integer")


def env_float(name: str, default: float) -> float:
    """Reads a float environment variable, naming it when it is not a number."""
    return _env_number(name, default, float, "a number")


AUTH_MODES = ("none", "api-key")


@dataclass(frozen=True)
class RuntimeSettings:
    # Folder holding metadata.sqlite3 and artifacts/ (PERSONA_HOME, default ~/.persona).
    data_dir: Path = field(default_factory=default_home)
    # "api-key": every call needs `authorization: Bearer <key>` (keys made with
    # `persona-cli keys create`); "none": one local tenant, for the embedded CLI and laptops.
    auth: str = "none"
    # Largest gRPC message accepted or sent, bytes (PERSONA_MAX_MESSAGE_BYTES). Subject uploads
    # travel in one message, so this bounds an upload.
    max_message_bytes: int = 128 * 1024 * 1024
    # Worker threads executing jobs (PERSONA_JOB_WORKERS).
    job_workers: int = 2
    # Threads serving RPCs (PERSONA_RPC_WORKERS); a WatchJob stream holds one while it lasts.
    rpc_workers: int = 32
    # On start, resume jobs a crash interrupted when their service can (PERSONA_RESUME_JOBS=0 fails
    # them instead, with an error that says so).
    resume_interrupted_jobs: bool = True
    # Seconds in-flight RPCs get to finish on SIGTERM before the server stops.
    grace_period_s: float = 10.0
    # PERSONA_DATABASE_URL: metadata in PostgreSQL, e.g. postgresql://USER:PASSWORD@HOST:5432/persona, shared by
    # several persona processes (pods, a train worker next to the server). Empty: SQLite in the data dir.
    # Left out of repr: it may hold a password.
    database_url: str = field(default="", repr=False)

    def __post_init__(self) -> None:
        if self.auth not in AUTH_MODES:
            raise InvalidArgument(f"`auth` is {self.auth!r}: use one of {', '.join(AUTH_MODES)}")
        if self.max_message_bytes < 1024 * 1024:
            raise InvalidArgument("`max_message_bytes` is below 1 MiB: raise PERSONA_MAX_MESSAGE_BYTES")
        url = self.database_url
        if url and not url.startswith(("postgresql://", "postgres://")) and "=" not in url:
            # The value is not shown: it may hold a password.
            raise InvalidArgument("`database_url` (PERSONA_DATABASE_URL) is not a PostgreSQL URL: set it to e.g. "
                                  "postgresql://USER:PASSWORD@HOST:5432/persona, or leave it empty for SQLite in the "
                                  "data dir")

    @classmethod
    def from_env(cls, **overrides) -> "RuntimeSettings":
        """Settings from PERSONA_* variables; keyword overrides (e.g. from CLI options) win."""
        values = dict(
            data_dir=default_home(),
            auth=os.environ.get("PERSONA_AUTH", "none"),
            max_message_bytes=env_int("PERSONA_MAX_MESSAGE_BYTES", cls.max_message_bytes),
            job_workers=env_int("PERSONA_JOB_WORKERS", cls.job_workers),
            rpc_workers=env_int("PERSONA_RPC_WORKERS", cls.rpc_workers),
            resume_interrupted_jobs=os.environ.get("PERSONA_RESUME_JOBS", "1") not in ("0", "false", "no"),
            database_url=os.environ.get("PERSONA_DATABASE_URL", "").strip(),
        )
        values.update({k: v for k, v in overrides.items() if v is not None})
        values["data_dir"] = Path(values["data_dir"]).expanduser()
        return cls(**values)
