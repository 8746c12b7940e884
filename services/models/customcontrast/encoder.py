"""The MFI encoder (CustomContrast §3.2): Visual Q-Former, Textual Q-Former and TV fusion over CLIP image features.

The text version of the paper lost its equation images; what is built here is the reading below, each choice
marked *reading* where the prose leaves it open.

**Image features.** The CLIP image encoder's hidden states of `L` layers (default 3; reading: spread evenly over its
depth and ending at the last, layers 8, 16, 24 of ViT-L/14's 24, so they run "coarse-to-fine") are *concatenated
along the token axis* (reading: the prose says "concatenate"; the token axis keeps one
width, so each query sees every layer's patches), after a learned per-layer embedding, then projected to the
Q-Formers' width: F ∈ R^{B × L·N × d}.

**Perceiver attention, Eq. 2** (OpenFlamingo's PA): for image features x and queries q,
``PA(x, q) = softmax(q W_q ([x; q] W_k)ᵀ / √d_h) [x; q] W_v`` per head, with LayerNorm on x and q, where [x; q] is
the concatenation along tokens. A Q-Former layer is ``q ← q + PA(x, q); q ← q + FF(q)`` (pre-norm, GELU feed-forward
of 4× width). Each Q-Former has 4 layers by default (paper §4.1).

**Textual Q-Former, spatiotemporal queries.** Its queries are ``Q_st(t, l) = Q_text + MLP(fourier(t)) + E_layer[l]``:
learnable base queries (N_t word tokens + 1 CLS), a Fourier mapping of the timestep
(``[sin(2π f_k t/T), cos(2π f_k t/T)]`` for K log-spaced frequencies f_k from 1 to K, t/T the timestep as a fraction
of the training schedule; reading: fixed frequencies, as the NeTI/P+ line does, rather than random Gaussian ones)
through a two-layer MLP, and a learnable embedding per UNet cross-attention layer l. One pass serves every layer:
the output ``T^l ∈ R^{(N_t+1) × d_word}`` holds N_t tokens in the text encoder's *input word-embedding space* (they
replace the placeholder word of the caption, and "after passing through the text encoder" reach layer l's text
cross-attention) and, last, the textual CLS token.

**Visual Q-Former.** Plain learnable queries (N_v + 1): ``V ∈ R^{(N_v+1) × d_cross}``; the first N_v are the image
tokens, the last is the visual CLS token. Without TV fusion (the ablation, Tab. 3 ID-1) the same N_v tokens are
injected into every visual cross-attention layer.

**TV fusion.** "Uses textual embeddings as queries to capture text-related visual embeddings" with the module of
Eq. 2: ``V̂^l = QFormerLayer(x = V_{1..N_v}, q = W_tv T^l_{1..N_t})`` (reading: one Q-Former layer, the text tokens
projected to the visual width as queries, the visual tokens as the image features). V̂^l (N_t tokens per layer) is
what layer l's visual cross-attention receives (Eq. 3).

**CLS tokens for CSCL (Eq. 4).** The visual CLS and the textual CLS (reading: averaged over the cross-attention
layers, since the textual queries differ per layer) each go through a linear head to one shared contrast width,
as CLIP's two towers do, so the two CLS tokens are compared in one space even when d_word ≠ d_cross (SDXL).

Widths: ``d_word`` = the text encoder's hidden size (its token-embedding width), ``d_cross`` = the UNet's
``cross_attention_dim``; both 768 for SD-1.5.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from persona.services.runtime.errors import InvalidArgument


@dataclass(frozen=True)
class MFIEncoderConfig:
    """The encoder's shape. Defaults follow the paper where it gives a number (3 CLIP layers, 4 Q-Former layers)."""

    clip_width: int  # the CLIP image encoder's hidden size (1024 for ViT-L/14)
    word_width: int  # the text encoder's token-embedding width (d_word)
    cross_attention_width: int  # the UNet's cross_attention_dim (d_cross)
    num_cross_attention_layers: int  # UNet cross-attention layers that receive tokens (16 in SD-1.5)
    num_clip_layers: int = 3  # CLIP hidden states concatenated (paper: 3)
    width: int = 768  # the Q-Formers' inner width
    num_layers: int = 4  # layers of each Q-Former (paper §4.1: 4)
    heads: int = 8
    num_visual_tokens: int = 16  # N_v (reading: IP-Adapter-Plus's 16; the paper's main text gives none)
    num_text_tokens: int = 4  # N_t word tokens per layer (reading: the main text gives none)
    fourier_frequencies: int = 16  # K
    num_train_timesteps: int = 1000  # T, the base model's training schedule
    contrast_width: int = 512  # the shared space of the CLS heads
    use_textual: bool = True  # False: Tab. 3 ID-0, visual Q-Former only
    use_tv_fusion: bool = True  # False: Tab. 3 ID-1

    def __post_init__(self):
        for name in ("clip_width", "word_width", "cross_attention_width", "num_cross_attention_layers",
                     "num_clip_layers", "width", "num_layers", "heads", "num_visual_tokens", "num_text_tokens",
                     "fourier_frequencies", "num_train_timesteps", "contrast_width"):
            if getattr(self, name) < 1:
                raise InvalidArgument(f"`{name}` is {getattr(self, name)}: it must be at least 1")
        if self.width % self.heads:
            raise InvalidArgument(f"`width` {self.width} is not a multiple of `heads` {self.heads}: pick e.g. "
                                  f"heads={math.gcd(self.width, 8)}")
        if self.use_tv_fusion and not self.use_textual:
            raise InvalidArgument("`use_tv_fusion` needs the textual Q-Former: its queries are the text tokens; "
                                  "turn `use_tv_fusion` off too")


@dataclass
class MFIOutput:
    """What the encoder gives the UNet and the losses, for a batch of B images at one timestep each.

    text_tokens: (B, L_x, N_t, d_word) word embeddings per cross-attention layer, or None without the textual
      Q-Former; image_tokens: (B, L_x, N_img, d_cross) per cross-attention layer (N_img = N_t with TV fusion, else
      N_v, the same tokens for every layer); visual_cls / textual_cls: (B, contrast_width), textual_cls None without
      the textual Q-Former."""

    text_tokens: torch.Tensor | None
    image_tokens: torch.Tensor
    visual_cls: torch.Tensor
    textual_cls: torch.Tensor | None


def fourier_features(timesteps: torch.Tensor, frequencies: int, num_train_timesteps: int) -> torch.Tensor:
    """(B,) timesteps → (B, 2K): [sin(2π f_k t/T), cos(2π f_k t/T)] with f_k = 2^(k·log2(K)/(K-1)), 1 … K."""
    fraction = timesteps.float()[:, None] / num_train_timesteps
    exponents = torch.linspace(0.0, math.log2(frequencies), frequencies, device=timesteps.device)
    angles = 2 * math.pi * fraction * (2.0 ** exponents)[None, :]
    return torch.cat([angles.sin(), angles.cos()], dim=-1)


class PerceiverAttention(nn.Module):
    """Eq. 2: queries attend to the concatenation of image features and themselves.

    `queries` may hold R sets per image (batch B·R, image-major: the textual Q-Former's one set per cross-attention
    layer) over `features` of batch B: the features are normalised and projected once per image, then shared."""

    def __init__(self, width: int, heads: int):
        super().__init__()
        self.heads = heads
        self.norm_features = nn.LayerNorm(width)
        self.norm_queries = nn.LayerNorm(width)
        self.to_q = nn.Linear(width, width, bias=False)
        self.to_kv = nn.Linear(width, 2 * width, bias=False)
        self.to_out = nn.Linear(width, width, bias=False)

    def forward(self, features: torch.Tensor, queries: torch.Tensor) -> torch.Tensor:
        repeats = queries.shape[0] // features.shape[0]
        feature_kv = self.to_kv(self.norm_features(features))
        if repeats > 1:
            feature_kv = feature_kv.repeat_interleave(repeats, dim=0)
        queries = self.norm_queries(queries)
        keys, values = torch.cat([feature_kv, self.to_kv(queries)], dim=1).chunk(2, dim=-1)
        split = lambda x: x.unflatten(-1, (self.heads, -1)).transpose(1, 2)  # noqa: E731 (B, h, n, d_h)
        out = nn.functional.scaled_dot_product_attention(split(self.to_q(queries)), split(keys), split(values))
        return self.to_out(out.transpose(1, 2).flatten(2))


class QFormerLayer(nn.Module):
    """q ← q + PA(x, q); q ← q + FF(q)."""

    def __init__(self, width: int, heads: int):
        super().__init__()
        self.attention = PerceiverAttention(width, heads)
        self.feed_forward = nn.Sequential(nn.LayerNorm(width), nn.Linear(width, 4 * width), nn.GELU(),
                                          nn.Linear(4 * width, width))

    def forward(self, features: torch.Tensor, queries: torch.Tensor) -> torch.Tensor:
        queries = queries + self.attention(features, queries)
        return queries + self.feed_forward(queries)


class QFormer(nn.Module):
    """`num_layers` Q-Former layers, then a LayerNorm'd projection to the output width."""

    def __init__(self, width: int, heads: int, num_layers: int, out_width: int):
        super().__init__()
        self.layers = nn.ModuleList(QFormerLayer(width, heads) for _ in range(num_layers))
        self.proj_out = nn.Linear(width, out_width)
        self.norm_out = nn.LayerNorm(out_width)

    def forward(self, features: torch.Tensor, queries: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            queries = layer(features, queries)
        return self.norm_out(self.proj_out(queries))


class MFIEncoder(nn.Module):
    """CLIP image features (+ timestep) → text tokens and image tokens per UNet cross-attention layer, and the CLS
    tokens CSCL contrasts. The module docstring gives the reading of the paper built here."""

    def __init__(self, config: MFIEncoderConfig):
        super().__init__()
        self.config = c = config
        scale = c.width ** -0.5
        self.clip_layer_embedding = nn.Parameter(torch.randn(c.num_clip_layers, 1, c.clip_width) * c.clip_width ** -0.5)
        self.proj_in = nn.Linear(c.clip_width, c.width)
        self.visual_queries = nn.Parameter(torch.randn(c.num_visual_tokens + 1, c.width) * scale)
        self.visual_qformer = QFormer(c.width, c.heads, c.num_layers, c.cross_attention_width)
        self.visual_cls_head = nn.Linear(c.cross_attention_width, c.contrast_width, bias=False)
        if c.use_textual:
            self.text_queries = nn.Parameter(torch.randn(c.num_text_tokens + 1, c.width) * scale)
            self.layer_embedding = nn.Parameter(torch.randn(c.num_cross_attention_layers, 1, c.width) * scale)
            self.time_mlp = nn.Sequential(nn.Linear(2 * c.fourier_frequencies, c.width), nn.SiLU(),
                                          nn.Linear(c.width, c.width))
            self.textual_qformer = QFormer(c.width, c.heads, c.num_layers, c.word_width)
            self.textual_cls_head = nn.Linear(c.word_width, c.contrast_width, bias=False)
        if c.use_tv_fusion:
            self.tv_text_to_visual = nn.Linear(c.word_width, c.cross_attention_width)
            self.tv_fusion = QFormerLayer(c.cross_attention_width, _heads_for(c.cross_attention_width, c.heads))

    def image_features(self, clip_hidden_states: list[torch.Tensor] | tuple[torch.Tensor, ...]) -> torch.Tensor:
        """CLIP's hidden states (`output_hidden_states=True`: the embeddings, then each of its D layers, each
        (B, N, clip_width)) → F (B, L·N, width) from layers round(k·D/L), k = 1 … L."""
        count, depth = self.config.num_clip_layers, len(clip_hidden_states) - 1
        if depth < count:
            raise InvalidArgument(f"`clip_hidden_states` has {len(clip_hidden_states)} entries; the encoder reads "
                                  f"{count} layers after the embeddings: pass output_hidden_states=True to the CLIP "
                                  "encoder")
        layers = [clip_hidden_states[round(k * depth / count)] for k in range(1, count + 1)]
        for layer in layers:
            if layer.shape[-1] != self.config.clip_width:
                raise InvalidArgument(f"`clip_hidden_states` are {layer.shape[-1]} wide, the encoder was built for "
                                      f"clip_width={self.config.clip_width}: use the CLIP image encoder it was "
                                      "trained on")
        stacked = torch.stack(layers, dim=1) + self.clip_layer_embedding  # (B, L, N, clip_width)
        return self.proj_in(stacked.flatten(1, 2))

    def forward(self, clip_hidden_states, timesteps: torch.Tensor) -> MFIOutput:
        c = self.config
        features = self.image_features(clip_hidden_states)
        batch, layers = features.shape[0], c.num_cross_attention_layers
        if timesteps.shape != (batch,):
            raise InvalidArgument(f"`timesteps` has shape {tuple(timesteps.shape)}; pass one per image: ({batch},)")

        visual = self.visual_qformer(features, self.visual_queries.expand(batch, -1, -1))
        visual_tokens, visual_cls = visual[:, :-1], self.visual_cls_head(visual[:, -1])
        if not c.use_textual:
            image_tokens = visual_tokens[:, None].expand(-1, layers, -1, -1)
            return MFIOutput(None, image_tokens, visual_cls, None)

        # Spatiotemporal queries: one set per (image, cross-attention layer), all layers in one pass.
        time = self.time_mlp(fourier_features(timesteps, c.fourier_frequencies, c.num_train_timesteps))
        queries = self.text_queries[None, None] + time[:, None, None] + self.layer_embedding[None]  # (B, L_x, N+1, w)
        textual = self.textual_qformer(features, queries.flatten(0, 1)).unflatten(0, (batch, layers))
        text_tokens = textual[:, :, :-1]
        textual_cls = self.textual_cls_head(textual[:, :, -1].mean(dim=1))

        if c.use_tv_fusion:
            fusion_queries = self.tv_text_to_visual(text_tokens).flatten(0, 1)  # (B·L_x, N_t, d_cross)
            image_tokens = self.tv_fusion(visual_tokens, fusion_queries).unflatten(0, (batch, layers))
        else:
            image_tokens = visual_tokens[:, None].expand(-1, layers, -1, -1)
        return MFIOutput(text_tokens, image_tokens, visual_cls, textual_cls)


def _heads_for(width: int, preferred: int) -> int:
    """The largest head count ≤ `preferred` that divides `width` (the fusion runs at the UNet's width)."""
    return next(h for h in range(preferred, 0, -1) if width % h == 0)
