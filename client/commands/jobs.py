"""`persona-cli jobs list|show|watch|cancel`: long-running work (captioning, later training and
export) of every service."""
from __future__ import annotations

import contextlib
import json
from pathlib import Path
from typing import Annotated, Optional

import grpc
import typer
from rich.progress import BarColumn, Progress, TaskProgressColumn, TextColumn, TimeElapsedColumn
from rich.text import Text

from persona.v1 import common_pb2

from ..output import CliError, fields, message_dict, note, plain, stderr_console, table
from ..sdk import PersonaClient
from .session import JsonOption, session
from .subjects import when

app = typer.Typer(help="List, inspect, follow and cancel jobs (captioning and other long-running work).",
                  no_args_is_help=True, rich_markup_mode="markdown")

JobIdArgument = Annotated[str, typer.Argument(metavar="JOB", help="Job id, e.g. job_9c1e…", show_default=False)]


def state_name(state: int) -> str:
    return common_pb2.JobState.Name(state).removeprefix("JOB_STATE_")


def follow_job(client: PersonaClient, job: common_pb2.Job, description: str, *, embedded: bool) -> common_pb2.Job:
    """Shows a progress bar on stderr while the job runs (warnings printed above it); returns the final Job.

    On Ctrl-C an embedded job is cancelled (its server stops with this process); a remote one goes on.
    """
    err = stderr_console()
    columns = (TextColumn("{task.description}"), BarColumn(), TaskProgressColumn(), TimeElapsedColumn(),
               TextColumn("{task.fields[status]}"))
    try:
        with Progress(*columns, console=err, transient=True, disable=not err.is_terminal) as progress:
            task = progress.add_task(description, total=1.0, completed=job.progress, status=state_name(job.state))

            def on_event(event: common_pb2.JobEvent) -> None:
                status = state_name(event.state) if event.type == common_pb2.JOB_EVENT_TYPE_STATE else event.message
                progress.update(task, completed=event.progress, status=status)
                if event.type == common_pb2.JOB_EVENT_TYPE_WARNING:
                    progress.console.print(Text(f"warning: {event.message}"))

            return client.wait_for_job(job.job_id, on_event=on_event)
    except KeyboardInterrupt:
        if embedded:
            note(f"cancelling {job.job_id}: it stops after the item in progress")
            with contextlib.suppress(grpc.RpcError):  # it may have finished meanwhile
                client.jobs.CancelJob(common_pb2.CancelJobRequest(job_id=job.job_id))
        else:
            note(f"{job.job_id} goes on on the server: follow it with `persona-cli jobs watch {job.job_id}`, "
                 f"stop it with `persona-cli jobs cancel {job.job_id}`")
        raise


def raise_unless_succeeded(job: common_pb2.Job, error_log: Path | None = None) -> None:
    """A FAILED or CANCELLED job becomes the CLI's one-line error and exit status 1; an internal error of an
    embedded job names `error_log`, the file holding its trace (Session.error_log)."""
    if job.state == common_pb2.JOB_STATE_FAILED:
        message = job.error.message or f"job {job.job_id} failed"
        if job.error.code == "INTERNAL" and error_log is not None:
            message += f"; trace in {error_log}"
        raise CliError(job.error.code or "UNKNOWN", message)
    if job.state == common_pb2.JOB_STATE_CANCELLED:
        raise CliError("CANCELLED", f"job {job.job_id} was cancelled")


def render_job(job: common_pb2.Job):
    def render() -> str:
        pairs = [("job", job.job_id), ("kind", job.kind), ("state", state_name(job.state)),
                 ("progress", f"{job.progress:.0%}"), ("subject", job.subject_id),
                 ("attempts", job.attempts), ("created", when(job.created_at)), ("updated", when(job.updated_at)),
                 ("params", json.dumps(plain(message_dict(job.params)), ensure_ascii=False))]
        if job.HasField("error"):
            pairs.append(("error", f"{job.error.code}: {job.error.message}"))
        if job.interrupted:
            pairs.append(("interrupted", "yes: a server restart interrupted it"))
        typed = job.WhichOneof("typed_result")  # the result of the job's kind, typed; else the untyped one
        if typed or job.result.fields:
            result = message_dict(getattr(job, typed)) if typed else plain(message_dict(job.result))
            pairs.append(("result", json.dumps(result, ensure_ascii=False)))
        return fields(pairs)
    return render


@app.command("list")
def list_(
    ctx: typer.Context,
    kind: Annotated[Optional[str], typer.Option(help="Only jobs of this kind, e.g. caption.")] = None,
    subject: Annotated[Optional[str], typer.Option(help="Only jobs working on this subject id.")] = None,
    as_json: JsonOption = False,
) -> None:
    """List your jobs, newest first.

    Example: `persona-cli jobs list --kind caption --subject subj_51d2…`
    """
    s = session(ctx)
    jobs = list(s.client().all_jobs(kind or "", subject or ""))

    def render() -> str:
        return table(
            ["JOB_ID", "KIND", "STATE", "PROGRESS", "SUBJECT", "CREATED", "ERROR"],
            [(j.job_id, j.kind, state_name(j.state), f"{j.progress:.0%}", j.subject_id, when(j.created_at),
              f"{j.error.code}: {j.error.message}" if j.HasField("error") else "") for j in jobs],
        )

    s.output(as_json).emit({"jobs": [message_dict(j) for j in jobs]}, render)


@app.command("show")
def show(ctx: typer.Context, job_id: JobIdArgument, as_json: JsonOption = False) -> None:
    """Show a job's state, progress, parameters, result or error.

    Example: `persona-cli jobs show job_9c1e…`
    """
    s = session(ctx)
    job = s.client().jobs.GetJob(common_pb2.GetJobRequest(job_id=job_id))
    s.output(as_json).emit(message_dict(job), render_job(job))


@app.command("watch")
def watch(ctx: typer.Context, job_id: JobIdArgument, as_json: JsonOption = False) -> None:
    """Follow a job with a progress bar until it ends, then show it; exit status 1 if it failed.

    Example: `persona-cli --server gpu1:50051 jobs watch job_9c1e…`
    """
    s = session(ctx)
    client = s.client()
    job = client.jobs.GetJob(common_pb2.GetJobRequest(job_id=job_id))
    job = follow_job(client, job, f"{job.kind} {job.job_id}", embedded=s.embedded)
    s.output(as_json).emit(message_dict(job), render_job(job))
    raise_unless_succeeded(job, s.error_log)


@app.command("cancel")
def cancel(ctx: typer.Context, job_id: JobIdArgument, as_json: JsonOption = False) -> None:
    """Ask a queued or running job to stop; it becomes CANCELLED once its worker stops.

    Example: `persona-cli jobs cancel job_9c1e…`
    """
    s = session(ctx)
    job = s.client().jobs.CancelJob(common_pb2.CancelJobRequest(job_id=job_id))
    s.output(as_json).emit(message_dict(job), render_job(job))
    if job.state != common_pb2.JOB_STATE_CANCELLED:
        note(f"cancellation requested; follow it with `persona-cli jobs watch {job.job_id}`")
