"""`persona-cli bench flow`: what the photos → concept run needs to know beyond the SDK."""
from __future__ import annotations

from persona.services.caption.settings import CaptionSettings


def caption_case(remote: bool) -> int:
    """SID Case 3 when a VLM writes the captions (a remote deployment is assumed to have one; embedded, when
    PERSONA_VLM_BASE_URL is set), else the Case 1 template, which needs none."""
    return 3 if (remote or CaptionSettings.from_env().vlm_base_url) else 1
