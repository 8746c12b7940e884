"""How a command reaches persona: a remote server (--server, plus PERSONA_<SERVICE>_SERVER for services deployed
apart) or the same services started in-process on the data dir (the embedded default), plus the options every
command shares."""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Optional

import typer

from persona.services.runtime.settings import RuntimeSettings, env_float

from ..output import Output, fail, quiet_libraries
from ..sdk import SERVICE_ADDRESS_ENV, PersonaClient

SubjectArgument = Annotated[str, typer.Argument(metavar="SUBJECT", help="Subject id, e.g. subj_51d2…",
                                                show_default=False)]
JsonOption = Annotated[bool, typer.Option(
    "--json", help="Print machine-readable JSON to stdout (proto field names, as the gRPC API returns them).")]

DataDirOption = Annotated[Optional[Path], typer.Option(
    "--data-dir", envvar="PERSONA_HOME", file_okay=False, show_default="~/.persona",
    help="Folder holding persona's metadata and artifacts.")]


def service_addresses_from_env() -> dict[str, str]:
    """{"train": "HOST:PORT", …} from PERSONA_CAPTION_SERVER, PERSONA_MASK_SERVER, PERSONA_TRAIN_SERVER,
    PERSONA_GENERATE_SERVER and PERSONA_EVALUATE_SERVER; a service whose variable is unset or empty uses --server."""
    return {name: os.environ[var].strip() for name, var in SERVICE_ADDRESS_ENV.items()
            if os.environ.get(var, "").strip()}


@dataclass
class Session:
    """The root options, and the client (and embedded server) a command opens on first use."""

    server: str | None = None
    api_key: str | None = None
    data_dir: Path | None = None
    as_json: bool = False
    _client: PersonaClient | None = field(default=None, repr=False)
    _app: object | None = field(default=None, repr=False)

    @property
    def embedded(self) -> bool:
        return not self.server

    @property
    def error_log(self) -> Path | None:
        """The file with the traces of the embedded server's failures (None with --server: the server keeps its own)."""
        from persona.services.runtime.errorlog import error_log_path

        return error_log_path(self.settings().data_dir) if self.embedded else None

    def settings(self, data_dir: Path | None = None, **overrides) -> RuntimeSettings:
        """Runtime settings from PERSONA_* variables, with `data_dir` (else the root --data-dir) on top."""
        return RuntimeSettings.from_env(data_dir=data_dir or self.data_dir, **overrides)

    def client(self) -> PersonaClient:
        """A client of the --server, or of services started in-process on the data dir (stopped at exit)."""
        if self._client is None:
            service_addresses = service_addresses_from_env()
            if self.server:
                client = PersonaClient.connect(self.server, self.api_key, service_addresses=service_addresses)
                client.wait_until_ready(self.server, env_float("PERSONA_CONNECT_TIMEOUT_S", 10.0))
            elif service_addresses:
                names = ", ".join(SERVICE_ADDRESS_ENV[name] for name in service_addresses)
                fail("INVALID_ARGUMENT", f"{names} set without --server / PERSONA_SERVER: set that too, to any "
                                         "persona server of the deployment (every one serves subjects and jobs)")
            else:
                from persona.services.app import build_app  # the embedded server only: remote calls skip its imports
                from persona.services.runtime.caches import keep_caches_in

                keep_caches_in(self.settings().data_dir)  # before quiet_libraries imports torch
                quiet_libraries()

                self._app = build_app(self.settings(auth="none"), "127.0.0.1:0")
                client = PersonaClient.connect(self._app.address)
            self._client = client
        return self._client

    def output(self, as_json: bool = False) -> Output:
        """Output of one command: JSON when --json was given on the root or on the command."""
        return Output(self.as_json or as_json)

    def close(self) -> None:
        if self._client is not None:
            self._client.close()
            self._client = None
        if self._app is not None:
            self._app.stop(0)
            self._app = None


def session(ctx: typer.Context) -> Session:
    """The Session the root callback stored (a default one when a group is invoked on its own)."""
    found = ctx.find_object(Session)
    if found is None:
        found = ctx.ensure_object(Session)
        ctx.call_on_close(found.close)
    return found
