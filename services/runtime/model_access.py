"""Which models a request may name: any local folder (the embedded CLI, a user on their own files), or only the
operator's allow-list (a server other people call), so a remote caller can neither read server paths (another
tenant's concept folder) nor probe the file system through error messages.

The allow-list: the built-in `tiny`; folders under the models root, by name (`sd15`, or `owner/name`); hub ids
found in the local Hugging Face cache (only those in `allowed` when it is set); and whatever `allowed` names
exactly (hub ids or folders the operator chose). Anything else gets one message, whatever exists on disk.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from .errors import FailedPrecondition, InvalidArgument

BUILTIN = ("tiny",)
# A folder name under the models root, or a hub id: one or two plain components (no "..", no leading "/" or "~").
NAME = re.compile(r"^[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?$")


@dataclass(frozen=True)
class ModelAccess:
    # True: a request may name any local folder or hub id (embedded CLI, `persona-cli up`). False: the allow-list
    # (`persona-cli serve`, PERSONA_MODEL_PATHS=0).
    paths: bool = True
    # Folders of models the operator offers, named relative to it (PERSONA_MODELS_ROOT).
    root: Path | None = None
    # Exact references the operator allows (PERSONA_ALLOWED_MODELS); when set, the only hub ids accepted.
    allowed: tuple[str, ...] = ()

    def locate(self, ref: str, field: str) -> str:
        """What to resolve for a request's model reference `ref`: `ref` itself when paths are allowed, else the
        allow-listed folder it names (or `ref` for `tiny`). Raises InvalidArgument (one message for every refused
        reference) or FailedPrecondition (an allowed hub id missing from the cache)."""
        ref = (ref or "").strip()
        if self.paths or not ref or ref in BUILTIN:
            return ref
        if ref in self.allowed and not NAME.match(ref):
            return ref  # a folder the operator named exactly
        if NAME.match(ref):
            if self.root is not None and (Path(self.root) / ref).is_dir():
                return str(Path(self.root) / ref)
            if "/" in ref and (not self.allowed or ref in self.allowed):
                return _cached_snapshot(ref, field)
        raise InvalidArgument(
            f"`{field}` is not a model this server offers: use tiny, a hub id in its model cache, or the name of a "
            "folder under its models root (the operator's list: PERSONA_MODELS_ROOT, PERSONA_ALLOWED_MODELS); a "
            "server does not open paths a request names")


def _cached_snapshot(repo_id: str, field: str) -> str:
    """The local Hugging Face cache's folder of `repo_id` (never downloaded here)."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    try:
        return snapshot_download(repo_id, local_files_only=True)
    except (LocalEntryNotFoundError, ValueError):
        raise FailedPrecondition(f"`{field}` {repo_id!r} is not in this server's Hugging Face cache: ask its operator "
                                 f"to `hf download {repo_id}` into the cache (HF_HOME) the server reads") from None
