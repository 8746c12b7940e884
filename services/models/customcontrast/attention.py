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
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn


@dataclass
class TokenInjection:
    """What every decoupled processor of one UNet reads for the current call.

    text_states: per cross-attention layer, (B, S, d_cross) text-encoder outputs, or None to use the UNet call's own
      `encoder_hidden_states`; image_tokens: (B, L_x, N_img, d_cross); record_maps: keep each layer's attention
      probabilities in `maps` as (text probs (B, heads, HW, S), image probs (B, heads, HW, N_img))."""

    image_tokens: torch.Tensor | None = None
    text_states: list[torch.Tensor] | None = None
    record_maps: bool = False
    maps: dict[int, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)


class DecoupledCrossAttentionProcessor(nn.Module):
    """A diffusers attention processor for one cross-attention layer: the UNet's text attention plus λ times an
    attention over the layer's image tokens with trainable K'/V'."""

    def __init__(self, attn, layer_index: int, injection: TokenInjection, scale: float = 1.0):
        super().__init__()
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
        text_out, text_probs = _attend(attn, query, attn.to_k(encoder_hidden_states), attn.to_v(encoder_hidden_states))
        image_out, image_probs = _attend(attn, query, self.to_k_image(image_tokens), self.to_v_image(image_tokens))
        if injection.record_maps:
            injection.maps[self.layer_index] = (text_probs, image_probs)
        hidden_states = attn.to_out[1](attn.to_out[0](text_out + self.scale * image_out))
        if spatial:
            hidden_states = hidden_states.transpose(1, 2).reshape(batch, channels, height, width)
        if attn.residual_connection:
            hidden_states = hidden_states + residual
        return hidden_states / attn.rescale_output_factor


def _attend(attn, query, key, value):
    """Multi-head softmax attention; returns (B, n, heads·d_h) and the probabilities (B, heads, n, m)."""
    split = lambda x: x.unflatten(-1, (attn.heads, -1)).transpose(1, 2)  # noqa: E731
    q, k, v = split(query), split(key), split(value)
    probs = (q @ k.transpose(-1, -2) * attn.scale).softmax(dim=-1)
    return (probs @ v).transpose(1, 2).flatten(2), probs


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
