"""Where the libraries persona runs keep their caches: under the data dir (<data dir>/cache, or PERSONA_CACHE_DIR),
not in the user's home or $TMPDIR, so a data dir holds everything persona writes.

- torch.compile's inductor and Triton kernel caches: TORCHINDUCTOR_CACHE_DIR and TRITON_CACHE_DIR, set here unless
  the operator set them;
- the private copy of Triton's backends made when site-packages is read-only (generate.triton_server asks
  `persona_cache_dir`);
- onnxruntime writes a telemetry device id and database under $XDG_CACHE_HOME (~/.cache) and a session file in
  $TMPDIR when it is first imported (diffusers imports it on every pipeline load): a meta path finder runs that
  import with both pointed at the cache (only for that import: the Hugging Face cache, which also follows
  XDG_CACHE_HOME, stays where the user keeps it).
"""
from __future__ import annotations

import contextlib
import importlib.abc
import importlib.machinery
import os
import sys
import threading
from pathlib import Path
from typing import Iterator

_lock = threading.Lock()
_root: Path | None = None


def cache_dir(data_dir: Path) -> Path:
    """PERSONA_CACHE_DIR, else <data dir>/cache."""
    configured = os.environ.get("PERSONA_CACHE_DIR", "").strip()
    return Path(configured).expanduser() if configured else Path(data_dir) / "cache"


def persona_cache_dir() -> Path:
    """This process's cache folder: the one keep_caches_in chose, else cache_dir of the default data dir
    (PERSONA_HOME)."""
    if _root is not None:
        return _root
    from .settings import default_home

    return cache_dir(default_home())


def keep_caches_in(data_dir: Path) -> Path:
    """Points this process's library caches at cache_dir(data_dir) (the first data dir of a process wins: the
    variables are process-wide); returns that folder."""
    global _root
    with _lock:
        if _root is None:
            _root = cache_dir(data_dir)
            os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", str(_root / "torchinductor"))
            os.environ.setdefault("TRITON_CACHE_DIR", str(_root / "triton"))
            sys.meta_path.insert(0, _OnnxruntimeFinder())
        return _root


class _OnnxruntimeFinder(importlib.abc.MetaPathFinder):
    """Finds onnxruntime as the path finder does, with a loader that runs its first import inside the cache folder
    (diffusers imports it from every pipeline load, so it cannot be imported through a helper of ours)."""

    def find_spec(self, name, path, target=None):
        if name != "onnxruntime" or _root is None:
            return None
        spec = importlib.machinery.PathFinder.find_spec(name, path)
        if spec is not None and spec.loader is not None:
            spec.loader = _CachedHereLoader(spec.loader, _root / "onnxruntime")
        return spec


class _CachedHereLoader(importlib.abc.Loader):
    def __init__(self, loader, folder: Path):
        self.loader, self.folder = loader, folder

    def create_module(self, spec):
        return self.loader.create_module(spec)

    def exec_module(self, module) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        with _environment(XDG_CACHE_HOME=str(self.folder), TMPDIR=str(self.folder)):
            self.loader.exec_module(module)


@contextlib.contextmanager
def _environment(**values: str) -> Iterator[None]:
    saved = {name: os.environ.get(name) for name in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
