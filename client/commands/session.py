"""How a command reaches persona: a remote server (--server, plus PERSONA_<SERVICE>_SERVER for services deployed
apart) or the same services started in-process on the data dir (the embedded default), plus the options every
command shares."""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Optional

import typer

from persona.services.runtime.datadir import data_dir_owner, local_socket
from persona.services.runtime.settings import RuntimeSettings, env_float

from ..output import Output, fail, note, quiet_libraries
from ..sdk import SERVICE_ADDRESS_ENV, PersonaClient, PersonaClientError

# How long a second persona-cli waits for the one owning the data dir to answer on its local socket.
OWNER_CONNECT_TIMEOUT_S = 5.0

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
    _socket: Path | None = field(default=None, repr=False)
    # The embedded persona-cli that owns the data dir, when this one reaches it through its local socket.
    _owner: str | None = field(default=None, repr=False)

    @property
    def embedded(self) -> bool:
        """Whether the services (and so the jobs this command starts) run inside this process."""
        return not self.server and self._owner is None

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
                client = self._owner_client() or self._embedded_client()
            self._client = client
        return self._client

    def _owner_client(self) -> PersonaClient | None:
        """A client of the persona-cli that owns the data dir (another terminal's `train`), over its local socket;
        None when no process owns it. Fails at once, before importing the services, when the owner takes no local
        calls (`persona-cli serve` / `up`, or a socket path too long)."""
        data_dir = self.settings().data_dir
        pid = data_dir_owner(data_dir)
        if pid is None:
            return None
        socket = local_socket(data_dir)
        if socket is not None and socket.exists():
            client = PersonaClient.connect(f"unix:{socket}")
            try:
                client.wait_until_ready(str(socket), OWNER_CONNECT_TIMEOUT_S)
            except PersonaClientError:
                client.close()
            else:
                self._owner = pid
                note(f"data dir {data_dir} is in use by persona-cli (pid {pid}): running this command in it")
                return client
        fail("FAILED_PRECONDITION",
             f"data dir {data_dir} is in use by another persona process (pid {pid}) that takes no local calls (a "
             "`persona-cli serve` or `up`): talk to it with --server HOST:PORT (PERSONA_SERVER; `persona-cli "
             "status` shows the address of `up`), or pass another --data-dir")

    def _embedded_client(self) -> PersonaClient:
        """The services started in this process on the data dir, listening on its local socket too."""
        from persona.services.app import build_app  # the embedded server only: remote calls skip its imports
        from persona.services.runtime.caches import keep_caches_in

        settings = self.settings(auth="none")
        keep_caches_in(settings.data_dir)  # before quiet_libraries imports torch
        quiet_libraries()
        self._socket = local_socket(settings.data_dir)
        self._app = build_app(settings, "127.0.0.1:0", unix_socket=self._socket)
        return PersonaClient.connect(self._app.address)

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
            if self._socket is not None:
                self._socket.unlink(missing_ok=True)  # no one listens there any more


def session(ctx: typer.Context) -> Session:
    """The Session the root callback stored (a default one when a group is invoked on its own)."""
    found = ctx.find_object(Session)
    if found is None:
        found = ctx.ensure_object(Session)
        ctx.call_on_close(found.close)
    return found
