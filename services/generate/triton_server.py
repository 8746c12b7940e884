"""Run NVIDIA Triton (`tritonserver`) as a child process: ports, log, readiness, stop, and model control through
it with the server log's lines added to errors.

The binary comes from `triton_install.find_tritonserver` (PERSONA_TRITONSERVER, PATH, /opt/tritonserver, the
nvidia-pytriton wheel); loading and unloading models is `triton_client`. Nothing here imports tritonclient at
module import time, so importing this module stays cheap.
"""
from __future__ import annotations

import os
import re
import secrets
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING, Mapping, Sequence

from persona.services.runtime.errors import FailedPrecondition, InvalidArgument, PersonaError, Unavailable

from .triton_client import load_model, unload_model
from .triton_install import TritonInstall, find_tritonserver

if TYPE_CHECKING:  # pragma: no cover
    import tritonclient.grpc


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def _tail(path: Path | None, limit: int = 4000) -> str:
    if path is None or not path.is_file():
        return ""
    with open(path, "rb") as f:
        f.seek(0, os.SEEK_END)
        f.seek(max(0, f.tell() - limit))
        return f.read().decode("utf-8", errors="replace").strip()


class TritonServer:
    """One tritonserver child process bound to `host` (127.0.0.1 by default).

    Ports given as 0 are picked free at `start()`; `None` for `http_port`/`metrics_port` turns that
    endpoint off (gRPC is always on). `log_file` receives the server's stdout and stderr (a temp file
    if not given). Use as a context manager, or `start()` / `stop()`."""

    def __init__(self, model_repository: Path | str, *, grpc_port: int = 0, http_port: int | None = 0,
                 metrics_port: int | None = 0, host: str = "127.0.0.1", log_file: Path | str | None = None,
                 model_control: str = "explicit", load_models: Sequence[str] = (), log_verbose: int = 0,
                 exit_timeout_s: int = 5, extra_args: Sequence[str] = (), install: TritonInstall | None = None,
                 env: Mapping[str, str] | None = None):
        if model_control not in ("none", "poll", "explicit"):
            raise InvalidArgument(f"`model_control` is {model_control!r}: use none, poll or explicit")
        self.model_repository = Path(model_repository)
        self.host = host
        self._want_ports = {"grpc": grpc_port, "http": http_port, "metrics": metrics_port}
        self.ports: dict[str, int | None] = dict(self._want_ports)
        self.log_file = Path(log_file) if log_file is not None else None
        self._own_log = log_file is None
        self.model_control = model_control
        self.load_models = tuple(load_models)
        self.log_verbose = log_verbose
        self.exit_timeout_s = exit_timeout_s
        self.extra_args = tuple(extra_args)
        self.install = install
        self.base_env = env
        # A private shared-memory prefix: several servers on one host never share /dev/shm regions,
        # and what a killed server leaves behind can be removed by prefix.
        self.shm_prefix = f"persona_triton_{os.getpid()}_{secrets.token_hex(4)}"
        self.process: subprocess.Popen | None = None
        self.startup_s: float | None = None

    # -- properties

    @property
    def grpc_port(self) -> int:
        port = self.ports["grpc"]
        if not port:
            raise FailedPrecondition("the Triton server is not started: call start() first")
        return port

    @property
    def grpc_url(self) -> str:
        return f"{self.host}:{self.grpc_port}"

    @property
    def http_url(self) -> str | None:
        return f"{self.host}:{self.ports['http']}" if self.ports["http"] else None

    @property
    def metrics_url(self) -> str | None:
        return f"http://{self.host}:{self.ports['metrics']}/metrics" if self.ports["metrics"] else None

    @property
    def pid(self) -> int | None:
        return self.process.pid if self.process else None

    def is_running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def log_tail(self, limit: int = 4000) -> str:
        return _tail(self.log_file, limit)

    def _startup_excerpt(self, limit: int = 2500) -> str:
        """What went wrong at startup: the text before a usage dump, else its error lines, else the tail."""
        text = _tail(self.log_file, 200_000)
        if "Usage: tritonserver" in text:
            return text.split("Usage: tritonserver", 1)[0].strip()[-limit:]
        errors = [ln for ln in text.splitlines() if re.match(r"^E\d{4} ", ln) or "error" in ln.lower()]
        return "\n".join(errors)[-limit:] if errors else text[-limit:]

    # -- command line

    def command(self) -> list[str]:
        install = self.install or find_tritonserver()
        p = self.ports
        args = [str(install.binary), f"--model-repository={self.model_repository}",
                f"--model-control-mode={self.model_control}",
                f"--grpc-address={self.host}", f"--grpc-port={p['grpc']}",
                f"--log-verbose={self.log_verbose}", f"--exit-timeout-secs={self.exit_timeout_s}",
                f"--backend-config=python,shm-region-prefix-name={self.shm_prefix}"]
        if p["http"] is None:
            args.append("--allow-http=false")
        else:
            args += [f"--http-address={self.host}", f"--http-port={p['http']}"]
        if p["metrics"] is None:
            args.append("--allow-metrics=false")
        else:
            args += [f"--metrics-address={self.host}", f"--metrics-port={p['metrics']}"]
        args += [f"--load-model={m}" for m in self.load_models]
        args += install.server_args()
        args += list(self.extra_args)
        return args

    # -- lifecycle

    def start(self, timeout_s: float = 60.0) -> "TritonServer":
        """Start the process and wait until it is live and ready (gRPC). Raises FailedPrecondition if it
        exits early (with the tail of its log), Unavailable if it is not ready within `timeout_s`."""
        if self.is_running():
            return self
        if not self.model_repository.is_dir():
            raise InvalidArgument(f"`model_repository` {self.model_repository} is not a folder: create it first")
        if self.install is None:
            self.install = find_tritonserver()
        auto = [k for k, v in self._want_ports.items() if v == 0]
        deadline = time.monotonic() + timeout_s
        attempts = 3 if auto else 1
        for attempt in range(attempts):
            try:
                self._start_once(deadline)
                return self
            except FailedPrecondition as e:
                # A port we picked may have been taken between picking and binding: pick again.
                if attempt + 1 < attempts and "address already in use" in e.message.lower():
                    continue
                raise

    def _start_once(self, deadline: float) -> None:
        self.ports = {k: (free_port(self.host) if v == 0 else v) for k, v in self._want_ports.items()}
        if self._own_log:
            fd, name = tempfile.mkstemp(prefix="tritonserver-", suffix=".log")
            os.close(fd)
            self.log_file = Path(name)
        assert self.log_file is not None and self.install is not None
        self.log_file.parent.mkdir(parents=True, exist_ok=True)
        started = time.monotonic()
        with open(self.log_file, "ab") as log:
            self.process = subprocess.Popen(self.command(), stdin=subprocess.DEVNULL, stdout=log,
                                            stderr=subprocess.STDOUT, env=self.install.env(self.base_env),
                                            cwd=self.model_repository, start_new_session=True)
        from tritonclient.utils import InferenceServerException

        client = self.client()
        try:
            while True:
                code = self.process.poll()
                if code is not None:
                    self._cleanup_shm()
                    raise FailedPrecondition(
                        f"tritonserver exited with code {code} while starting (log {self.log_file}): "
                        f"{self._startup_excerpt()}")
                try:
                    if client.is_server_live(client_timeout=1.0) and client.is_server_ready(client_timeout=1.0):
                        self.startup_s = time.monotonic() - started
                        return
                except InferenceServerException:
                    pass
                if time.monotonic() > deadline:
                    self.stop()
                    raise Unavailable(
                        f"tritonserver did not become ready in time (log {self.log_file}): {self.log_tail(2500)}")
                time.sleep(0.05)
        finally:
            client.close()

    def stop(self, grace_s: float = 10.0) -> int | None:
        """SIGTERM, then SIGKILL (to the whole process group: stubs included) after `grace_s`.
        Returns the exit code (None if it was not started)."""
        proc = self.process
        if proc is None:
            return None
        if proc.poll() is None:
            try:
                proc.send_signal(signal.SIGTERM)
            except ProcessLookupError:
                pass
            try:
                proc.wait(timeout=grace_s)
            except subprocess.TimeoutExpired:
                self._kill_group(proc)
                proc.wait(timeout=10)
        # Stub processes normally exit with the server; make sure none outlives it.
        self._kill_group(proc)
        gone_by = time.monotonic() + 5
        while time.monotonic() < gone_by:
            try:
                os.killpg(proc.pid, 0)
            except (ProcessLookupError, PermissionError):
                break
            time.sleep(0.05)
        self._cleanup_shm()
        return proc.returncode

    @staticmethod
    def _kill_group(proc: subprocess.Popen) -> None:
        try:
            os.killpg(proc.pid, signal.SIGKILL)  # start_new_session: the group id is the server's pid
        except (ProcessLookupError, PermissionError):
            pass

    def _cleanup_shm(self) -> None:
        shm = Path("/dev/shm")
        if shm.is_dir():
            for p in shm.glob(f"{self.shm_prefix}*"):
                p.unlink(missing_ok=True)

    def __enter__(self) -> "TritonServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def load_model(self, name: str, *, timeout_s: float = 120.0, **kwargs) -> float:
        """`load_model` through a fresh client; errors carry the server log's lines about `name`."""
        client = self.client()
        try:
            return load_model(client, name, timeout_s=timeout_s, **kwargs)
        except PersonaError as e:
            raise self._with_log(e, name) from e
        finally:
            client.close()

    def unload_model(self, name: str, *, timeout_s: float = 30.0, **kwargs) -> float:
        client = self.client()
        try:
            return unload_model(client, name, timeout_s=timeout_s, **kwargs)
        except PersonaError as e:
            raise self._with_log(e, name) from e
        finally:
            client.close()

    def _with_log(self, err: PersonaError, name: str) -> PersonaError:
        if isinstance(err, Unavailable) and self.process is not None and self.process.poll() is not None:
            return Unavailable(f"{err.message} (tritonserver exited with code {self.process.returncode}: "
                               f"{self.log_tail(1500)})")
        lines = [ln for ln in self.log_tail(20000).splitlines()
                 if ln.startswith(("E", "W")) and (f"'{name}'" in ln or f"'{name}:" in ln)]
        if not lines:
            return err
        return type(err)(f"{err.message.rstrip()} [tritonserver log: {' | '.join(lines[-3:])}]")

    def client(self, **kwargs) -> "tritonclient.grpc.InferenceServerClient":
        """A tritonclient gRPC client for this server (close it when done)."""
        try:
            import tritonclient.grpc as grpcclient
        except ImportError as e:
            raise FailedPrecondition(f"tritonclient is not installed ({e}): pip install 'tritonclient[grpc]'") from e
        return grpcclient.InferenceServerClient(self.grpc_url, **kwargs)
