"""Settings of the mask service: which models make masks, env PERSONA_MASK_*."""
from __future__ import annotations

from dataclasses import dataclass

from persona.services.runtime.settings import env_text


@dataclass(frozen=True)
class MaskSettings:
    # CLIP vision model whose patch features point masks compare (PERSONA_MASK_CLIP_MODEL): hub id or folder.
    # P3S uses CLIP ViT-L/14.
    clip_model: str = "openai/clip-vit-large-patch14"
    # CLIPSeg model for text masks with method CLIPSEG (PERSONA_MASK_CLIPSEG_MODEL).
    clipseg_model: str = "CIDAS/clipseg-rd64-refined"
    # GroundingDINO detector and SAM segmenter for text masks with method GROUNDED_SAM
    # (PERSONA_MASK_DETECTOR_MODEL, PERSONA_MASK_SEGMENTER_MODEL).
    detector_model: str = "IDEA-Research/grounding-dino-tiny"
    segmenter_model: str = "facebook/sam-vit-base"
    # Where the mask models run (PERSONA_MASK_DEVICE); None: cuda when available, else cpu.
    device: str | None = None

    @classmethod
    def from_env(cls) -> "MaskSettings":
        return cls(clip_model=env_text("PERSONA_MASK_CLIP_MODEL", cls.clip_model),
                   clipseg_model=env_text("PERSONA_MASK_CLIPSEG_MODEL", cls.clipseg_model),
                   detector_model=env_text("PERSONA_MASK_DETECTOR_MODEL", cls.detector_model),
                   segmenter_model=env_text("PERSONA_MASK_SEGMENTER_MODEL", cls.segmenter_model),
                   device=env_text("PERSONA_MASK_DEVICE"))
