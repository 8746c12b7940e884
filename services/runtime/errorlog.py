"""The data dir's error log: full stack traces of failed jobs and calls, kept where a user of the embedded CLI (who
has no server log) and an operator of `persona-cli serve` (whose stderr may be gone) can read them.

Clients only ever see an error's class and message (`describe`); the trace goes here. One handler per log file
in a process, shared by every app on that data dir and removed when the last one closes.
"""
from __future__ import annotations

import logging
import threading
from pathlib import Path

# Loggers under "persona" write ERROR records (with their traces) to the file.
LOGGER = "persona"
FORMAT = "%(asctime)s %(levelname)s %(name)s [%(threadName)s]: %(message)s"
# Characters of an exception's message a client sees.
MESSAGE_CHARS = 300

_lock = threading.Lock()
_open: dict[Path, tuple[logging.Handler, int]] = {}


def error_log_path(data_dir: Path) -> Path:
    """Where the traces of `data_dir`'s server go: <data dir>/logs/errors.log."""
    return Path(data_dir) / "logs" / "errors.log"


def open_error_log(data_dir: Path) -> Path:
    """Starts writing ERROR records of persona's loggers to error_log_path(data_dir) (once per file); returns it."""
    path = error_log_path(data_dir).resolve()
    with _lock:
        handler, users = _open.get(path, (None, 0))
        if handler is None:
            path.parent.mkdir(parents=True, exist_ok=True)
            handler = logging.FileHandler(path, encoding="utf-8", delay=True)
            handler.setLevel(logging.ERROR)
            handler.setFormatter(logging.Formatter(FORMAT))
            logging.getLogger(LOGGER).addHandler(handler)
        _open[path] = (handler, users + 1)
    return path


def close_error_log(data_dir: Path) -> None:
    """Undoes one open_error_log(data_dir); the last one removes the handler."""
    path = error_log_path(data_dir).resolve()
    with _lock:
        handler, users = _open.get(path, (None, 0))
        if handler is None:
            return
        if users > 1:
            _open[path] = (handler, users - 1)
            return
        del _open[path]
        logging.getLogger(LOGGER).removeHandler(handler)
        handler.close()


def describe(error: BaseException) -> str:
    """An exception as a client may see it: class and message on one line, cut to MESSAGE_CHARS, no trace."""
    message = " ".join(str(error).split())
    if len(message) > MESSAGE_CHARS:
        message = message[:MESSAGE_CHARS] + "…"
    return f"{type(error).__name__}: {message}" if message else type(error).__name__
