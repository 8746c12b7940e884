"""Settings of the generate service, env PERSONA_GENERATE_*."""
from __future__ import annotations

import os
from dataclasses import dataclass

from persona.services.runtime.settings import env_int


@dataclass(frozen=True)
class GenerateSettings:
    # Where the embedded engine runs (PERSONA_GENERATE_DEVICE); None: cuda when available (fp16), else cpu.
    device: str | None = None
    # Models the embedded engine keeps loaded, least recently used dropped first (PERSONA_GENERATE_MAX_LOADED).
    max_loaded: int = 2

    @classmethod
    def from_env(cls) -> "GenerateSettings":
        return cls(device=os.environ.get("PERSONA_GENERATE_DEVICE", "").strip() or None,
                   max_loaded=max(1, env_int("PERSONA_GENERATE_MAX_LOADED", 2)))
