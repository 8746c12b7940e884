"""P3S's multi-layer condition injection (Eq. 6–8): a trainable copy of a simplified UNet whose hidden states,
through zero convolutions, join every self-attention of the frozen UNet.

    f_i = Z(F_i(x_t, c, t, θ_i), θ_i^z)                         (Eq. 6)
    Q = W^Q z_i,  K' = W^K [z_i, f_i],  V' = W^V [z_i + λ f_i, f_i]   (Eq. 7)
    Attention = Softmax(Q K'ᵀ / √d) V'                              (Eq. 8)

Reading chosen:
- The copy (`ConditionBranch`) has the frozen UNet's levels with one ResNet block each ("a simplified U-Net with
  only one ResNet block in each block"), each followed by that level's spatial transformer where the frozen level
  has one: the first ResNet block and first transformer of each frozen down, mid and up block, deep-copied with
  their weights (ControlNet's "trainable copy"), plus copies of conv_in, the time embedding and the down/up
  samplers. An up level's ResNet block takes the copy's own skip from the same down level, which has the channels
  the frozen block's first ResNet expects. Its input is x_t + I'' (the completed photo's latent from the RNGR
  encoder added to the noisy latent: "image embedding is added to the noise"), with the text c and timestep t.
- f_i: the copy's transformer output at the level of frozen self-attention layer i, as tokens (B, h·w, C), through
  a zero-initialised 1×1 convolution of its own per layer i (θ_i^z: a C → C linear on tokens). A frozen level with
  several transformers (SD-1.5's 2 per down, 3 per up block) gives each its own zero conv of the one copy feature.
- z_i is what the frozen self-attention gets (the transformer block's normed hidden states); [a, b] concatenates
  along the token axis, so keys and values double. λ = 0.2.
- The timestep weight ε_t (Eq. 9, `weights.TimestepWeights`) multiplies f_i per example.
- With f_i = 0 (zero convs at the start) the extra keys score 0 and their values are 0: attention is not the base
  one but the base one scaled by the softmax mass of the original keys. The paper's equations imply it; kept.
- Examples without a reference (prior-preservation class images) take the frozen UNet's plain self-attention.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass, field

import torch
from diffusers.models.attention_processor import Attention, AttnProcessor2_0
from torch import nn
from torch.nn import functional as F

LAMBDA = 0.2


def level_of(processor_name: str) -> str:
    """The UNet block a processor belongs to: "down_blocks.0", "mid_block", "up_blocks.1"."""
    return processor_name.split(".attentions.")[0]


def self_attention_names(unet) -> list[str]:
    """The frozen UNet's self-attention processors (attn1), by processor name, in its module order (diffusers
    registers up_blocks before mid_block)."""
    return [name for name in unet.attn_processors if name.endswith("attn1.processor")]


def cross_attention_names(unet) -> list[str]:
    """The frozen UNet's cross-attention modules (attn2), by module name, in its module order."""
    return [name.removesuffix(".processor") for name in unet.attn_processors if name.endswith("attn2.processor")]


@dataclass
class InjectionState:
    """What the injected self-attentions read during one UNet forward: f_i per processor name (B, tokens, C), and
    which batch rows have a reference (None: all)."""

    features: dict[str, torch.Tensor] = field(default_factory=dict)
    has_reference: torch.Tensor | None = None

    def clear(self) -> None:
        self.features, self.has_reference = {}, None


def injected_attention(attn, z: torch.Tensor, f: torch.Tensor, lam: float = LAMBDA) -> torch.Tensor:
    """Eq. 7–8 on one diffusers `Attention` (its to_q/to_k/to_v/to_out and heads): z, f (B, N, C) → (B, N, C)."""
    query = attn.to_q(z)
    key = attn.to_k(torch.cat([z, f], dim=1))
    value = attn.to_v(torch.cat([z + lam * f, f], dim=1))
    b, heads = z.shape[0], attn.heads
    q, k, v = (x.view(b, -1, heads, x.shape[-1] // heads).transpose(1, 2) for x in (query, key, value))
    out = F.scaled_dot_product_attention(q, k, v, scale=attn.scale)
    out = out.transpose(1, 2).reshape(b, -1, heads * out.shape[-1]).to(query.dtype)
    return attn.to_out[1](attn.to_out[0](out))


class InjectedSelfAttnProcessor:
    """A self-attention processor of the frozen UNet: Eq. 7–8 with the f_i `state` holds for `name`, the plain
    attention (diffusers' AttnProcessor2_0) where it holds none or for rows without a reference."""

    def __init__(self, name: str, state: InjectionState, lam: float = LAMBDA):
        self.name, self.state, self.lam = name, state, lam
        self.plain = AttnProcessor2_0()

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, *args,
                 **kwargs):
        f = self.state.features.get(self.name)
        if f is None or encoder_hidden_states is not None:
            return self.plain(attn, hidden_states, encoder_hidden_states, attention_mask, temb)
        if hidden_states.ndim != 3 or attention_mask is not None or attn.group_norm is not None \
                or attn.spatial_norm is not None:
            raise ValueError(f"p3s injects into transformer self-attention (tokens, no mask, no norm); {self.name} "
                             "is another kind")
        out = injected_attention(attn, hidden_states, f.to(hidden_states.dtype), self.lam)
        if attn.residual_connection:
            out = out + hidden_states
        out = out / attn.rescale_output_factor
        rows = self.state.has_reference
        if rows is not None and not bool(rows.all()):
            plain = self.plain(attn, hidden_states, None, None, temb)
            out = torch.where(rows.view(-1, 1, 1), out, plain)
        return out


class RecordingCrossAttnProcessor:
    """A cross-attention processor that computes Softmax(Q Kᵀ/√d) explicitly (Eq. 13) and appends it to `maps` as
    (B, heads, pixels, tokens), with its graph; the output is the plain attention's."""

    def __init__(self, maps: list):
        self.maps = maps

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, *args,
                 **kwargs):
        if encoder_hidden_states is None or hidden_states.ndim != 3:
            raise ValueError("RecordingCrossAttnProcessor is for transformer cross-attention layers")
        if attn.norm_cross:
            encoder_hidden_states = attn.norm_encoder_hidden_states(encoder_hidden_states)
        b = hidden_states.shape[0]
        query = attn.head_to_batch_dim(attn.to_q(hidden_states))
        key = attn.head_to_batch_dim(attn.to_k(encoder_hidden_states))
        value = attn.head_to_batch_dim(attn.to_v(encoder_hidden_states))
        probs = attn.get_attention_scores(query, key, None)  # (B·heads, pixels, tokens)
        self.maps.append(probs.view(b, attn.heads, *probs.shape[1:]))
        out = attn.batch_to_head_dim(torch.bmm(probs, value))
        out = attn.to_out[1](attn.to_out[0](out))
        if attn.residual_connection:
            out = out + hidden_states
        return out / attn.rescale_output_factor


class ConditionBranch(nn.Module):
    """The trainable simplified copy of `unet` (see the module docstring) and the zero convs θ_i^z, one per frozen
    self-attention layer. `forward(sample, timesteps, text)` returns the copy's transformer outputs per level
    (B, C, h, w); `layer_features(levels, weight)` turns them into f_i per frozen self-attention processor."""

    def __init__(self, unet):
        super().__init__()
        self.conv_in = copy.deepcopy(unet.conv_in)
        self.time_proj = copy.deepcopy(unet.time_proj)
        self.time_embedding = copy.deepcopy(unet.time_embedding)
        self.down = nn.ModuleList(self._stage(block, "downsamplers") for block in unet.down_blocks)
        self.mid = self._stage(unet.mid_block, None)
        self.up = nn.ModuleList(self._stage(block, "upsamplers") for block in unet.up_blocks)
        self.down_levels = [f"down_blocks.{i}" for i in range(len(unet.down_blocks))]
        self.up_levels = [f"up_blocks.{i}" for i in range(len(unet.up_blocks))]
        # θ_i^z: one zero-initialised 1×1 conv (a linear on tokens) per frozen self-attention layer.
        self.layer_names = self_attention_names(unet)
        self.zero_convs = nn.ModuleDict()
        for name in self.layer_names:
            channels = unet.get_submodule(name.removesuffix(".processor")).to_q.in_features
            conv = nn.Linear(channels, channels)
            nn.init.zeros_(conv.weight)
            nn.init.zeros_(conv.bias)
            self.zero_convs[_key(name)] = conv
        # The copies inherit the frozen UNet's requires_grad and attention processors (an injected or recording one
        # when the UNet already has a condition attached): the copy trains, with plain attention.
        self.requires_grad_(True)
        for module in self.modules():
            if isinstance(module, Attention):
                module.set_processor(AttnProcessor2_0())

    @staticmethod
    def _stage(block, sampler: str | None) -> nn.ModuleDict:
        stage = nn.ModuleDict({"resnet": copy.deepcopy(block.resnets[0])})
        if getattr(block, "attentions", None):
            stage["attention"] = copy.deepcopy(block.attentions[0])
        samplers = getattr(block, sampler, None) if sampler else None
        if samplers:
            stage["sampler"] = copy.deepcopy(samplers[0])
        return stage

    def forward(self, sample: torch.Tensor, timesteps: torch.Tensor, text: torch.Tensor) -> dict[str, torch.Tensor]:
        temb = self.time_proj(timesteps.expand(sample.shape[0])).to(sample.dtype)
        temb = self.time_embedding(temb)
        levels: dict[str, torch.Tensor] = {}
        skips: list[torch.Tensor] = []
        h = self.conv_in(sample)
        for name, stage in zip(self.down_levels, self.down):
            h = self._run(stage, h, temb, text, levels, name)
            skips.append(h)
            if "sampler" in stage:
                h = stage["sampler"](h)
        h = self._run(self.mid, h, temb, text, levels, "mid_block")
        for name, stage, skip in zip(self.up_levels, self.up, reversed(skips)):
            h = self._run(stage, torch.cat([h, skip], dim=1), temb, text, levels, name)
            if "sampler" in stage:
                h = stage["sampler"](h)
        return levels

    @staticmethod
    def _run(stage, h, temb, text, levels, name):
        h = stage["resnet"](h, temb)
        if "attention" in stage:
            h = stage["attention"](h, encoder_hidden_states=text, return_dict=False)[0]
            levels[name] = h
        return h

    def layer_features(self, levels: dict[str, torch.Tensor], weight: torch.Tensor | None = None
                       ) -> dict[str, torch.Tensor]:
        """f_i = ε_t · Z_i(copy feature at layer i's level) as tokens (B, h·w, C), per frozen processor name;
        `weight` ε_t (B,) or None (1)."""
        features = {}
        for name in self.layer_names:
            level = levels.get(level_of(name))
            if level is None:
                raise ValueError(f"the copy has no transformer at {level_of(name)} for {name}")
            f = self.zero_convs[_key(name)](level.flatten(2).transpose(1, 2))
            features[name] = f if weight is None else f * weight.to(f.dtype).view(-1, 1, 1)
        return features

    def cross_attention_modules(self) -> dict[str, nn.Module]:
        """The copy's cross-attention modules (attn2) in forward order, each named as the frozen UNet's module at
        that place ("up_blocks.1.attentions.0.transformer_blocks.0.attn2": the copy of that block's first
        transformer)."""
        modules = {}
        for stages, levels in ((self.down, self.down_levels), ([self.mid], ["mid_block"]), (self.up, self.up_levels)):
            for stage, level in zip(stages, levels):
                if "attention" in stage:
                    for n, m in stage["attention"].named_modules():
                        if n.endswith("attn2"):
                            modules[f"{level}.attentions.0.{n}"] = m
        return modules


def _key(processor_name: str) -> str:
    return processor_name.replace(".", "_")
