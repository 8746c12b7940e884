"""A pytriton install in a read-only site-packages: its backends are copied once into persona's cache folder (under
the data dir), never into the user's ~/.cache."""
from __future__ import annotations

import errno
import sys

from persona.services.generate import triton_install
from persona.services.runtime.caches import persona_cache_dir


def test_read_only_backends_are_copied_under_personas_cache(tmp_path, monkeypatch):
    root = tmp_path / "site-packages" / "pytriton" / "tritonserver"
    (root / "backends" / "python").mkdir(parents=True)
    (root / "backends" / "python" / "libtriton_python.so").write_bytes(b"\x7fELF")
    version = f"{sys.version_info.major}.{sys.version_info.minor}"
    (root / "python_backend_stubs" / version).mkdir(parents=True)
    (root / "python_backend_stubs" / version / "triton_python_backend_stub").write_bytes(b"stub")
    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.setenv("XDG_CACHE_HOME", str(home / ".cache"))
    monkeypatch.setenv("PERSONA_HOME", str(tmp_path / "data"))  # the cache folder when no server chose one

    real = triton_install.prepare_python_stub

    def read_only_site_packages(backends, stubs, version=None):
        if backends == root / "backends":  # root may write anywhere: say what a read-only mount would
            raise PermissionError(errno.EROFS, "Read-only file system", str(backends))
        return real(backends, stubs, version)

    monkeypatch.setattr(triton_install, "prepare_python_stub", read_only_site_packages)
    install = triton_install._pytriton_install(root)

    assert install.backend_dir.is_relative_to(persona_cache_dir() / "tritonserver")
    assert (install.backend_dir / "python" / "libtriton_python.so").read_bytes() == b"\x7fELF"
    assert (install.backend_dir / "python" / "triton_python_backend_stub").read_bytes() == b"stub"
    assert list(home.iterdir()) == []
