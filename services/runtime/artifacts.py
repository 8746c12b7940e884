"""Content-addressed artifact store: bytes filed under their sha256, written to a temp file and
renamed into place, so a reader never sees a half-written artifact and equal content is stored once.
"""
from __future__ import annotations

import hashlib
import os
import tempfile
from abc import ABC, abstractmethod
from pathlib import Path
from typing import Iterator

from .errors import NotFound

_CHUNK = 1 << 20
# Files whose digests are remembered per process (by path, size and mtime): weights, read once per process.
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".ckpt", ".pt", ".pth", ".msgpack", ".onnx", ".data", ".plan")
_file_digests: dict[tuple[str, int, int], str] = {}


def file_sha256(path: Path) -> str:
    """Hex sha256 of a file's content, read in chunks (weights can be larger than memory).

    A file linked into a Hugging Face cache blob is named by its sha256 already: that name is returned. Weight
    files are hashed once per process per (path, size, mtime); small files every time (cheaper than the memo)."""
    real = Path(path).resolve()
    if real.parent.name == "blobs" and len(real.name) == 64 and all(c in "0123456789abcdef" for c in real.name):
        return real.name
    stat = real.stat()
    memo_key = (str(real), stat.st_size, stat.st_mtime_ns)
    memo = real.suffix in _WEIGHT_SUFFIXES
    if memo and memo_key in _file_digests:
        return _file_digests[memo_key]
    digest = hashlib.sha256()
    with open(real, "rb") as file:
        for chunk in iter(lambda: file.read(1 << 24), b""):
            digest.update(chunk)
    if memo:
        _file_digests[memo_key] = digest.hexdigest()
    return digest.hexdigest()


class ArtifactStore(ABC):
    """Immutable blobs addressed by the sha256 of their content."""

    @abstractmethod
    def put(self, data: bytes) -> str:
        """Stores `data` (idempotently) and returns its sha256 hex digest."""

    @abstractmethod
    def put_file(self, path: Path) -> str:
        """Stores the file at `path` without reading it into memory (model weights are gigabytes)."""

    @abstractmethod
    def get(self, sha256: str) -> bytes:
        """Returns the bytes stored under `sha256`; NotFound when absent."""

    @abstractmethod
    def read_chunks(self, sha256: str) -> Iterator[tuple[int, bytes, int]]:
        """(offset, data, total size) pieces of the artifact, in order, for streaming it; NotFound (at once,
        before the first piece) when absent."""

    @abstractmethod
    def exists(self, sha256: str) -> bool:
        """Whether `sha256` is stored."""


class LocalArtifactStore(ArtifactStore):
    """Artifacts as files under `root/ab/cdef…` (first two hex digits as a fan-out folder)."""

    def __init__(self, root: Path):
        self.root = root
        root.mkdir(parents=True, exist_ok=True)

    def path_of(self, sha256: str) -> Path:
        if len(sha256) != 64 or any(c not in "0123456789abcdef" for c in sha256):
            raise NotFound(f"artifact `{sha256}` is not a sha256 hex digest")
        return self.root / sha256[:2] / sha256[2:]

    def put(self, data: bytes) -> str:
        digest = hashlib.sha256(data).hexdigest()
        target = self.path_of(digest)
        if target.exists():
            return digest
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=".tmp-")
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, target)  # atomic on POSIX: the name appears only with full content
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        return digest

    def put_file(self, path: Path) -> str:
        hasher = hashlib.sha256()
        self.root.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=self.root, prefix=".tmp-")
        try:
            with os.fdopen(fd, "wb") as out, open(path, "rb") as source:
                while chunk := source.read(_CHUNK):
                    hasher.update(chunk)
                    out.write(chunk)
                out.flush()
                os.fsync(out.fileno())
            digest = hasher.hexdigest()
            target = self.path_of(digest)
            if target.exists():
                Path(tmp).unlink()
                return digest
            target.parent.mkdir(parents=True, exist_ok=True)
            os.replace(tmp, target)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        return digest

    def read_chunks(self, sha256: str) -> Iterator[tuple[int, bytes, int]]:
        try:
            handle = open(self.path_of(sha256), "rb")
        except FileNotFoundError:
            raise NotFound(f"artifact `{sha256}` is not stored") from None

        def chunks():
            with handle:
                total = handle.seek(0, 2)
                handle.seek(0)
                offset = 0
                while data := handle.read(_CHUNK):
                    yield offset, data, total
                    offset += len(data)
        return chunks()

    def get(self, sha256: str) -> bytes:
        path = self.path_of(sha256)
        try:
            return path.read_bytes()
        except FileNotFoundError:
            raise NotFound(f"artifact `{sha256}` is not stored") from None

    def exists(self, sha256: str) -> bool:
        return self.path_of(sha256).exists()
