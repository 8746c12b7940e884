"""Parallel text and visual cross-attention (CustomContrast Eq. 3): how the MFI encoder's tokens enter the UNet.

Reading of Eq. 3 (its image was lost): for image latents z and layer l,
``Attn^l = softmax(Q Kᵀ/√d) V + λ · softmax(Q K'ᵀ/√d) V'`` with ``Q = z W_q``, ``K = c_t^l W_k``, ``V = c_t^l W_v``
(frozen: the UNet's own projections over the text states c_t^l of the caption with the layer's text tokens in place
of its placeholder) and ``K' = V̂^l W'_k``, ``V' = V̂^l W'_v`` (trainable) over the layer's image tokens V̂^l; λ = 1 by
default. W'_k, W'_v start as copies of W_k, W_v (reading: IP-Adapter's initialisation, which the paper builds on;
with λ = 0 the layer is exactly the UNet's own cross-attention).

The processors of one UNet share a `TokenInjection`: the caller puts the current step's per-layer text states and
image tokens there before calling the UNet, and, when `record_maps` is set, each processor leaves its attention
probabilities there for the location loss (§3.4).

Timestep-specific subject location at inference (§3.4, Fig. 4): the global map A of step t (`global_attention_map`)
becomes a mask (`location_mask`; reading: the pixels whose attention is at least the map's mean, i.e. above what a
uniform map would give) which, set as `TokenInjection.location_mask` for step t−1, multiplies every visual attention
map and the placeholder slots' text attention maps (reading: the probabilities are multiplied, not renormalised, so
the subject's tokens act only inside the mask while the caption's other words keep their weights).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn
from torch.nn import functional as F

from persona.services.runtime.errors import InvalidArgument


@dataclass
class TokenInjection:
    """What every decoupled processor of one UNet reads for the current call.

    text_states: per cross-attention layer, (B, S, d_cross) text-encoder outputs, or None to use the UNet call's own
      `encoder_hidden_states`; image_tokens: (B, L_x, N_img, d_cross); record_maps: keep each layer's attention
      probabilities in `maps` as (text probs (B, heads, HW, S), image probs (B, heads, HW, N_img)); location_mask and
      placeholder: §3.4's inference-time mask (module docstring)."""

    image_tokens: torch.Tensor | None = None
    text_states: list[torch.Tensor] | None = None
    record_maps: bool = False
    maps: dict[int, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)
    location_mask: torch.Tensor | None = None  # (B, H, W) in [0, 1], from the previous step's maps (inference)
    placeholder: torch.Tensor | None = None  # (B, S) bool, the caption's placeholder slots (with location_mask)


class DecoupledCrossAttentionProcessor(nn.Module):
    """A diffusers attention processor for one cross-attention layer: the UNet's text attention plus λ times an
    attention over the layer's image tokens with trainable K'/V'."""

    def __init__(self, attn, layer_index: int, injection: TokenInjection, scale: float = 1.0):
        super().__init__()
        if getattr(attn, "group_norm", None) is not None or getattr(attn, "spatial_norm", None) is not None:
            raise InvalidArgument("the UNet's cross-attention has a group or spatial norm, which Stable Diffusion's "
                                  "has not: CustomContrast's processors fit SD-1.x/2.x/XL UNets")
        self.layer_index, self.injection, self.scale = layer_index, injection, scale
        self.to_k_image = nn.Linear(attn.to_k.in_features, attn.to_k.out_features, bias=False)
        self.to_v_image = nn.Linear(attn.to_v.in_features, attn.to_v.out_features, bias=False)
        with torch.no_grad():
            self.to_k_image.weight.copy_(attn.to_k.weight)
            self.to_v_image.weight.copy_(attn.to_v.weight)

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, **kwargs):
        injection = self.injection
        if injection.text_states is not None:
            encoder_hidden_states = injection.text_states[self.layer_index]
        if encoder_hidden_states is None or injection.image_tokens is None:
            raise RuntimeError("the MFI processors need TokenInjection.image_tokens and text states set before the "
                               "UNet call")
        residual = hidden_states
        spatial = hidden_states.ndim == 4
        if spatial:
            batch, channels, height, width = hidden_states.shape
            hidden_states = hidden_states.flatten(2).transpose(1, 2)
        if attn.norm_cross:
            encoder_hidden_states = attn.norm_encoder_hidden_states(encoder_hidden_states)
        image_tokens = injection.image_tokens[:, self.layer_index].to(hidden_states.dtype)

        query = attn.to_q(hidden_states)
        text_probs, text_values = _probabilities(attn, query, attn.to_k(encoder_hidden_states),
                                                 attn.to_v(encoder_hidden_states))
        image_probs, image_values = _probabilities(attn, query, self.to_k_image(image_tokens),
                                                   self.to_v_image(image_tokens))
        if injection.record_maps:
            injection.maps[self.layer_index] = (text_probs, image_probs)
        if injection.location_mask is not None:
            text_probs, image_probs = _apply_location(injection, text_probs, image_probs)
        text_out, image_out = _combine(text_probs, text_values), _combine(image_probs, image_values)
        hidden_states = attn.to_out[1](attn.to_out[0](text_out + self.scale * image_out))
        if spatial:
            hidden_states = hidden_states.transpose(1, 2).reshape(batch, channels, height, width)
        if attn.residual_connection:
            hidden_states = hidden_states + residual
        return hidden_states / attn.rescale_output_factor


def _probabilities(attn, query, key, value):
    """Multi-head softmax attention probabilities (B, heads, n, m) and the values split by head (B, heads, m, d_h)."""
    split = lambda x: x.unflatten(-1, (attn.heads, -1)).transpose(1, 2)  # noqa: E731
    q, k = split(query), split(key)
    scores = q @ k.transpose(-1, -2) * attn.scale
    if attn.upcast_softmax:  # as diffusers' own processors: fp16 scores softmaxed in fp32
        return scores.float().softmax(dim=-1).to(query.dtype), split(value)
    return scores.softmax(dim=-1), split(value)


def _combine(probs, values):
    return (probs @ values).transpose(1, 2).flatten(2)


def _apply_location(injection: TokenInjection, text_probs, image_probs):
    """§3.4 at inference: the mask, resized to this layer's square grid, multiplies the visual maps and the
    placeholder slots' text maps."""
    pixels = image_probs.shape[2]
    side = int(round(pixels ** 0.5))
    mask = F.interpolate(injection.location_mask[:, None].to(image_probs.dtype), size=(side, side), mode="bilinear",
                         align_corners=False).flatten(1)[:, None, :, None]  # (B, 1, HW, 1)
    image_probs = image_probs * mask
    if injection.placeholder is not None:
        slots = injection.placeholder[:, None, None, :].to(text_probs.dtype)  # (B, 1, 1, S)
        text_probs = text_probs * (1 - slots + slots * mask)
    return text_probs, image_probs


def install_decoupled_processors(unet, scale: float = 1.0) -> tuple[TokenInjection, nn.ModuleList]:
    """Give every cross-attention layer of a diffusers UNet (the `attn2` layers, in `attn_processors` order) a
    decoupled processor; self-attention keeps its own. Returns the shared injection and the processors (their
    K'/V' are the UNet's trainable part)."""
    injection = TokenInjection()
    processors, trainable = {}, []
    modules = dict(unet.named_modules())
    for name, processor in unet.attn_processors.items():
        if name.endswith("attn2.processor"):
            module = modules[name.removesuffix(".processor")]
            decoupled = DecoupledCrossAttentionProcessor(module, len(trainable), injection, scale)
            processors[name] = decoupled
            trainable.append(decoupled)
        else:
            processors[name] = processor
    unet.set_attn_processor(processors)
    return injection, nn.ModuleList(trainable)


def global_attention_map(layer_probs: list[tuple[torch.Tensor, torch.Tensor]], placeholder: torch.Tensor,
                         size: tuple[int, int]) -> torch.Tensor:
    """§3.4's global map A: the average of every visual cross-attention map and of the placeholder's text
    cross-attention map, over all recorded layers.

    layer_probs: per layer (text probs (B, heads, HW, S), image probs (B, heads, HW, N)) as `TokenInjection.maps`
    keeps them (square latents); placeholder: (B, S) bool, the caption's placeholder slots (`placeholder_mask`).
    Reading: the text map is the placeholder slots' columns averaged (the paper's "p-th" token is one slot; here the
    N_t slots stand for it together); each map is averaged over heads, resized to `size` and normalised to sum 1
    over pixels. The normalisation is needed: a pixel's softmax over the image tokens sums to 1, so summing raw
    visual maps over their tokens would give a constant map."""
    maps = []
    slots = placeholder.to(torch.float32)
    slots = slots / slots.sum(dim=-1, keepdim=True).clamp(min=1)
    for text_probs, image_probs in layer_probs:
        text_column = (text_probs * slots[:, None, None, :].to(text_probs.dtype)).sum(dim=-1, keepdim=True)
        columns = torch.cat([text_column, image_probs], dim=-1)
        columns = columns.mean(dim=1)  # (B, HW, 1 + N)
        side = int(round(columns.shape[1] ** 0.5))
        if side * side != columns.shape[1]:
            raise InvalidArgument(f"an attention map has {columns.shape[1]} pixels, not a square latent grid")
        grid = columns.transpose(1, 2).unflatten(-1, (side, side))  # (B, 1 + N, side, side)
        grid = F.interpolate(grid, size=size, mode="bilinear", align_corners=False)
        maps.append(grid / grid.sum(dim=(-2, -1), keepdim=True).clamp(min=1e-12))
    if not maps:
        raise InvalidArgument("no attention maps were recorded: set TokenInjection.record_maps before the UNet call")
    return torch.cat(maps, dim=1).mean(dim=1)


def location_mask(global_map: torch.Tensor) -> torch.Tensor:
    """The inference-time subject mask from step t's global map (B, H, W): 1 where the attention is at least the
    map's mean (a uniform map's value), else 0."""
    return (global_map >= global_map.mean(dim=(-2, -1), keepdim=True)).to(global_map.dtype)
