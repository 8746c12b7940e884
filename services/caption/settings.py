"""Settings of the caption service: the VLM endpoint and how it is called, env PERSONA_VLM_*."""
from __future__ import annotations

import os
from dataclasses import dataclass

from persona.services.runtime.settings import env_float, env_int


@dataclass(frozen=True)
class CaptionSettings:
    # OpenAI-protocol base URL, e.g. https://api.openai.com/v1 or http://localhost:11434/v1
    # (PERSONA_VLM_BASE_URL). Empty: only Case 1 (no VLM) works.
    vlm_base_url: str = ""
    # Model with image input, e.g. gpt-4o, llava (PERSONA_VLM_MODEL).
    vlm_model: str = ""
    # API key sent as a bearer token (PERSONA_VLM_API_KEY); local servers accept any value.
    vlm_api_key: str = ""
    # Seconds one VLM call may take (PERSONA_VLM_TIMEOUT_S).
    timeout_s: float = 60.0
    # Retries of a failed call (connection errors, 429, 5xx) with exponential backoff (PERSONA_VLM_RETRIES).
    network_retries: int = 2
    # Calls per image at most, the first included, when answers fail the SID check (PERSONA_VLM_ATTEMPTS).
    max_attempts: int = 3
    # Images captioned in parallel (PERSONA_VLM_CONCURRENCY).
    concurrency: int = 4
    # Longest side of the image sent to the VLM, pixels (PERSONA_VLM_MAX_IMAGE_SIDE).
    max_image_side: int = 1024

    @classmethod
    def from_env(cls) -> "CaptionSettings":
        return cls(
            vlm_base_url=os.environ.get("PERSONA_VLM_BASE_URL", ""),
            vlm_model=os.environ.get("PERSONA_VLM_MODEL", ""),
            vlm_api_key=os.environ.get("PERSONA_VLM_API_KEY", ""),
            timeout_s=env_float("PERSONA_VLM_TIMEOUT_S", cls.timeout_s),
            network_retries=env_int("PERSONA_VLM_RETRIES", cls.network_retries),
            max_attempts=env_int("PERSONA_VLM_ATTEMPTS", cls.max_attempts),
            concurrency=env_int("PERSONA_VLM_CONCURRENCY", cls.concurrency),
            max_image_side=env_int("PERSONA_VLM_MAX_IMAGE_SIDE", cls.max_image_side),
        )
