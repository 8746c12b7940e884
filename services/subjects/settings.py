"""Limits of subject uploads, env PERSONA_*."""
from __future__ import annotations

from dataclasses import dataclass

from persona.services.runtime.settings import env_float, env_int


@dataclass(frozen=True)
class SubjectSettings:
    # Most photos one subject may have (PERSONA_MAX_IMAGES_PER_SUBJECT); 3–7 work best.
    max_images: int = 20
    # Largest encoded photo, bytes (PERSONA_MAX_IMAGE_BYTES).
    max_image_bytes: int = 20 * 1024 * 1024
    # Largest decoded photo, pixels (PERSONA_MAX_IMAGE_PIXELS): guards against decompression bombs.
    max_image_pixels: int = 64_000_000
    # Pixels of all the photos of one upload together (PERSONA_MAX_UPLOAD_PIXELS): 20 phone photos of 12 MP fit.
    max_request_pixels: int = 256_000_000
    # Pixels this process decodes at once, over every upload in flight (PERSONA_DECODE_BUDGET_PIXELS; ~3 bytes
    # each): an upload waits up to `decode_wait_s` (PERSONA_DECODE_WAIT_S) for its turn, then RESOURCE_EXHAUSTED.
    decode_budget_pixels: int = 128_000_000
    decode_wait_s: float = 30.0
    # Smallest accepted side, pixels (PERSONA_MIN_IMAGE_SIDE).
    min_image_side: int = 32

    @classmethod
    def from_env(cls) -> "SubjectSettings":
        return cls(
            max_images=env_int("PERSONA_MAX_IMAGES_PER_SUBJECT", cls.max_images),
            max_image_bytes=env_int("PERSONA_MAX_IMAGE_BYTES", cls.max_image_bytes),
            max_image_pixels=env_int("PERSONA_MAX_IMAGE_PIXELS", cls.max_image_pixels),
            min_image_side=env_int("PERSONA_MIN_IMAGE_SIDE", cls.min_image_side),
            max_request_pixels=env_int("PERSONA_MAX_UPLOAD_PIXELS", cls.max_request_pixels),
            decode_budget_pixels=env_int("PERSONA_DECODE_BUDGET_PIXELS", cls.decode_budget_pixels),
            decode_wait_s=env_float("PERSONA_DECODE_WAIT_S", cls.decode_wait_s),
        )
