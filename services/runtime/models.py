"""Where a model's files are: a local folder or a hub id in the local Hugging Face cache; the one offline rule of the project.

A model reference is either
- a local folder (as `save_pretrained` writes one), checked for the files its loader needs, or
- a Hugging Face hub id (`owner/name`), taken from the local Hugging Face cache (HF_HOME / HF_HUB_CACHE).

The offline rule: nothing is downloaded unless the caller allows it (`download=True`, e.g. a setting of its
service) *and* HF_HUB_OFFLINE is not set; HF_HUB_OFFLINE is read at each call, not once at import as
huggingface_hub does, so a test or a server can switch it per process without reimporting anything.
A hub id missing from the cache is a FailedPrecondition saying to `hf download` it; a bad reference or an
incomplete folder is an InvalidArgument naming the request field.

What a usable folder holds differs by kind (a transformers model, a diffusers pipeline), so callers pass
their own file checks and download patterns; the defaults fit a transformers model.
huggingface_hub is imported only when a hub id is resolved, so checking a folder stays cheap.
"""
from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Callable, Sequence

from .errors import FailedPrecondition, InvalidArgument

# owner/name, as the hub spells repository ids; anything else is taken for a (missing) local path.
HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*$")
# What a transformers model needs from the hub: configs, tokenizer/processor files, safetensors weights
# (repos also carry pickled, TF, Flax and ONNX copies of the same weights).
TRANSFORMERS_PATTERNS = ("*.json", "*.txt", "model*.safetensors")
# Older repos (facebook/dino-vits16) ship only a pickled checkpoint: fetched only when no weights came.
BIN_FALLBACK_PATTERNS = ("pytorch_model*.bin",)
# Any one of these is a transformers model's weights (sharded checkpoints have the index).
TRANSFORMERS_WEIGHTS = ("model.safetensors", "model.safetensors.index.json",
                        "pytorch_model.bin", "pytorch_model.bin.index.json")

_TRANSFORMERS_FIX = "pass a folder saved with `model.save_pretrained(...)` and `processor.save_pretrained(...)`"


# Longest model reference accepted, and longest name of one of its path parts (what file systems allow).
MAX_REFERENCE_CHARS = 1024
MAX_NAME_CHARS = 255


def check_path_reference(ref: str, field: str) -> None:
    """Refuses a model reference no file system could hold (InvalidArgument naming `field`), before it is used as a
    path: a part over 255 characters would be an OSError deep inside a loader."""
    from .limits import quoted

    if len(ref) > MAX_REFERENCE_CHARS or "\0" in ref:
        raise InvalidArgument(f"`{field}` {quoted(ref)} is {len(ref)} characters; at most {MAX_REFERENCE_CHARS}, "
                              "without NUL: pass a folder, file or hub id")
    longest = max((len(part) for part in ref.split("/")), default=0)
    if longest > MAX_NAME_CHARS:
        raise InvalidArgument(f"`{field}` {quoted(ref)} has a name of {longest} characters; at most {MAX_NAME_CHARS} "
                              "per path part: pass a folder, file or hub id")


def hub_offline() -> bool:
    """Whether HF_HUB_OFFLINE forbids downloads now (1/ON/YES/TRUE, any case)."""
    # Read the environment at call time: huggingface_hub reads HF_HUB_OFFLINE once, at import.
    return os.environ.get("HF_HUB_OFFLINE", "").strip().upper() in {"1", "ON", "YES", "TRUE"}


def missing_files(folder: Path, required: Sequence[Sequence[str]] = ()) -> list[str]:
    """What a transformers model `folder` lacks: config.json, weights, and one file of each group in `required`.

    Each missing group is named by its alternatives, e.g. "preprocessor_config.json or processor_config.json".
    """
    groups = [("config.json",), TRANSFORMERS_WEIGHTS, *required]
    return [" or ".join(g) for g in groups if not any(os.path.exists(Path(folder) / name) for name in g)]


def resolve_model_folder(ref: str | Path, field: str, *, required: Sequence[Sequence[str]] = (),
                         model_type: str | None = None,
                         allow_patterns: Sequence[str] = TRANSFORMERS_PATTERNS,
                         fallback_patterns: Sequence[str] = BIN_FALLBACK_PATTERNS,
                         download: bool = False,
                         missing: Callable[[Path], Sequence[str]] | None = None,
                         kind: str = "transformers model",
                         fix: str = _TRANSFORMERS_FIX) -> Path:
    """The local folder holding model `ref` (a folder, or a hub id found in the Hugging Face cache).

    field: the request field `ref` came from, named in every error.
    required: file groups the folder needs beside config.json and weights (one file of each group).
    model_type: when set, config.json's `model_type` must equal it ("clipseg", "sam", ...).
    allow_patterns: what to take from a hub snapshot; fallback_patterns: fetched in a second pass when the
      first brought no transformers weights (only when downloading; empty: no second pass).
    download: may a hub id missing from the cache be fetched (HF_HUB_OFFLINE=1 forbids it anyway).
    missing: replaces the file check (config.json, weights, `required`): folder -> what it lacks, e.g. the
      components of a diffusers pipeline.
    kind, fix: how errors name such a folder ("a local {kind} folder") and what to do about an incomplete one.
    """
    ref = str(ref or "").strip()
    check = missing or (lambda folder: missing_files(folder, required))
    if not ref:
        raise InvalidArgument(f"`{field}` is empty: pass a local {kind} folder or a hub id like owner/name")
    check_path_reference(ref, field)
    local = Path(ref).expanduser()
    if local.is_dir():
        folder = local.resolve()
        lacking = check(folder)
        if lacking:
            raise InvalidArgument(f"`{field}` {ref!r} is not a {kind} folder: missing {', '.join(lacking)}; {fix}")
    elif local.exists():
        raise InvalidArgument(f"`{field}` {ref!r} is a file, not a folder: pass the model's folder")
    elif HUB_ID.match(ref):
        folder = _from_hub_cache(ref, field, check, allow_patterns, fallback_patterns, download, kind)
    else:
        raise InvalidArgument(f"`{field}` {ref!r} is neither an existing folder nor a hub id like owner/name: "
                              "check the path")
    if model_type is not None:
        found = read_model_type(folder)
        if found != model_type:
            raise InvalidArgument(f"`{field}` {ref!r} is a {found or 'unknown'} model, not {model_type}: pass a "
                                  f"{model_type} checkpoint")
    return folder


def read_model_type(folder: Path) -> str:
    """config.json's `model_type` in `folder`; "" when there is none or the file is unreadable."""
    try:
        return str(json.loads((Path(folder) / "config.json").read_text()).get("model_type", ""))
    except (OSError, json.JSONDecodeError, AttributeError):
        return ""


def _from_hub_cache(repo_id: str, field: str, check: Callable[[Path], Sequence[str]],
                    allow_patterns: Sequence[str], fallback_patterns: Sequence[str], download: bool,
                    kind: str) -> Path:
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    how = (f"download it on a machine with hub access (`hf download {repo_id}`, or `huggingface-cli download "
           f"{repo_id}` with huggingface_hub < 1.0) into the Hugging Face cache (HF_HOME) this server reads, "
           f"or pass a local {kind} folder as `{field}`")
    local_only = not (download and not hub_offline())
    try:
        folder = Path(snapshot_download(repo_id, local_files_only=local_only, allow_patterns=list(allow_patterns)))
        if not local_only and fallback_patterns and \
                not any((folder / w).exists() for w in TRANSFORMERS_WEIGHTS):
            folder = Path(snapshot_download(repo_id, allow_patterns=list(fallback_patterns)))
    except LocalEntryNotFoundError:
        raise FailedPrecondition(f"`{field}` {repo_id!r} is not in the local Hugging Face cache: {how}") from None
    except Exception as e:  # network errors, unknown or gated repos when downloads are allowed
        raise FailedPrecondition(f"`{field}` {repo_id!r} could not be fetched ({e}): {how}") from None
    lacking = check(folder)
    if lacking:
        # A cached snapshot can be partial, e.g. after `hf download <id> config.json`.
        raise FailedPrecondition(f"`{field}` {repo_id!r} is only partly in the local Hugging Face cache "
                                 f"(missing {', '.join(lacking)}): {how}")
    return folder
