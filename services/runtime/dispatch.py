"""Where a job's work runs when not on a worker thread of the serving process (DESIGN, "Scaling past one machine").

The JobRunner runs every job kind on its own thread pool unless the kind was registered with a
`JobDispatcher`. Then the runner persists the job QUEUED as always, hands it to the dispatcher, and
follows it: the worker — another process on this machine (`SubprocessDispatcher`) or a Kubernetes Job
(`persona.services.train.dispatch.KubernetesDispatcher`) — runs `persona-cli run-job JOB_ID`, which loads
the job from the shared metadata store, runs the registered handler once (progress, events, result and
cancellation all go through the store, exactly as on a thread) and exits. The runner only watches the
worker's coarse state to notice a worker that died without recording an outcome.

Handles are "<dispatcher name>:<its own handle>" strings, stored with the job, so a restarted server
follows the workers of the previous one with the dispatcher of the same name.
"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Protocol, runtime_checkable

if TYPE_CHECKING:
    from .job_store import JobRecord

PENDING, RUNNING, SUCCEEDED, FAILED, GONE = "pending", "running", "succeeded", "failed", "gone"


@runtime_checkable
class JobDispatcher(Protocol):
    """Starts a persisted job's work elsewhere and reports on it."""

    name: str

    def submit(self, job: "JobRecord") -> str:
        """Starts a worker for `job`; returns a handle (unique within this dispatcher)."""
        ...

    def state(self, handle: str) -> str:
        """PENDING | RUNNING | SUCCEEDED | FAILED (the worker exited unsuccessfully) | GONE (no such worker)."""
        ...

    def cancel(self, handle: str) -> None:
        """Stops the worker; a no-op once it has ended."""
        ...


def run_job_command(job_id: str, data_dir: Path | str) -> list[str]:
    """The worker's command line: the same `persona-cli` entry point, in this Python."""
    return [sys.executable, "-m", "persona.client.cli", "run-job", job_id, "--data-dir", str(data_dir)]


class SubprocessDispatcher:
    """Runs each job as `persona-cli run-job JOB_ID` in a child process of the server, on the same data dir.

    For a machine with more than one GPU or a job that must not share the server's memory: the worker
    is a fresh interpreter, so a crash or an out-of-memory kill ends the job, not the server. The worker
    inherits the server's environment (its PERSONA_* settings) plus `env`; its output goes to
    `<data dir>/logs/jobs/<job id>.log`.
    """

    name = "subprocess"

    def __init__(self, data_dir: Path, env: dict[str, str] | None = None):
        self.data_dir = Path(data_dir)
        self.env = dict(env or {})
        self._children: dict[str, subprocess.Popen] = {}

    def log_path(self, job_id: str) -> Path:
        return self.data_dir / "logs" / "jobs" / f"{job_id}.log"

    def submit(self, job: "JobRecord") -> str:
        log_path = self.log_path(job.job_id)
        log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(log_path, "ab") as log:
            child = subprocess.Popen(run_job_command(job.job_id, self.data_dir), stdin=subprocess.DEVNULL,
                                     stdout=log, stderr=subprocess.STDOUT, env={**os.environ, **self.env},
                                     start_new_session=True)  # a Ctrl-C to the server is not the worker's
        handle = f"{child.pid}:{job.job_id}"
        self._children[handle] = child
        return handle

    def state(self, handle: str) -> str:
        child = self._children.get(handle)
        if child is not None:
            code = child.poll()
            if code is None:
                return RUNNING
            return SUCCEEDED if code == 0 else FAILED
        # A worker started by a previous server process: alive while its pid still runs this job.
        pid, _, job_id = handle.partition(":")
        try:
            command_line = Path(f"/proc/{int(pid)}/cmdline").read_bytes().split(b"\0")
        except (OSError, ValueError):
            return GONE
        return RUNNING if job_id.encode() in command_line else GONE

    def cancel(self, handle: str) -> None:
        child = self._children.get(handle)
        if child is not None and child.poll() is None:
            child.terminate()
