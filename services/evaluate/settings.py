"""Settings of the evaluate service: the models that measure, env PERSONA_EVAL_*."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from persona.services.runtime.settings import env_text

from .metrics import DEFAULT_CLIP_MODEL, DEFAULT_DINO_MODEL


@dataclass(frozen=True)
class EvaluateSettings:
    # Where the concept's torch model is copied out for attention maps (set by the composition root).
    work_dir: Path
    # CLIP for CLIP-I, CLIP-T and SID's SA/NSD/TA (PERSONA_EVAL_CLIP_MODEL): DreamBench's ViT-B/32 by default.
    clip_model: str = DEFAULT_CLIP_MODEL
    # DINO for DINO, DINO-v, R-DI/E-DI (PERSONA_EVAL_DINO_MODEL): DreamBench's ViT-S/16 by default.
    dino_model: str = DEFAULT_DINO_MODEL
    # Where the measuring models and the attention pass run (PERSONA_EVAL_DEVICE); None: cuda when available.
    device: str | None = None

    @classmethod
    def from_env(cls, work_dir: Path) -> "EvaluateSettings":
        return cls(work_dir=work_dir, clip_model=env_text("PERSONA_EVAL_CLIP_MODEL", DEFAULT_CLIP_MODEL),
                   dino_model=env_text("PERSONA_EVAL_DINO_MODEL", DEFAULT_DINO_MODEL),
                   device=env_text("PERSONA_EVAL_DEVICE"))
