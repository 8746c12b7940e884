"""The vision-language model behind SID captions: any OpenAI-protocol chat endpoint with image input.

`OpenAIVlm` owns the connection (the official `openai` client: timeouts, retries with backoff) and
maps its failures to persona errors; `caption_image` holds one image's conversation: ask, check,
correct, up to `max_attempts` calls.
"""
from __future__ import annotations

import base64
import io
import socket
import threading
from dataclasses import dataclass
from typing import TYPE_CHECKING
from urllib.parse import urlsplit
from urllib.request import getproxies, proxy_bypass

from PIL import Image

from persona.services.runtime.errors import (FailedPrecondition, InvalidSetting, PersonaError, ResourceExhausted,
                                             Unavailable)

from . import checker, instructions
from .settings import CaptionSettings

if TYPE_CHECKING:
    import openai

PREFLIGHT_TIMEOUT_S = 2.0  # StartCaptioning answers at once; a slower endpoint still fails in the job


def image_data_url(data: bytes, max_side: int) -> str:
    """The image as a base64 data URL, downscaled so its longest side is at most `max_side`.

    JPEG and PNG within the limit are sent as stored; anything else is re-encoded (PNG when it has
    transparency, else JPEG), since not every VLM server reads WebP.
    """
    image = Image.open(io.BytesIO(data))
    if image.format in ("JPEG", "PNG") and max(image.size) <= max_side:
        kind = image.format.lower()
    else:
        image.thumbnail((max_side, max_side))
        alpha = image.mode in ("RGBA", "LA") or "transparency" in image.info
        kind = "png" if alpha else "jpeg"
        buffer = io.BytesIO()
        if alpha:
            image.save(buffer, "PNG")
        else:
            image.convert("RGB").save(buffer, "JPEG", quality=90)
        data = buffer.getvalue()
    return f"data:image/{kind};base64,{base64.b64encode(data).decode('ascii')}"


class OpenAIVlm:
    """One OpenAI-protocol endpoint (PERSONA_VLM_BASE_URL, _MODEL, _API_KEY); thread-safe."""

    def __init__(self, settings: CaptionSettings):
        self.settings = settings
        self.base_url = settings.vlm_base_url.rstrip("/")
        self.model = settings.vlm_model
        self._client = None
        self._client_lock = threading.Lock()

    def client(self):
        """The openai client, built on first use and shared by the pool threads (importing openai takes ~0.4 s,
        which a server that never captions with a VLM, or a quick CLI command, should not pay)."""
        with self._client_lock:
            if self._client is None:
                import openai

                self._client = openai.OpenAI(
                    base_url=self.base_url,
                    api_key=self.settings.vlm_api_key or "unset",  # local servers ignore it; the client refuses ""
                    timeout=self.settings.timeout_s,
                    max_retries=self.settings.network_retries,
                )
            return self._client

    def require_configured(self) -> None:
        """FailedPrecondition naming the variables to set when no usable endpoint or model is configured."""
        if not self.base_url:
            raise FailedPrecondition(
                "Cases 2–4 need a vision-language model and none is configured: set PERSONA_VLM_BASE_URL "
                "(e.g. https://api.openai.com/v1 or http://localhost:11434/v1), PERSONA_VLM_MODEL (e.g. gpt-4o) "
                "and PERSONA_VLM_API_KEY on the server, or use Case 1 (DESCRIPTION_CASE_1, `--case 1`), which needs none")
        parts = urlsplit(self.base_url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise InvalidSetting(f"PERSONA_VLM_BASE_URL {self.base_url!r} is not an http(s) URL: set it to "
                                 "e.g. http://localhost:11434/v1")
        if not self.model:
            raise InvalidSetting(f"PERSONA_VLM_MODEL is empty: set it to a model of {self.base_url} that "
                                 "accepts images, e.g. gpt-4o or llava")
        problem = unsendable_key(self.settings.vlm_api_key)
        if problem:
            raise InvalidSetting(f"PERSONA_VLM_API_KEY {problem}, which an HTTP header cannot carry: set it to "
                                 "your real key, not a placeholder such as the README's (local servers accept any "
                                 "ASCII value, e.g. none)")

    def preflight(self) -> None:
        """Opens and closes a TCP connection to the endpoint, so an endpoint that is down fails the RPC.

        Skipped behind an HTTP proxy (HTTPS_PROXY, …), which the client goes through and we cannot
        probe cheaply; the job then reports an unreachable endpoint.
        """
        parts = urlsplit(self.base_url)
        port = parts.port or (443 if parts.scheme == "https" else 80)
        if parts.scheme in getproxies() and not proxy_bypass(parts.hostname):
            return
        try:
            with socket.create_connection((parts.hostname, port), timeout=PREFLIGHT_TIMEOUT_S):
                pass
        except OSError as e:
            raise Unavailable(self._unreachable(e)) from None

    def complete(self, messages: list[dict]) -> str:
        """One chat completion; the answer's text ('' when the model sent none)."""
        self.require_configured()
        import openai

        try:
            response = self.client().chat.completions.create(model=self.model, messages=messages)
        except openai.OpenAIError as e:
            raise self._persona_error(e) from e
        if not response.choices:
            return ""
        return response.choices[0].message.content or ""

    def _unreachable(self, cause: object) -> str:
        return (f"the VLM endpoint {self.base_url} cannot be reached ({cause}): start it, or fix "
                "PERSONA_VLM_BASE_URL")

    def _persona_error(self, e: openai.OpenAIError) -> PersonaError:
        import openai

        if isinstance(e, openai.APITimeoutError):
            return Unavailable(f"the VLM endpoint {self.base_url} did not answer within "
                               f"{self.settings.timeout_s:g} s: check it, or raise PERSONA_VLM_TIMEOUT_S")
        if isinstance(e, openai.APIConnectionError):
            return Unavailable(self._unreachable(e.__cause__ or e))
        if isinstance(e, (openai.AuthenticationError, openai.PermissionDeniedError)):
            return FailedPrecondition(f"the VLM endpoint {self.base_url} refused the API key ({_detail(e)}): "
                                      "set PERSONA_VLM_API_KEY to a valid key")
        if isinstance(e, openai.NotFoundError):
            return FailedPrecondition(f"the VLM endpoint {self.base_url} has no model {self.model!r} "
                                      f"({_detail(e)}): set PERSONA_VLM_MODEL to one it serves")
        if isinstance(e, openai.RateLimitError):
            return ResourceExhausted(f"the VLM endpoint {self.base_url} is rate-limiting ({_detail(e)}): "
                                     "retry later, or lower PERSONA_VLM_CONCURRENCY")
        if isinstance(e, openai.BadRequestError):
            return FailedPrecondition(f"the VLM endpoint {self.base_url} rejected the request ({_detail(e)}): "
                                      f"model {self.model!r} may not accept images; set PERSONA_VLM_MODEL to a "
                                      "vision model")
        if isinstance(e, openai.APIStatusError):
            return Unavailable(f"the VLM endpoint {self.base_url} failed with HTTP {e.status_code} "
                               f"({_detail(e)}): check its logs")
        return Unavailable(f"the VLM endpoint {self.base_url} sent an answer persona cannot read ({e})")


def unsendable_key(key: str) -> str:
    """Why `key` cannot go in an `Authorization: Bearer` header ('' when it can): HTTP clients send headers as
    ASCII, so a pasted placeholder (`sk-…`), a curly quote or a space would fail every call. Names the character
    and its position, never the key."""
    for position, char in enumerate(key, 1):
        if not "!" <= char <= "~":  # printable ASCII without space
            shown = repr(char) if char.isprintable() and not char.isspace() else "a space or control character"
            return f"holds {shown} (U+{ord(char):04X}) at character {position}"
    return ""


def _detail(e: openai.OpenAIError) -> str:
    return (getattr(e, "message", "") or str(e))[:200]  # the client's message names the HTTP status


@dataclass(frozen=True)
class Outcome:
    """What one image's conversation produced: a compliant caption, or why none."""

    text: str
    attempts: int
    failure: str = ""
    warnings: tuple[str, ...] = ()


def caption_image(vlm: OpenAIVlm, image: bytes, case: int, mode: str, class_name: str, token: str,
                  settings: CaptionSettings) -> Outcome:
    """Asks the VLM to describe one image; a non-compliant answer is corrected in the same conversation.

    Raises the persona error of an endpoint failure (unreachable, bad key, …): those are not about
    this image, and the caller stops the job.
    """
    messages = instructions.build_messages(case, mode, class_name, image_data_url(image, settings.max_image_side))
    opening = instructions.opening(mode, class_name)
    attempts = max(1, settings.max_attempts)
    for attempt in range(1, attempts + 1):
        answer = vlm.complete(messages)
        verdict = checker.check(answer, case, mode, class_name, token, opening)
        if verdict.ok:
            return Outcome(verdict.text, attempt, warnings=verdict.warnings)
        messages = messages + instructions.correction_messages(answer, list(verdict.problems), case, mode, class_name)
    return Outcome("", attempts, failure="; ".join(verdict.problems))
