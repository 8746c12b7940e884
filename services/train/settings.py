"""Settings of the train service: where base models are kept and how they are found, env PERSONA_*."""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

from persona.services.runtime.settings import default_home


DEFAULT_BASE_MODEL = "stable-diffusion-v1-5/stable-diffusion-v1-5"


def _default_model_cache() -> Path:
    return default_home() / "models"


@dataclass(frozen=True)
class TrainSettings:
    # Folder holding built-in base models such as `tiny` (PERSONA_MODEL_CACHE, default
    # <PERSONA_HOME>/models). Hub models stay in the Hugging Face cache (HF_HOME), not here.
    base_model_cache_dir: Path = field(default_factory=_default_model_cache)
    # Let a hub id that is not in the local Hugging Face cache be downloaded
    # (PERSONA_TRAIN_DOWNLOAD_BASE_MODELS=1). Off by default: a server should not pull gigabytes
    # during a request; HF_HUB_OFFLINE=1 forbids it regardless.
    download_base_models: bool = False
    # Base model when a request names none (PERSONA_BASE_MODEL).
    default_base_model: str = DEFAULT_BASE_MODEL
    # Training device, e.g. "cuda:1" or "cpu" (PERSONA_TRAIN_DEVICE); None: cuda when available, else cpu.
    device: str | None = None

    @classmethod
    def from_env(cls) -> "TrainSettings":
        cache = os.environ.get("PERSONA_MODEL_CACHE")
        return cls(
            base_model_cache_dir=Path(cache) if cache else _default_model_cache(),
            download_base_models=os.environ.get("PERSONA_TRAIN_DOWNLOAD_BASE_MODELS", "") in ("1", "true", "yes"),
            default_base_model=os.environ.get("PERSONA_BASE_MODEL", "").strip() or DEFAULT_BASE_MODEL,
            device=os.environ.get("PERSONA_TRAIN_DEVICE", "").strip() or None,
        )
