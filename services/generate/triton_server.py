"""Run NVIDIA Triton (`tritonserver`) as a child process and drive its explicit model control.

Where the binary comes from (`find_tritonserver`, first match wins):

1. `PERSONA_TRITONSERVER`: the binary itself, or an install root holding `bin/tritonserver`
   (NVIDIA's container: `/opt/tritonserver`);
2. a `tritonserver` on `PATH`, then `/opt/tritonserver/bin/tritonserver`;
3. the binary bundled in the `nvidia-pytriton` wheel (Triton 2.51, **python backend only**), installed on its own
   with `pip install --no-deps nvidia-pytriton==0.7.0` (not a dependency of persona: its metadata pins numpy < 2).

The bundled binary needs three things its wheel does not do on its own (measured, see DESIGN "Triton"):
the python backend stub built for the running interpreter copied next to `libtriton_python.so`
(`prepare_python_stub`, idempotent, temp + rename so racing processes are safe); the interpreter's
own LIBDIR and `nvidia_pytriton.libs` on `LD_LIBRARY_PATH` (otherwise the stub picks up another
libpython and a load can hang for minutes); the interpreter's `bin` first on `PATH` (the embedded
interpreter finds its prefix, hence the venv's site-packages, through it).

Nothing here imports tritonclient at module import time, so importing this module stays cheap.
"""
from __future__ import annotations

import errno
import filecmp
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import sysconfig
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Mapping, Sequence

from persona.services.runtime.caches import persona_cache_dir
from persona.services.runtime.errors import (
    DeadlineExceeded,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    PersonaError,
    Unavailable,
)

if TYPE_CHECKING:  # pragma: no cover
    import tritonclient.grpc

ENV_TRITONSERVER = "PERSONA_TRITONSERVER"
DEFAULT_INSTALL_ROOT = Path("/opt/tritonserver")
# The bundled server for laptops and CI; --no-deps because nvidia-pytriton's metadata pins numpy < 2, which persona
# does not need (it runs only the binary and python-backend files of the wheel; tritonclient comes with persona).
BUNDLED_INSTALL = "pip install --no-deps nvidia-pytriton==0.7.0"
INSTALL_ADVICE = (
    f"for a local one, `{BUNDLED_INSTALL}` (tritonserver 2.51, python backend only, Linux x86_64/aarch64); in "
    "production run NVIDIA's Triton container (nvcr.io/nvidia/tritonserver, binary at "
    "/opt/tritonserver/bin/tritonserver) and point persona at it with PERSONA_TRITON_URL; "
    f"or set {ENV_TRITONSERVER} to a tritonserver binary or install root")


# --------------------------------------------------------------------------------------------------
# Locating the binary


@dataclass(frozen=True)
class TritonInstall:
    """A runnable tritonserver: the binary, where its backends live, what it needs on the loader path."""

    binary: Path
    source: str  # "env", "path", "opt", "pytriton"
    backend_dir: Path | None = None  # None: the binary's default (/opt/tritonserver/backends)
    cache_dir: Path | None = None
    lib_dirs: tuple[Path, ...] = ()
    path_dirs: tuple[Path, ...] = ()

    def env(self, base: Mapping[str, str] | None = None) -> dict[str, str]:
        """The environment to run `binary` in: `base` (default os.environ) plus loader path and PATH."""
        env = dict(os.environ if base is None else base)
        if self.lib_dirs:
            parts = [str(p) for p in self.lib_dirs] + [p for p in env.get("LD_LIBRARY_PATH", "").split(":") if p]
            env["LD_LIBRARY_PATH"] = ":".join(dict.fromkeys(parts))
        if self.path_dirs:
            parts = [str(p) for p in self.path_dirs] + [p for p in env.get("PATH", os.defpath).split(":") if p]
            env["PATH"] = ":".join(dict.fromkeys(parts))
        return env

    def server_args(self) -> list[str]:
        args = []
        if self.backend_dir is not None:
            args.append(f"--backend-directory={self.backend_dir}")
        if self.cache_dir is not None:
            args.append(f"--cache-directory={self.cache_dir}")
        return args


def _interpreter_dirs() -> tuple[tuple[Path, ...], tuple[Path, ...]]:
    """(lib dirs, bin dirs) of the running interpreter: its libpython's LIBDIR, and the venv's bin."""
    libs: list[Path] = []
    libdir = sysconfig.get_config_var("LIBDIR")
    if libdir and Path(libdir).is_dir():
        libs.append(Path(libdir))
    bins = [Path(sys.executable).parent]
    return tuple(libs), tuple(bins)


def _pytriton_root() -> Path | None:
    """The `tritonserver` folder inside the installed nvidia-pytriton wheel, found without importing pytriton."""
    import importlib.util

    try:
        spec = importlib.util.find_spec("pytriton")
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    for location in spec.submodule_search_locations:
        root = Path(location) / "tritonserver"
        if (root / "bin" / "tritonserver").is_file():
            return root
    return None


def prepare_python_stub(backends_dir: Path, stubs_dir: Path, version: str | None = None) -> Path:
    """Put the python-backend stub for `version` (default: this interpreter) at
    `backends_dir/python/triton_python_backend_stub`. Idempotent; concurrent callers are safe
    (each writes its own temp file and renames it into place). Returns the stub's path."""
    version = version or f"{sys.version_info.major}.{sys.version_info.minor}"
    src = stubs_dir / version / "triton_python_backend_stub"
    if not src.is_file():
        have = sorted(p.name for p in stubs_dir.iterdir() if p.is_dir()) if stubs_dir.is_dir() else []
        raise FailedPrecondition(
            f"the bundled Triton python backend has no stub for Python {version} (has: {', '.join(have) or 'none'}): "
            f"run persona with one of those Python versions, or {INSTALL_ADVICE}")
    dst = backends_dir / "python" / "triton_python_backend_stub"
    if dst.is_file() and os.access(dst, os.X_OK) and filecmp.cmp(src, dst, shallow=False):
        return dst
    fd, tmp = tempfile.mkstemp(prefix=".stub-", dir=dst.parent)
    try:
        with os.fdopen(fd, "wb") as out, open(src, "rb") as inp:
            shutil.copyfileobj(inp, out)
        os.chmod(tmp, 0o755)
        os.replace(tmp, dst)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return dst


def _pytriton_install(root: Path) -> TritonInstall:
    backends = root / "backends"
    stubs = root / "python_backend_stubs"
    try:
        prepare_python_stub(backends, stubs)
    except OSError as e:
        if e.errno not in (errno.EACCES, errno.EPERM, errno.EROFS):
            raise
        # Read-only site-packages (not ours, or a read-only root filesystem in a container): prepare a private
        # copy of the backends in persona's cache (under the data dir: nothing persona writes lands in $HOME).
        cache = persona_cache_dir() / "tritonserver"
        py = f"{sys.version_info.major}.{sys.version_info.minor}"
        private = cache / f"backends-py{py}"
        if not (private / "python" / "libtriton_python.so").is_file():
            private.parent.mkdir(parents=True, exist_ok=True)
            tmp = Path(tempfile.mkdtemp(prefix=".backends-", dir=private.parent))
            try:
                shutil.copytree(backends, tmp / "b")
                try:
                    os.replace(tmp / "b", private)
                except OSError:  # another process won the race
                    if not (private / "python" / "libtriton_python.so").is_file():
                        raise
            finally:
                shutil.rmtree(tmp, ignore_errors=True)
        prepare_python_stub(private, stubs)
        backends = private
    libdirs, bindirs = _interpreter_dirs()
    wheel_libs = root.parent.parent / "nvidia_pytriton.libs"
    lib_dirs = libdirs + ((wheel_libs,) if wheel_libs.is_dir() else ())
    caches = root / "caches"
    return TritonInstall(binary=root / "bin" / "tritonserver", source="pytriton", backend_dir=backends,
                         cache_dir=caches if caches.is_dir() else None, lib_dirs=lib_dirs, path_dirs=bindirs)


def _native_install(binary: Path, source: str) -> TritonInstall:
    """A tritonserver from NVIDIA's layout (`<root>/bin/tritonserver`, `<root>/backends`)."""
    root = binary.resolve().parent.parent
    backends = root / "backends"
    _, bindirs = _interpreter_dirs()
    return TritonInstall(binary=binary, source=source, backend_dir=backends if backends.is_dir() else None,
                         path_dirs=bindirs)


def find_tritonserver(environ: Mapping[str, str] | None = None) -> TritonInstall:
    """Locate a runnable tritonserver (see the module docstring for the order) and prepare it.

    Raises FailedPrecondition, with how to install one, when there is none."""
    environ = os.environ if environ is None else environ
    configured = environ.get(ENV_TRITONSERVER, "").strip()
    if configured:
        path = Path(configured).expanduser()
        binary = path / "bin" / "tritonserver" if path.is_dir() else path
        if not binary.is_file():
            raise FailedPrecondition(
                f"`{ENV_TRITONSERVER}` is {configured!r}, but no tritonserver binary is there "
                f"(looked for {binary}): point it at the binary or at an install root holding bin/tritonserver, "
                f"or unset it to use the one bundled in nvidia-pytriton; otherwise {INSTALL_ADVICE}")
        if not os.access(binary, os.X_OK):
            raise FailedPrecondition(f"`{ENV_TRITONSERVER}`: {binary} is not executable: chmod +x it")
        return _native_install(binary, "env")
    on_path = shutil.which("tritonserver", path=environ.get("PATH"))
    if on_path:
        return _native_install(Path(on_path), "path")
    if (DEFAULT_INSTALL_ROOT / "bin" / "tritonserver").is_file():
        return _native_install(DEFAULT_INSTALL_ROOT / "bin" / "tritonserver", "opt")
    root = _pytriton_root()
    if root is not None:
        return _pytriton_install(root)
    raise FailedPrecondition(f"no tritonserver found: {INSTALL_ADVICE}")


# --------------------------------------------------------------------------------------------------
# The server process


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


# --------------------------------------------------------------------------------------------------
# Model control


def to_persona_error(exc: Exception, what: str) -> PersonaError:
    """Map a tritonclient InferenceServerException to the persona error a client should see."""
    status = str(getattr(exc, "status", lambda: None)() or "")
    message = getattr(exc, "message", lambda: str(exc))()
    text = f"{what}: {message}"
    if "UNAVAILABLE" in status:
        return Unavailable(f"{what}: Triton is not reachable ({message})")
    if "DEADLINE_EXCEEDED" in status:
        return DeadlineExceeded(text)
    if "NOT_FOUND" in status:
        return NotFound(text)
    if "INVALID_ARGUMENT" in status and "failed to load" not in message and "load failed" not in message:
        return InvalidArgument(text)
    return FailedPrecondition(text)


def _model_states(client, name: str, timeout_s: float) -> list[tuple[str, str, str]]:
    """(version, state, reason) of `name` in the repository index."""
    index = client.get_model_repository_index(as_json=True, client_timeout=timeout_s)
    return [(m.get("version", ""), m.get("state", ""), m.get("reason", ""))
            for m in index.get("models", []) if m.get("name") == name]


def _poll_failure(client, name: str, what: str, err: PersonaError) -> PersonaError:
    """Triton says only "failed to poll from model repository" both for a missing folder and for a bad one."""
    from tritonclient.utils import InferenceServerException

    try:
        known = bool(_model_states(client, name, 5.0))
    except InferenceServerException:
        return err
    if not known:
        return NotFound(f"{what}: no folder `{name}` in the model repository: create <repository>/{name}/"
                        "config.pbtxt and <repository>/{name}/<version>/model.py")
    return FailedPrecondition(f"{err.message.rstrip()} (`{name}/config.pbtxt` or its folder is invalid; "
                              "the tritonserver log says why)")


def load_model(client, name: str, *, timeout_s: float = 120.0, config: str | None = None,
               files: Mapping[str, bytes] | None = None) -> float:
    """Load (or reload: new versions, changed config) `name` and wait until it is ready.

    `config` (JSON text) and `files` (`"file:1/model.py"` → bytes) are passed to Triton's load API
    for models uploaded without a repository folder. Returns the seconds it took. Raises Unavailable
    when Triton is down, DeadlineExceeded when the load outlasts `timeout_s`, FailedPrecondition
    (InvalidArgument for a bad request) carrying Triton's message when the model fails to load."""
    from tritonclient.utils import InferenceServerException

    started = time.monotonic()
    deadline = started + timeout_s
    what = f"loading Triton model `{name}`"
    try:
        client.load_model(name, config=config, files=dict(files) if files else None, client_timeout=timeout_s)
    except InferenceServerException as e:
        err = to_persona_error(e, what)
        if "failed to poll from model repository" in err.message and not isinstance(err, Unavailable):
            err = _poll_failure(client, name, what, err)
        if not isinstance(err, DeadlineExceeded):
            raise err from e
    # The load RPC returns when Triton has finished; poll anyway, in case the deadline cut it short.
    while True:
        remaining = max(0.1, deadline - time.monotonic())
        try:
            if client.is_model_ready(name, client_timeout=min(5.0, remaining)):
                return time.monotonic() - started
            states = _model_states(client, name, min(5.0, remaining))
        except InferenceServerException as e:
            raise to_persona_error(e, what) from e
        if states and all(s not in ("LOADING", "READY", "UNLOADING") for _, s, _ in states):
            reasons = "; ".join(f"version {v or '?'}: {s} {r}".strip() for v, s, r in states)
            raise FailedPrecondition(f"{what}: {reasons}")
        if time.monotonic() > deadline:
            raise DeadlineExceeded(
                f"{what}: not ready after {timeout_s:g} s (states: {states}); Triton cannot cancel a load: if the "
                "model's initialize() is stuck, restart the server, else retry with a longer timeout")
        time.sleep(0.1)


def unload_model(client, name: str, *, timeout_s: float = 30.0, unload_dependents: bool = False,
                 wait: bool = True) -> float:
    """Unload `name`; with `wait`, until no version is READY or UNLOADING (Triton answers the RPC at
    once but keeps the model UNLOADING for a few seconds). Returns the seconds it took."""
    from tritonclient.utils import InferenceServerException

    started = time.monotonic()
    deadline = started + timeout_s
    what = f"unloading Triton model `{name}`"
    try:
        client.unload_model(name, unload_dependents=unload_dependents, client_timeout=timeout_s)
        while wait:
            remaining = max(0.1, deadline - time.monotonic())
            states = _model_states(client, name, min(5.0, remaining))
            if all(s not in ("READY", "UNLOADING", "LOADING") for _, s, _ in states):
                break
            if time.monotonic() > deadline:
                raise DeadlineExceeded(f"{what}: still {states} after {timeout_s:.0f} s")
            time.sleep(0.1)
    except InferenceServerException as e:
        raise to_persona_error(e, what) from e
    return time.monotonic() - started
