"""Settings of the train service: where base models are kept and how they are found, env PERSONA_*."""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

from persona.services.runtime.settings import default_home


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

    @classmethod
    def from_env(cls) -> "TrainSettings":
        cache = os.environ.get("PERSONA_MODEL_CACHE")
        return cls(
            base_model_cache_dir=Path(cache) if cache else _default_model_cache(),
            download_base_models=os.environ.get("PERSONA_TRAIN_DOWNLOAD_BASE_MODELS", "") in ("1", "true", "yes"),
        )
