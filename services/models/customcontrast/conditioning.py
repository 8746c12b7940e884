"""What a sampler sets before each UNet call to draw a CustomContrast subject: the step's per-layer text states and
image tokens from the subject's token table (`build.subject_tokens`), classifier-free guidance's unconditional half,
and §3.4's timestep-specific location mask carried from one step to the next.

The sampler's loop itself is generate's; this module is what it calls around each UNet call:

    for t in scheduler.timesteps:
        set_step_conditioning(models.injection, models.text_encoder, table, t, prompt_ids, placeholder, negative)
        noise = unet(cat([latents] * 2), t, encoder_hidden_states=<any; the processors read the injection>)
        carry_location_mask(models.injection, placeholder, latent_size)   # the mask for the next step

Readings: the unconditional half gets the negative prompt's own text states in every layer and *zero* image tokens
(K' = V' = 0, so the visual attention adds nothing: the unconditional prediction is the base model's); the location
mask of step t (from the conditional half's maps) gates step t−1's conditional half only, and the first step runs
without one (there is no earlier map).
"""
from __future__ import annotations

import torch

from .attention import TokenInjection, global_attention_map, location_mask
from .build import SubjectTokens
from .text import text_states_per_layer


def set_step_conditioning(injection: TokenInjection, text_encoder, table: SubjectTokens, timestep: int,
                          prompt_ids: torch.Tensor, placeholder: torch.Tensor,
                          negative_ids: torch.Tensor | None = None, record_maps: bool = True) -> None:
    """Fills `injection` for the UNet call at `timestep`: batch [negative; prompt] when `negative_ids` is given (CFG),
    else the prompt alone. prompt_ids, placeholder: (B, S); negative_ids: (B, S)."""
    text_row, image_row = table.at(timestep)
    batch = len(prompt_ids)
    layers = image_row.shape[0]
    image_tokens = image_row[None].expand(batch, -1, -1, -1)
    with torch.no_grad():
        if text_row is None:
            text_states = [text_encoder(prompt_ids)[0]] * layers
        else:
            text_states = text_states_per_layer(text_encoder, prompt_ids, placeholder,
                                                text_row[None].expand(batch, -1, -1, -1))
        if negative_ids is not None:
            negative = text_encoder(negative_ids)[0]
            text_states = [torch.cat([negative, states]) for states in text_states]
            image_tokens = torch.cat([torch.zeros_like(image_tokens), image_tokens])
            placeholder = torch.cat([torch.zeros_like(placeholder), placeholder])
    previous = injection.location_mask
    if previous is not None and negative_ids is not None and len(previous) == batch:
        previous = torch.cat([torch.ones_like(previous), previous])  # the unconditional half is never gated
    injection.text_states, injection.image_tokens, injection.placeholder = text_states, image_tokens, placeholder
    injection.location_mask, injection.record_maps, injection.maps = previous, record_maps, {}


def carry_location_mask(injection: TokenInjection, placeholder: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """After the UNet call at step t: the conditional half's global map → the mask step t−1 runs with (kept in
    `injection.location_mask`, for the B conditional images); returns it."""
    batch = len(placeholder)
    maps = [(text[-batch:], image[-batch:]) for _, (text, image) in sorted(injection.maps.items())]
    mask = location_mask(global_attention_map(maps, placeholder, size))
    injection.location_mask, injection.maps, injection.record_maps = mask, {}, False
    return mask
