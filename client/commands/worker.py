"""`persona-cli run-job JOB_ID`: the worker side of dispatched jobs (PERSONA_TRAIN_DISPATCHER=subprocess|kubernetes)."""
from __future__ import annotations

import logging
import sys
from typing import Annotated

import typer

from persona.services.runtime.errors import PersonaError

from ..output import EXIT_FAILED, fail, note
from .serve import LogLevel, LogLevelOption
from .session import DataDirOption, session


def run_job(
    ctx: typer.Context,
    job_id: Annotated[str, typer.Argument(metavar="JOB_ID", help="The job to run, e.g. job_9c1e0a…",
                                          show_default=False)],
    data_dir: DataDirOption = None,
    log_level: LogLevelOption = LogLevel.info,
) -> None:
    """Run one job that a server handed to a worker, in this process, and exit: 0 when it succeeded or was
    cancelled, 1 when it failed.

    This is what a server's subprocess workers and Kubernetes Job pods run; you rarely type it. It uses the
    server's metadata store (PERSONA_DATABASE_URL, else the data dir's SQLite) and data dir, and records
    progress, events and the outcome there, so `persona-cli jobs watch JOB_ID` follows it as usual. A job its
    previous worker left RUNNING resumes from its checkpoint; a finished job is left as it is.

    Example: `persona-cli run-job job_9c1e0a7b3d5f2e4c6a8b --data-dir /data`
    """
    from persona.services.app import run_job as run

    logging.basicConfig(level=log_level.value.upper(), stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        job = run(session(ctx).settings(data_dir), job_id)
    except PersonaError as e:
        fail(e.code, e.message)
    outcome = f"job {job.job_id} ({job.kind}) {job.state}"
    note(f"{outcome}: {job.error_message}" if job.error_message else outcome)
    if job.state not in ("SUCCEEDED", "CANCELLED"):
        raise typer.Exit(EXIT_FAILED)
