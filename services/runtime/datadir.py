"""The data dir's one owner: the lock a server or embedded persona-cli takes on it, and the local socket on which an
embedded persona-cli lets other persona-cli processes (a second terminal) reach it."""
from __future__ import annotations

import fcntl
import os
from pathlib import Path
from typing import IO

from .errors import FailedPrecondition

LOCK_FILE = "persona.lock"
# Where an embedded persona-cli listens for other persona-cli processes on the same data dir (only while it runs).
LOCAL_SOCKET = Path("run") / "cli.sock"
# A unix socket's path fits in sun_path: 108 bytes with the terminating NUL.
MAX_SOCKET_PATH_BYTES = 107


def lock_data_dir(data_dir: Path) -> IO[str]:
    """Takes the data dir for this process alone (released at exit, even by kill -9).

    Job recovery at start assumes no other process runs this store's jobs; a second server or an
    embedded CLI on the same folder would run them twice.
    """
    data_dir.mkdir(parents=True, exist_ok=True)
    handle = open(data_dir / LOCK_FILE, "a+")
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.seek(0)
        owner = handle.read().strip() or "unknown"
        handle.close()
        raise FailedPrecondition(
            f"data dir {data_dir} is in use by another persona process (pid {owner}): talk to it with "
            "--server HOST:PORT (PERSONA_SERVER), or pass another --data-dir") from None
    handle.truncate(0)
    handle.write(str(os.getpid()))
    handle.flush()
    return handle


def data_dir_owner(data_dir: Path) -> str | None:
    """The pid (as its owner wrote it) of the process holding the data dir's lock, or None when none does.

    Takes nothing and creates nothing; cheap enough to ask before importing the services."""
    try:
        handle = open(data_dir / LOCK_FILE)
    except FileNotFoundError:
        return None
    with handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return handle.read().strip() or "unknown"
        return None  # closing the handle releases the probe's lock


def local_socket(data_dir: Path) -> Path | None:
    """The path of the data dir's local socket; None when it is too long for a unix socket (a deep data dir), in
    which case the embedded persona-cli does not listen and a second one says the data dir is busy."""
    path = data_dir.expanduser().resolve() / LOCAL_SOCKET
    return path if len(os.fsencode(path)) <= MAX_SOCKET_PATH_BYTES else None
