"""Identifier cross-attention maps (SID §5): where in the image the UNet attends to the `[v]` token.

While an image is drawn with the shared sampling loop, every cross-attention layer's probabilities for the
identifier's token column(s) are kept — text-conditioned half of the CFG batch only, averaged over heads —, each
resized to the latent grid, and averaged over timesteps and layers; the result is normalised to [0, 1] and
upsampled to the image. A map concentrated on the subject means `[v]` learned the subject; one spread over the
background or a nearby object shows the entanglement SID describes.

Capture needs the attention probabilities, which the fused SDPA kernels never materialise: during capture the
UNet runs diffusers' plain `AttnProcessor` (slower, same numbers up to float rounding), and its
`get_attention_scores` is observed, not reimplemented. The original processors are restored afterwards.
"""
from __future__ import annotations

import math
from typing import Sequence

import numpy as np

from persona.services.generate import sampling

# Colours of the heat map, low → high (a perceptual dark-blue → yellow ramp).
_RAMP = np.array([[13, 8, 135], [126, 3, 168], [204, 71, 120], [248, 149, 64], [240, 249, 33]], dtype=np.float32)


def identifier_token_indices(tokenizer, prompt: str, identifier: str) -> list[int]:
    """Positions of the identifier's token(s) in the tokenised prompt (BOS at 0), as the text encoder sees it."""
    ids = tokenizer(prompt, padding="max_length", max_length=tokenizer.model_max_length, truncation=True).input_ids
    wanted = tokenizer(identifier, add_special_tokens=False).input_ids
    for start in range(len(ids) - len(wanted) + 1):
        if ids[start:start + len(wanted)] == wanted:
            return list(range(start, start + len(wanted)))
    raise ValueError(f"the identifier {identifier!r} is not in the prompt {prompt!r}")


class _AttentionRecorder:
    """Accumulates identifier-column attention, resized to the latent grid, over every cross-attention call."""

    def __init__(self, token_indices: Sequence[int], latent_size: tuple[int, int], guided: bool):
        self.token_indices = list(token_indices)
        self.latent_size = latent_size
        self.guided = guided
        self.total = None
        self.calls = 0

    def add(self, probs, heads: int) -> None:
        import torch.nn.functional as F

        # probs: (batch * heads, query pixels, text tokens); the text-conditioned half is the second (CFG order).
        batch = probs.shape[0] // heads
        probs = probs.reshape(batch, heads, probs.shape[1], probs.shape[2])
        if self.guided:
            probs = probs[batch // 2:]
        column = probs[..., self.token_indices].mean(dim=(1, 3))  # (batch, pixels): heads and tokens averaged
        height, width = _grid(column.shape[1], self.latent_size)
        grid = column.reshape(-1, 1, height, width).float()
        resized = F.interpolate(grid, size=self.latent_size, mode="bilinear", align_corners=False)[:, 0]
        self.total = resized if self.total is None else self.total + resized
        self.calls += 1

    def result(self) -> np.ndarray:
        """(batch, latent h, latent w) in [0, 1] per image."""
        if self.total is None:
            raise ValueError("no cross-attention layer ran: is this a text-conditioned UNet?")
        maps = (self.total / self.calls).cpu().numpy()
        low = maps.min(axis=(1, 2), keepdims=True)
        high = maps.max(axis=(1, 2), keepdims=True)
        return (maps - low) / np.maximum(high - low, 1e-12)


def _grid(pixels: int, latent_size: tuple[int, int]) -> tuple[int, int]:
    """The (h, w) of a layer's query grid, from its pixel count and the latent aspect ratio."""
    height = max(1, round(math.sqrt(pixels * latent_size[0] / latent_size[1])))
    return height, pixels // height


def _capturing_processor(recorder: _AttentionRecorder):
    from diffusers.models.attention_processor import AttnProcessor

    class CapturingAttnProcessor(AttnProcessor):
        """diffusers' AttnProcessor, with the cross-attention probabilities handed to the recorder."""

        def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, *args, **kwargs):
            if encoder_hidden_states is None:  # self-attention: nothing to record
                return super().__call__(attn, hidden_states, encoder_hidden_states, attention_mask, *args, **kwargs)
            scores = attn.get_attention_scores

            def observed(query, key, mask=None):
                probs = scores(query, key, mask)
                recorder.add(probs, attn.heads)
                return probs

            attn.get_attention_scores = observed
            try:
                return super().__call__(attn, hidden_states, encoder_hidden_states, attention_mask, *args, **kwargs)
            finally:
                del attn.get_attention_scores  # back to the class's method

    return CapturingAttnProcessor()


def draw_with_attention(models, tokenizer, scheduler_config: dict, settings, identifier: str):
    """Draws `settings` (sampling.SamplingSettings) with `models` (sampling.TorchModels) and returns (PIL image,
    (H, W) float map in [0, 1]) of the identifier's cross-attention."""
    from PIL import Image

    unet = models.unet
    latent_size = (settings.height // models.vae_scale_factor, settings.width // models.vae_scale_factor)
    recorder = _AttentionRecorder(identifier_token_indices(tokenizer, settings.prompt, identifier), latent_size,
                                  guided=settings.guidance_scale > 1.0)
    original = unet.attn_processors
    unet.set_attn_processor(_capturing_processor(recorder))
    try:
        image = sampling.sample(models, tokenizer, scheduler_config, settings)
    finally:
        unet.set_attn_processor(original)
    latent_map = recorder.result()[0]
    full = Image.fromarray((latent_map * 255).astype(np.uint8)).resize(image.size, Image.BILINEAR)
    return image, np.asarray(full, dtype=np.float32) / 255.0


def overlay(image, heat: np.ndarray, alpha: float = 0.55):
    """The image with the map blended over it as colour (dark blue: none, yellow: most)."""
    from PIL import Image

    positions = np.clip(heat, 0, 1) * (len(_RAMP) - 1)
    low = np.floor(positions).astype(int)
    high = np.minimum(low + 1, len(_RAMP) - 1)
    fraction = (positions - low)[..., None]
    colours = _RAMP[low] * (1 - fraction) + _RAMP[high] * fraction
    base = np.asarray(image.convert("RGB"), dtype=np.float32)
    return Image.fromarray((base * (1 - alpha) + colours * alpha).round().astype(np.uint8))
