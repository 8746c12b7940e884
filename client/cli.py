"""persona-cli: the Typer command line of persona, a gRPC client of a remote server (--server) or of the
same services started in-process on the data dir."""
from __future__ import annotations

from typing import Annotated, Optional

import typer
from typer.core import TyperGroup

from persona.services.runtime.cpus import limit_threads_to_available_cpus

from .commands import (bench, captions, concepts, encoder, evaluate, export, generate, jobs, keys, lifecycle, mask,
                       serve, subjects, train, worker)
from .commands.session import DataDirOption, Session
from .output import error_boundary


class PersonaGroup(TyperGroup):
    """The root group: every command runs inside the error boundary (one `CODE: message` line, exit 1)."""

    def invoke(self, ctx: typer.Context):
        with error_boundary():
            return super().invoke(ctx)


app = typer.Typer(
    cls=PersonaGroup,
    name="persona-cli",
    no_args_is_help=True,
    rich_markup_mode="markdown",
    pretty_exceptions_enable=False,  # never print locals (API keys) or stacks; errors are one line
    context_settings={"help_option_names": ["-h", "--help"]},
)


@app.callback()
def root(
    ctx: typer.Context,
    server: Annotated[Optional[str], typer.Option(
        envvar="PERSONA_SERVER", metavar="HOST:PORT",
        help="Talk to the persona server at HOST:PORT (waiting up to PERSONA_CONNECT_TIMEOUT_S, default 10, for "
             "it to answer). Without it, the services run in-process on --data-dir.")] = None,
    api_key: Annotated[Optional[str], typer.Option(
        envvar="PERSONA_API_KEY", show_default=False,
        help="API key for --server (from `persona-cli keys create`).")] = None,
    data_dir: DataDirOption = None,
    as_json: Annotated[bool, typer.Option(
        "--json", help="Print machine-readable JSON to stdout, for every command.")] = False,
) -> None:
    """Personalise text-to-image models on a few photos of your subject: upload, caption, train, generate.

    Without --server, each command starts persona's services in-process on the data dir
    (~/.persona or PERSONA_HOME) and stops them when it ends; with --server HOST:PORT (or
    PERSONA_SERVER) it calls a running `persona-cli serve`. Errors print one `CODE: message` line on
    stderr and exit 1.

    Example: `persona-cli subjects add photos/bruno/ --class dog && persona-cli caption SUBJECT --case 1`,
    or all in one: `persona-cli train photos/bruno/ --class dog`
    """
    state = Session(server=server, api_key=api_key, data_dir=data_dir, as_json=as_json)
    ctx.obj = state
    ctx.call_on_close(state.close)


app.add_typer(subjects.app, name="subjects")
app.command("caption")(captions.caption)
app.add_typer(captions.app, name="captions")
app.command("mask")(mask.mask)
app.command("train")(train.train)
app.add_typer(concepts.app, name="concepts")
app.add_typer(encoder.app, name="encoder")
app.command("export")(export.export)
app.command("generate")(generate.generate)
app.command("evaluate")(evaluate.evaluate)
app.add_typer(jobs.app, name="jobs")
app.add_typer(keys.app, name="keys")
app.command("serve")(serve.serve)
app.command("up")(serve.up)
app.command("status")(lifecycle.status)
app.command("down")(lifecycle.down)
app.command("run-job")(worker.run_job)
app.add_typer(bench.app, name="bench")


def main() -> None:
    """Console entry point of `persona-cli`."""
    # Before torch is imported (by any command that trains or draws): as many threads as CPUs the process has.
    limit_threads_to_available_cpus()
    app()


if __name__ == "__main__":
    main()
