"""Settings of the shared runtime: one frozen dataclass, one documented field per knob, env PERSONA_*."""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

from .errors import InvalidSetting


def default_home() -> Path:
    """PERSONA_HOME, else ~/.persona: where the embedded CLI and `serve` keep their data."""
    return Path(os.environ.get("PERSONA_HOME") or Path.home() / ".persona")


def env_text(name: str, default: str | None = None) -> str | None:
    """A text environment variable, surrounding spaces dropped; `default` when unset or blank."""
    return os.environ.get(name, "").strip() or default


def env_list(name: str) -> tuple[str, ...]:
    """A comma-separated environment variable as its non-blank items, spaces dropped."""
    return tuple(item.strip() for item in os.environ.get(name, "").split(",") if item.strip())


def _env_number(name: str, default, parse, kind: str):
    raw = os.environ.get(name)
    if raw is None or raw == "":
        return default
    try:
        return parse(raw)
    except ValueError:
        raise InvalidSetting(f"`{name}` is {raw!r}, not {kind}: set it to e.g. {default}") from None


def env_int(name: str, default: int) -> int:
    """Reads an integer environment variable, naming it when it is not an integer."""
    return _env_number(name, default, int, "an integer")


def env_float(name: str, default: float) -> float:
    """Reads a float environment variable, naming it when it is not a number."""
    return _env_number(name, default, float, "a number")


TRUE_WORDS = ("1", "true", "yes", "on")
FALSE_WORDS = ("0", "false", "no", "off")


def parse_flag(raw: str | None, name: str) -> bool | None:
    """A yes/no setting's text: 1/true/yes/on or 0/false/no/off (any case); None when empty or `auto` (the
    default). Anything else is InvalidSetting naming `name` and the value."""
    text = (raw or "").strip().lower()
    if text in ("", "auto"):
        return None
    if text in TRUE_WORDS:
        return True
    if text in FALSE_WORDS:
        return False
    raise InvalidSetting(f"`{name}` is {raw.strip()!r}: use 1 or 0 (true/false, yes/no, on/off), or leave it unset "
                         "for the default")


def env_flag(name: str) -> bool | None:
    """A yes/no environment variable (parse_flag); None when unset, empty or `auto`."""
    return parse_flag(os.environ.get(name), name)


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
    # Threads serving health and quick reads (PERSONA_RPC_WORKERS): Get…, List…, cancels, deletes. They never wait
    # behind the rest.
    rpc_workers: int = 32
    # Threads serving long calls (PERSONA_WORK_WORKERS): Generate (itself queued: PERSONA_GENERATE_CONCURRENCY,
    # PERSONA_GENERATE_QUEUE), uploads, masks, exports, Start… calls.
    work_workers: int = 32
    # WatchJob streams open at once (PERSONA_MAX_WATCH_STREAMS), a thread each; one more is RESOURCE_EXHAUSTED.
    max_watch_streams: int = 128
    # On start, resume jobs a crash interrupted when their service can (PERSONA_RESUME_JOBS=0 fails
    # them instead, with an error that says so).
    resume_interrupted_jobs: bool = True
    # Seconds in-flight RPCs get to finish on SIGTERM before the server stops.
    grace_period_s: float = 10.0
    # PERSONA_DATABASE_URL: metadata in PostgreSQL, e.g. postgresql://USER:PASSWORD@HOST:5432/persona, shared by
    # several persona processes (pods, a train worker next to the server). Empty: SQLite in the data dir.
    # Left out of repr: it may hold a password.
    database_url: str = field(default="", repr=False)
    # Whether a request may name any local folder as a model (`base_model`, a mask `model`): yes for the embedded
    # CLI and `persona-cli up` (a user on their own files); `persona-cli serve` turns it off (PERSONA_MODEL_PATHS=0),
    # leaving the operator's allow-list: `tiny`, folders under `models_root`, hub ids in the Hugging Face cache
    # (only those in `allowed_models` when set) and `allowed_models` themselves.
    model_paths: bool = True
    # Folder of the base models a server offers by name (PERSONA_MODELS_ROOT); None: the model cache
    # (PERSONA_MODEL_CACHE, default <data dir>/models).
    models_root: Path | None = None
    # References a server accepts exactly (PERSONA_ALLOWED_MODELS, comma-separated hub ids or folders); when set,
    # the only hub ids accepted.
    allowed_models: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if self.auth not in AUTH_MODES:
            raise InvalidSetting(f"`auth` is {self.auth!r}: use one of {', '.join(AUTH_MODES)}")
        for name, value in (("rpc_workers", self.rpc_workers), ("work_workers", self.work_workers),
                            ("max_watch_streams", self.max_watch_streams)):
            if value < 1:
                raise InvalidSetting(f"`{name}` is {value}: use 1 or more")
        if self.max_message_bytes < 1024 * 1024:
            raise InvalidSetting("`max_message_bytes` is below 1 MiB: raise PERSONA_MAX_MESSAGE_BYTES")
        url = self.database_url
        if url and not url.startswith(("postgresql://", "postgres://")) and "=" not in url:
            # The value is not shown: it may hold a password.
            raise InvalidSetting("`database_url` (PERSONA_DATABASE_URL) is not a PostgreSQL URL: set it to e.g. "
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
            work_workers=env_int("PERSONA_WORK_WORKERS", cls.work_workers),
            max_watch_streams=env_int("PERSONA_MAX_WATCH_STREAMS", cls.max_watch_streams),
            resume_interrupted_jobs=env_flag("PERSONA_RESUME_JOBS"),
            database_url=env_text("PERSONA_DATABASE_URL", ""),
            model_paths=env_flag("PERSONA_MODEL_PATHS"),
            models_root=Path(os.environ["PERSONA_MODELS_ROOT"]) if os.environ.get("PERSONA_MODELS_ROOT") else None,
            allowed_models=env_list("PERSONA_ALLOWED_MODELS"),
        )
        values.update({k: v for k, v in overrides.items() if v is not None})
        values["data_dir"] = Path(values["data_dir"]).expanduser()
        return cls(**{k: v for k, v in values.items() if v is not None})  # unset: the field's default
