"""Where a runnable `tritonserver` comes from, and what the bundled one needs before it can run.

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
"""
from __future__ import annotations

import errno
import filecmp
import os
import shutil
import sys
import sysconfig
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping

from persona.services.runtime.caches import persona_cache_dir
from persona.services.runtime.errors import FailedPrecondition

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
