"""P3S's RNGR encoder (Eq. 4–5): the completed photo's latent, given a spatial bias toward the subject by
cross-attending to the CLIP image encoder's last hidden state.

    I'' = I' + Softmax(Q_i K_cᵀ / √d) V_c,   Q_i = W^Q Z(I', θ^z),  K_c = W^K c_s,  V_c = W^V c_s

Reading chosen (the printed equations are all there is): I' is the VAE latent of the completed image (scaled as
the UNet sees latents, C channels); Z is a 1×1 convolution C → C, weight and bias zero at the start; each latent
pixel is one query. W^Q (C → d) and W^K (D → d) project into one attention space of width d (one head, no bias),
and W^V maps the CLIP tokens (D) straight to the latent's C channels, so the attention output adds to I' as Eq. 4
writes it, with no output projection the paper does not name. c_s is the CLIP vision model's last_hidden_state
(CLS and patch tokens; ViT-L/14 by default, as the point masks use). At the start Q = 0, so every pixel gets the
mean of V_c: the bias starts uniform and learns where to look.
"""
from __future__ import annotations

import math

import torch
from torch import nn

# Width d of the query/key space by default.
ATTENTION_DIM = 64


class RngrEncoder(nn.Module):
    """I' latent (B, C, h, w) and c_s (B, T, D) → I'' (B, C, h, w)."""

    def __init__(self, latent_channels: int, clip_dim: int, attention_dim: int = ATTENTION_DIM):
        super().__init__()
        self.zero_conv = nn.Conv2d(latent_channels, latent_channels, kernel_size=1)
        nn.init.zeros_(self.zero_conv.weight)
        nn.init.zeros_(self.zero_conv.bias)
        self.to_q = nn.Linear(latent_channels, attention_dim, bias=False)
        self.to_k = nn.Linear(clip_dim, attention_dim, bias=False)
        self.to_v = nn.Linear(clip_dim, latent_channels, bias=False)
        self.attention_dim = attention_dim

    def forward(self, latent: torch.Tensor, clip_hidden: torch.Tensor) -> torch.Tensor:
        b, c, h, w = latent.shape
        pixels = self.zero_conv(latent).flatten(2).transpose(1, 2)  # (B, h·w, C)
        q, k, v = self.to_q(pixels), self.to_k(clip_hidden), self.to_v(clip_hidden)
        weights = torch.softmax(q @ k.transpose(1, 2) / math.sqrt(self.attention_dim), dim=-1)  # (B, h·w, T)
        bias = (weights @ v).transpose(1, 2).reshape(b, c, h, w)
        return latent + bias


def clip_last_hidden_state(vision_model, processor, images, device="cpu") -> torch.Tensor:
    """c_s: the CLIP vision model's last_hidden_state (B, 1 + patches, D) for PIL `images`, without gradient."""
    inputs = processor(images=list(images), return_tensors="pt")
    with torch.no_grad():
        return vision_model(pixel_values=inputs.pixel_values.to(device, vision_model.dtype)).last_hidden_state
