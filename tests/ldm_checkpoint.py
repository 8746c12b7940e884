"""Writes a diffusers Stable Diffusion folder as one original-layout (A1111/ComfyUI) checkpoint, for tests of single
files.

The inverse of diffusers' single-file conversion for SD-1.x-shaped models of any depth: UNet keys under
`model.diffusion_model.`, VAE under `first_stage_model.` (attention as 1x1 convolutions), the CLIP text encoder under
`cond_stage_model.transformer.`.
"""
from __future__ import annotations

from pathlib import Path


def _unet_prefixes(config: dict) -> list[tuple[str, str]]:
    """(original, diffusers) key prefixes of the UNet's blocks, from its config."""
    layers = config["layers_per_block"]
    down_types, up_types = config["down_block_types"], config["up_block_types"]
    pairs = [("time_embed.0.", "time_embedding.linear_1."), ("time_embed.2.", "time_embedding.linear_2."),
             ("input_blocks.0.0.", "conv_in."), ("out.0.", "conv_norm_out."), ("out.2.", "conv_out."),
             ("middle_block.1.", "mid_block.attentions.0.")]
    for j in range(2):
        pairs.append((f"middle_block.{2 * j}.", f"mid_block.resnets.{j}."))
    for i, kind in enumerate(down_types):
        for j in range(layers):
            pairs.append((f"input_blocks.{(layers + 1) * i + j + 1}.0.", f"down_blocks.{i}.resnets.{j}."))
            if kind.startswith("CrossAttn"):
                pairs.append((f"input_blocks.{(layers + 1) * i + j + 1}.1.", f"down_blocks.{i}.attentions.{j}."))
        if i < len(down_types) - 1:
            pairs.append((f"input_blocks.{(layers + 1) * (i + 1)}.0.op.", f"down_blocks.{i}.downsamplers.0.conv."))
    for i, kind in enumerate(up_types):
        for j in range(layers + 1):
            pairs.append((f"output_blocks.{(layers + 1) * i + j}.0.", f"up_blocks.{i}.resnets.{j}."))
            if kind.startswith("CrossAttn"):
                pairs.append((f"output_blocks.{(layers + 1) * i + j}.1.", f"up_blocks.{i}.attentions.{j}."))
        if i < len(up_types) - 1:
            slot = 2 if kind.startswith("CrossAttn") else 1
            pairs.append((f"output_blocks.{(layers + 1) * i + layers}.{slot}.", f"up_blocks.{i}.upsamplers.0."))
    return pairs


_RESNET = [("in_layers.0", "norm1"), ("in_layers.2", "conv1"), ("out_layers.0", "norm2"), ("out_layers.3", "conv2"),
           ("emb_layers.1", "time_emb_proj"), ("skip_connection", "conv_shortcut")]


def _vae_prefixes(config: dict) -> list[tuple[str, str]]:
    blocks, layers = len(config["block_out_channels"]), config["layers_per_block"]
    pairs = []
    for side in ("encoder", "decoder"):
        pairs += [(f"{side}.mid.attn_1.", f"{side}.mid_block.attentions.0."),
                  (f"{side}.mid.block_1.", f"{side}.mid_block.resnets.0."),
                  (f"{side}.mid.block_2.", f"{side}.mid_block.resnets.1."),
                  (f"{side}.norm_out.", f"{side}.conv_norm_out.")]
    for i in range(blocks):
        for j in range(layers):
            pairs.append((f"encoder.down.{i}.block.{j}.", f"encoder.down_blocks.{i}.resnets.{j}."))
        for j in range(layers + 1):
            pairs.append((f"decoder.up.{blocks - 1 - i}.block.{j}.", f"decoder.up_blocks.{i}.resnets.{j}."))
        if i < blocks - 1:
            pairs.append((f"encoder.down.{i}.downsample.", f"encoder.down_blocks.{i}.downsamplers.0."))
            pairs.append((f"decoder.up.{blocks - 1 - i}.upsample.", f"decoder.up_blocks.{i}.upsamplers.0."))
    return pairs


_VAE_RESNET = [("nin_shortcut", "conv_shortcut")]
_VAE_ATTENTION = [("norm", "group_norm"), ("q", "to_q"), ("k", "to_k"), ("v", "to_v"), ("proj_out", "to_out.0")]


def _rename(key: str, prefixes: list[tuple[str, str]], inner: dict[str, list[tuple[str, str]]]) -> str:
    """`key` with its diffusers block prefix replaced by the original one, and the name inside the block too
    (`inner`: a marker in the diffusers prefix -> (original, diffusers) names of that block's layers)."""
    for original, diffusers in prefixes:
        if key.startswith(diffusers):
            rest = key[len(diffusers):]
            for marker, names in inner.items():
                if marker in diffusers:
                    for old, new in names:
                        if rest.startswith(new + "."):
                            rest = old + rest[len(new):]
                            break
            return original + rest
    return key


def ldm_state_dict(folder: Path) -> dict:
    """The original-layout state dict of the diffusers folder `folder` (tensors in their stored dtype)."""
    import json

    from safetensors.torch import load_file

    folder = Path(folder)
    out = {}
    unet_prefixes = _unet_prefixes(json.loads((folder / "unet" / "config.json").read_text()))
    for key, value in load_file(folder / "unet" / "diffusion_pytorch_model.safetensors").items():
        out["model.diffusion_model." + _rename(key, unet_prefixes, {".resnets.": _RESNET})] = value
    vae_prefixes = _vae_prefixes(json.loads((folder / "vae" / "config.json").read_text()))
    for key, value in load_file(folder / "vae" / "diffusion_pytorch_model.safetensors").items():
        renamed = _rename(key, vae_prefixes, {".resnets.": _VAE_RESNET, ".attentions.": _VAE_ATTENTION})
        if ".attn_1." in renamed and value.ndim == 2:
            value = value[:, :, None, None]  # the original VAE attention is 1x1 convolutions
        out["first_stage_model." + renamed] = value
    for key, value in load_file(folder / "text_encoder" / "model.safetensors").items():
        # transformers 5 saves CLIPTextModel without its `text_model.` prefix; the original layout has it.
        out["cond_stage_model.transformer." + ("" if key.startswith("text_model.") else "text_model.") + key] = value
    return out


def write_single_file(folder: Path, target: Path) -> Path:
    """Saves `folder` as one `.safetensors` (or pickled `.ckpt` with a "state_dict", as the original repos do)."""
    state = {k: v.contiguous() for k, v in ldm_state_dict(folder).items()}
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    if target.suffix == ".ckpt":
        import torch

        torch.save({"state_dict": state}, target)
    else:
        from safetensors.torch import save_file

        save_file(state, str(target))
    return target
