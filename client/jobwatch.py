"""Following a job from the CLI: a progress bar on stderr fed by its WatchJob events, and cancelling it on Ctrl-C."""
from __future__ import annotations

import contextlib

import grpc
import typer
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn
from rich.text import Text

from persona.v1 import common_pb2

from .commands.jobs import state_name
from .output import EXIT_INTERRUPTED, note, stderr_console
from .sdk import PersonaClient


class JobProgress:
    """A rich progress bar on stderr (TTY only) fed by a job's events: each PROGRESS message with its done/total
    counter (or percentage), warnings printed above it. Without a TTY each new message is a plain line.
    Subclasses show richer events by overriding `on_progress`."""

    def __init__(self):
        self.console = stderr_console()
        self.tty = self.console.is_terminal
        columns = (TextColumn("{task.description}"), BarColumn(), TextColumn("{task.fields[counter]}"),
                   TextColumn("{task.fields[stats]}"), TimeElapsedColumn())
        self.progress = Progress(*columns, console=self.console, transient=True, disable=not self.tty)
        self.task = self.progress.add_task("starting", total=1.0, counter="", stats="")
        self.last_message = ""

    def __enter__(self):
        self.progress.__enter__()
        return self

    def __exit__(self, *exc):
        return self.progress.__exit__(*exc)

    def print(self, text: str) -> None:
        if self.tty:
            self.progress.console.print(Text(text))
        else:
            note(text)

    def stage(self, message: str) -> None:
        if message and message != self.last_message:
            self.last_message = message
            if not self.tty:
                note(message)

    def __call__(self, event: common_pb2.JobEvent) -> None:
        if event.type == common_pb2.JOB_EVENT_TYPE_WARNING:
            self.print(f"warning: {event.message}")
        elif event.type == common_pb2.JOB_EVENT_TYPE_STATE:
            self.progress.update(self.task, description=state_name(event.state).lower())
            self.stage(event.message or state_name(event.state).lower())
        elif event.type == common_pb2.JOB_EVENT_TYPE_PROGRESS:
            self.on_progress(event, event.details)

    def on_progress(self, event: common_pb2.JobEvent, details: common_pb2.JobProgress) -> None:
        if details.total:
            self.progress.update(self.task, description=event.message or "working", total=details.total,
                                 completed=details.done, counter=f"{details.done}/{details.total}", stats="")
        else:
            self.progress.update(self.task, description=event.message or "working", total=1.0,
                                 completed=event.progress, counter=f"{event.progress:.0%}", stats="")
        self.stage(event.message)


def cancel_and_wait(client: PersonaClient, job: common_pb2.Job, message: str) -> common_pb2.Job:
    """Cancels the job (saying `message`) and waits for it to stop; Ctrl-C again stops waiting (exit 130)."""
    note(message)
    with contextlib.suppress(grpc.RpcError):  # it may have finished meanwhile
        client.jobs.CancelJob(common_pb2.CancelJobRequest(job_id=job.job_id))
    try:
        return client.wait_for_job(job.job_id)
    except KeyboardInterrupt:
        note(f"stopped waiting; {job.job_id} is being cancelled")
        raise typer.Exit(EXIT_INTERRUPTED) from None


def follow_or_cancel(client: PersonaClient, job: common_pb2.Job, progress: JobProgress,
                     cancelling: str) -> common_pb2.Job:
    """Follows the job with `progress` to its end; Ctrl-C cancels it (saying `cancelling`) and waits for that."""
    try:
        with progress:
            return client.wait_for_job(job.job_id, on_event=progress)
    except KeyboardInterrupt:
        return cancel_and_wait(client, job, cancelling)
