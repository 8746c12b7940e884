"""`persona-cli serve`: every persona service in one process, until SIGTERM or Ctrl-C."""
from __future__ import annotations

import logging
import os
import sys
from enum import Enum
from typing import Annotated

import typer

from ..output import note
from .session import DataDirOption, session

log = logging.getLogger("persona.serve")


class AuthMode(str, Enum):
    api_key = "api-key"
    none = "none"


class LogLevel(str, Enum):
    debug = "debug"
    info = "info"
    warning = "warning"
    error = "error"


def serve(
    ctx: typer.Context,
    host: Annotated[str, typer.Option(
        envvar="PERSONA_HOST", help="Interface to listen on; 0.0.0.0 for every interface (e.g. in a container).",
    )] = "127.0.0.1",
    port: Annotated[int, typer.Option(
        envvar="PERSONA_PORT", min=0, max=65535, help="TCP port; 0 picks a free one (printed on stderr).")] = 50051,
    data_dir: DataDirOption = None,
    auth: Annotated[AuthMode, typer.Option(
        envvar="PERSONA_AUTH", help="api-key: every call needs a key from `persona-cli keys create`; "
                                    "none: one local tenant, for a laptop.")] = AuthMode.api_key,
    log_level: Annotated[LogLevel, typer.Option(
        envvar="PERSONA_LOG_LEVEL", help="Log level on stderr; info logs one line per call.")] = LogLevel.info,
) -> None:
    """Serve every persona service (subjects, captions, training, jobs), with gRPC health and reflection, in one process.

    Logs go to stderr; SIGTERM or Ctrl-C stops it gracefully, letting calls in flight finish.

    Example: `persona-cli serve --host 0.0.0.0 --port 50051 --data-dir /srv/persona`
    """
    from persona.services.app import build_app
    from persona.services.runtime.server import serve_until_signal

    logging.basicConfig(level=log_level.value.upper(), stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    settings = session(ctx).settings(data_dir, auth=auth.value)
    address = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    app = build_app(settings, address)  # a busy port is UNAVAILABLE, a busy data dir FAILED_PRECONDITION
    listening = address.rsplit(":", 1)[0] + f":{app.server.port}"
    note(f"persona listening on {listening} (data dir {settings.data_dir}, auth {auth.value}); "
         "stop with Ctrl-C or SIGTERM")
    if auth is AuthMode.api_key and not app.authenticator.list_keys():
        note(f"no API keys yet: create one with `persona-cli keys create TENANT --data-dir {settings.data_dir}`, "
             "then call with --api-key KEY or PERSONA_API_KEY")
    still_running: list[int] = []
    serve_until_signal(app.server, settings.grace_period_s,
                       on_stop=lambda: still_running.append(app.runner.shutdown(wait=True, timeout_s=settings.grace_period_s)))
    if still_running and still_running[0]:
        # Jobs cut off here stay RUNNING in the store and are resumed on the next start, as after a
        # crash; without this exit the interpreter would wait for them however long they take.
        log.warning("stopping with %d job(s) still running; they resume on the next start", still_running[0])
        logging.shutdown()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)
    log.info("stopped")
