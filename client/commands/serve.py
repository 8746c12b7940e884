"""`persona-cli serve`: every persona service (or those `--services` names) in one process, until SIGTERM or
Ctrl-C; `persona-cli up`: the same with a tritonserver beside it (`--detach`: in the background, see lifecycle.py
for that, `status` and `down`)."""
from __future__ import annotations

import logging
import os
import sys
from enum import Enum
from typing import Annotated

import typer

from ..output import note
from .lifecycle import up_detached, write_up_state
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


class EngineChoice(str, Enum):
    embedded = "embedded"
    triton = "triton"


HostOption = Annotated[str, typer.Option(
    envvar="PERSONA_HOST", help="Interface to listen on; 0.0.0.0 for every interface (e.g. in a container).")]
PortOption = Annotated[int, typer.Option(
    envvar="PERSONA_PORT", min=0, max=65535, help="TCP port; 0 picks a free one (printed on stderr).")]
LogLevelOption = Annotated[LogLevel, typer.Option(
    envvar="PERSONA_LOG_LEVEL", help="Log level on stderr; info logs one line per call.")]
ModelPathsOption = Annotated[bool, typer.Option(
    "--model-paths/--no-model-paths", envvar="PERSONA_MODEL_PATHS",
    help="Let requests name any folder on this machine as a model (`base_model`, a mask `model`). Off for `serve`: "
         "callers get the operator's allow-list only — `tiny`, folders under PERSONA_MODELS_ROOT (default the model "
         "cache, PERSONA_MODEL_CACHE) by name, hub ids in the Hugging Face cache (only those in "
         "PERSONA_ALLOWED_MODELS when set, a comma-separated list of exact references); another tenant's concepts "
         "are reachable only by concept id. On for `up` and the embedded CLI (a user on their own files).")]
TritonUrlOption = Annotated[str, typer.Option(
    envvar="PERSONA_TRITON_URL", metavar="HOST:PORT",
    help="gRPC address of a Triton someone else runs (its model repository must be PERSONA_TRITON_REPOSITORY); "
         "empty: persona starts tritonserver itself.")]


def serve(
    ctx: typer.Context,
    host: HostOption = "127.0.0.1",
    port: PortOption = 50051,
    data_dir: DataDirOption = None,
    auth: Annotated[AuthMode, typer.Option(
        envvar="PERSONA_AUTH", help="api-key: every call needs a key from `persona-cli keys create`; "
                                    "none: one local tenant, for a laptop.")] = AuthMode.api_key,
    engine: Annotated[EngineChoice, typer.Option(
        envvar="PERSONA_GENERATE_ENGINE", case_sensitive=False,
        help="Who draws images: embedded (torch in this process) or triton (concepts exported to ONNX and "
             "served by Triton: --triton-url, or a tritonserver persona starts).")] = EngineChoice.embedded,
    triton_url: TritonUrlOption = "",
    log_level: LogLevelOption = LogLevel.info,
    services: Annotated[str, typer.Option(
        "--services", envvar="PERSONA_SERVICES", metavar="NAME,…", show_default="all",
        help="Serve only these of caption, mask, train, generate, evaluate (comma-separated), e.g. one per "
             "Kubernetes Deployment; subjects, jobs, health and reflection are always served, and the job runner "
             "runs only these services' jobs. Several processes need a shared metadata store (Postgres).")] = "",
    model_paths: ModelPathsOption = False,
) -> None:
    """Serve every persona service (subjects, captions, masks, training, generation, evaluation, jobs), with gRPC
    health and reflection, in one process; `--services` for a subset.

    Logs go to stderr; SIGTERM or Ctrl-C stops it gracefully, letting calls in flight finish.

    Limits (environment, default): health and quick reads (Get…/List…/cancels) have their own threads, so they
    answer under any load (PERSONA_RPC_WORKERS 32); long calls share PERSONA_WORK_WORKERS (32); WatchJob streams
    PERSONA_MAX_WATCH_STREAMS (128). Generate draws PERSONA_GENERATE_CONCURRENCY calls at once (1) with
    PERSONA_GENERATE_QUEUE more waiting (8); beyond that RESOURCE_EXHAUSTED with a time to retry after. One Generate
    draws at most PERSONA_GENERATE_MAX_PIXELS per image (1048576), PERSONA_GENERATE_MAX_IMAGES images (16) and
    PERSONA_GENERATE_MAX_MEGAPIXEL_STEPS steps × megapixels (256); training at most PERSONA_TRAIN_MAX_RESOLUTION
    (1024) and PERSONA_TRAIN_MAX_BATCH (16); an upload PERSONA_MAX_UPLOAD_PIXELS (256000000) in all, photos decoded
    within PERSONA_DECODE_BUDGET_PIXELS at once (128000000). Requests never name server paths as models unless
    --model-paths.

    Example: `persona-cli serve --host 0.0.0.0 --port 50051 --data-dir /srv/persona`, or one service:
    `persona-cli serve --services train …`
    """
    from persona.services.app import parse_services

    run_server(ctx, host, port, data_dir, auth, engine, triton_url, log_level, services=parse_services(services),
               model_paths=model_paths)


def up(
    ctx: typer.Context,
    host: HostOption = "127.0.0.1",
    port: PortOption = 50051,
    data_dir: DataDirOption = None,
    auth: Annotated[AuthMode, typer.Option(
        envvar="PERSONA_AUTH", help="none (default here): one local tenant; api-key: every call needs a key.")]
    = AuthMode.none,
    triton_url: TritonUrlOption = "",
    log_level: LogLevelOption = LogLevel.info,
    detach: Annotated[bool, typer.Option(
        "--detach", "-d", help="Start in the background, wait until it serves, print the endpoints and return "
                               "(logs in PERSONA_HOME/logs/persona.log); then `persona-cli status` and "
                               "`persona-cli down`.")] = False,
) -> None:
    """Run persona with Triton: start tritonserver (explicit model control, on the data dir's model repository)
    and every persona service, generation drawing on Triton; Ctrl-C or SIGTERM stops both.

    Two processes, each health-checked by `persona-cli status`: ONE persona process serving all five services on
    one port (they share one SQLite store and one job runner whose crash recovery assumes a single owner of the
    data dir, which a lock enforces; a process per service would need a shared store such as Postgres first),
    and `tritonserver`, which persona starts and stops. While running, PERSONA_HOME/run/up.json names both
    (pids, addresses, logs).

    Concepts are exported to ONNX and loaded into Triton on first use (or `LoadConcept`), without a restart.
    The tritonserver is NVIDIA's where one is installed (PERSONA_TRITONSERVER, PATH, /opt/tritonserver), else
    the one bundled in nvidia-pytriton (python backend: components run ONNX Runtime inside it).

    Example: `persona-cli up --detach --port 50051`, then `persona-cli --server 127.0.0.1:50051 generate CONCEPT
    "a sks dog on the beach"`, `persona-cli status`, `persona-cli down`.
    """
    if detach:
        up_detached(ctx, host, port, data_dir, auth.value, triton_url, log_level.value)
    else:
        run_server(ctx, host, port, data_dir, auth, EngineChoice.triton, triton_url, log_level, write_state=True)


def run_server(ctx: typer.Context, host: str, port: int, data_dir, auth: AuthMode, engine: EngineChoice,
               triton_url: str, log_level: LogLevel, write_state: bool = False,
               services: frozenset[str] | None = None, model_paths: bool = True) -> None:
    """Builds the app on the data dir and serves until SIGTERM or Ctrl-C; with `write_state`, the data dir's
    run/up.json names the processes while they serve; `services` (None = all) limits what it serves."""
    from persona.services.app import build_app
    from persona.services.generate.settings import GenerateSettings
    from persona.services.runtime.errorlog import error_log_path
    from persona.services.runtime.server import serve_until_signal

    logging.basicConfig(level=log_level.value.upper(), stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    settings = session(ctx).settings(data_dir, auth=auth.value, model_paths=model_paths)
    generate_settings = GenerateSettings.from_env(engine=engine.value, triton_url=triton_url or None)
    address = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    # A busy port is UNAVAILABLE, a busy data dir FAILED_PRECONDITION.
    app = build_app(settings, address, generate_settings=generate_settings, start_engine=True, services=services)
    listening = address.rsplit(":", 1)[0] + f":{app.server.port}"
    endpoint = getattr(app.generate.engine, "endpoint", None)
    if endpoint is not None:
        note(f"Triton serving {app.generate.engine.repository.root} on {endpoint.url} (gRPC)")
    served = "" if services is None else f"services {','.join(sorted(app.services)) or 'none'} + subjects, jobs; "
    note(f"persona listening on {listening} ({served}data dir {settings.data_dir}, auth {auth.value}, "
         f"generation {engine.value}); stop with Ctrl-C or SIGTERM")
    note(f"logging to stderr; traces of failed jobs and calls also in {error_log_path(settings.data_dir)}")
    if auth is AuthMode.api_key and not app.authenticator.list_keys():
        note(f"no API keys yet: create one with `persona-cli keys create TENANT --data-dir {settings.data_dir}`, "
             "then call with --api-key KEY or PERSONA_API_KEY")
    state = write_up_state(settings.data_dir, listening, endpoint) if write_state else None
    still_running: list[int] = []
    try:
        serve_until_signal(app.server, settings.grace_period_s,
                           on_stop=lambda: still_running.append(app.runner.shutdown(wait=True, timeout_s=settings.grace_period_s)))
        app.generate.engine.close()  # a tritonserver persona started stops with it (it runs in its own session)
    finally:
        if state is not None:
            state.unlink(missing_ok=True)
    if still_running and still_running[0]:
        # Jobs cut off here stay RUNNING in the store and are resumed on the next start, as after a
        # crash; without this exit the interpreter would wait for them however long they take.
        log.warning("stopping with %d job(s) still running; they resume on the next start", still_running[0])
        logging.shutdown()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)
    log.info("stopped")
