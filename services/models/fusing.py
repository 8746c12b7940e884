"""Each training method's saved weights (file names, readers) and how they are fused into a Stable Diffusion
pipeline of the base model, so that plain weights draw the concept: the diffusers export, and from it ONNX,
TensorRT and the generate engines.

train/methods/ writes these files; this module is the one place that reads them back. DreamBooth saves a whole
pipeline (`WHOLE_PIPELINE_METHODS`): its weights are the diffusers export as they are, nothing to fuse.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable

from persona.services.runtime.devices import torch_device
from persona.services.runtime.errors import FailedPrecondition, InvalidArgument

# What each method's `save` writes (diffusers' own layouts where there is one).
LORA_WEIGHTS = "pytorch_lora_weights.safetensors"
# A textual-inversion embedding {token: (n_vectors, hidden)}: ti's weights, Custom Diffusion's token, and the
# parent concept's token saved beside a LoRA that continued from one (CoRe's stage 2).
LEARNED_EMBEDS = "learned_embeds.safetensors"
# Pickled, not safetensors: diffusers' save_attn_procs drops the (empty) self-attention entries from a safetensors
# file, and load_attn_procs then refuses it (processor count mismatch); the .bin keeps them (diffusers' example
# README loads exactly this file).
CUSTOM_DIFFUSION_WEIGHTS = "pytorch_custom_diffusion_weights.bin"
SVDIFF_WEIGHTS = "spectral_shifts.safetensors"
# Written into the SVDiff file's metadata; fusing refuses other formats and newer versions.
SVDIFF_FORMAT = "persona.svdiff"
SVDIFF_FORMAT_VERSION = 1
# SVDiff tensor keys: "unet.<module name>" → that layer's shifts δ (one per singular value); TOKEN_KEY → (1, hidden).
UNET_PREFIX = "unet."
TOKEN_KEY = "token_embedding"
# Methods whose weights are a whole diffusers pipeline.
WHOLE_PIPELINE_METHODS = ("dreambooth",)
# Methods whose weights change how the UNet computes, not what its weights are: nothing to fuse, so no plain
# pipeline, ONNX graph or kohya file draws them; the generate service attaches them. p3s: a trainable condition branch
# run beside the UNet each step (models/p3s/), drawn by its embedded engine or Triton's torch UNet component;
# customcontrast: a concept made without fine-tuning from a CustomContrast encoder, its per-timestep tokens fed to
# parallel cross-attention processors and per-step text states (models/customcontrast/), drawn by the embedded
# engine or Triton's torch customcontrast UNet component.
P3S, CUSTOMCONTRAST = "p3s", "customcontrast"
IN_PROCESS_METHODS = (P3S, CUSTOMCONTRAST)
# Per IN_PROCESS_METHODS method: what its concept keeps, and which of persona's engines draw it.
IN_PROCESS_DRAWING = {
    P3S: ("its condition branch (p3s_condition.safetensors)", "the embedded engine, or Triton with torch components"),
    CUSTOMCONTRAST: ("its token table and visual K'/V' (customcontrast_tokens.safetensors, "
                     "customcontrast_visual_kv.safetensors), attached per draw to the base model's UNet",
                     "the embedded engine, or Triton with torch components"),
}


def in_process_only(method: str, concept_id: str = "") -> str:
    """Why a concept of an IN_PROCESS_METHODS method cannot be exported, and what draws it."""
    which = f"concept {concept_id}" if concept_id else "the concept"
    kept, engines = IN_PROCESS_DRAWING[method]
    return (f"{which} was {'made' if method == CUSTOMCONTRAST else 'trained'} with {method}: {kept} is drawn only "
            f"by persona's generate service (`persona-cli generate {concept_id or 'CONCEPT'} ...`: {engines}); stock "
            "diffusers, kohya/A1111/ComfyUI, ONNX and TensorRT cannot load it, so it has no diffusers, lora, kohya, "
            "onnx or tensorrt export")


def fuse_into_pipeline(method: str, pipe: Any, weights_dir: Path, token: str) -> None:
    """Puts what `method` saved (in `weights_dir`) into `pipe`, a StableDiffusionPipeline of its base model."""
    fuse = FUSERS.get(method)
    if method in IN_PROCESS_METHODS:
        raise FailedPrecondition(in_process_only(method))
    if fuse is None:
        raise InvalidArgument(f"`method` {method} has no weights to fuse into a pipeline: use one of "
                              f"{', '.join(FUSERS)}")
    fuse(pipe, Path(weights_dir), token)


def fuse_lora(pipe, weights_dir: Path, token: str) -> None:
    # A LoRA trained on top of a textual-inversion parent (CoRe's stage 2) carries the parent's token beside it.
    embeds = weights_dir / LEARNED_EMBEDS
    if embeds.exists():
        pipe.load_textual_inversion(str(embeds))
    pipe.load_lora_weights(weights_dir, weight_name=LORA_WEIGHTS)
    pipe.fuse_lora()
    pipe.unload_lora_weights()


def fuse_textual_inversion(pipe, weights_dir: Path, token: str) -> None:
    pipe.load_textual_inversion(str(weights_dir / LEARNED_EMBEDS), token=token)


def fuse_custom_diffusion_weights(pipe, weights_dir: Path, token: str) -> None:
    plain = dict(pipe.unet.attn_processors)
    # diffusers (0.42) sets the loaded processors only when given the pipeline; without `_pipeline` the call
    # reads the file and changes nothing. fuse_custom_diffusion checks that they were set.
    pipe.unet.load_attn_procs(weights_dir, weight_name=CUSTOM_DIFFUSION_WEIGHTS, _pipeline=pipe)
    fuse_custom_diffusion(pipe.unet, plain)
    pipe.load_textual_inversion(str(weights_dir / LEARNED_EMBEDS), token=token)


def fuse_svdiff(pipe, weights_dir: Path, token: str) -> None:
    """Writes W + U diag(ReLU(σ + δ) − σ) Vᵀ into each shifted UNet layer (plain weights, no parametrisation)
    and adds `token` with its trained embedding. The SVDs run on CUDA when there is one (seconds for SD-1.5),
    else on the CPU (minutes); a layer missing or of another shape is FailedPrecondition."""
    import torch

    tensors, shapes = read_spectral_shifts(weights_dir / SVDIFF_WEIGHTS)
    layers = dict(spectral_layers(pipe.unet))
    device = torch_device()
    with torch.no_grad():
        for name, shape in shapes.items():
            module = layers.get(name)
            if module is None or list(module.weight.shape) != shape:
                found = "no such layer" if module is None else f"shape {list(module.weight.shape)}"
                raise FailedPrecondition(
                    f"the spectral shifts of layer {name} were trained on a {shape} weight; this base model has "
                    f"{found}: fuse them into the base model they were trained on")
            weight = module.weight
            u, s, vh = decompose(weight, device)
            delta = tensors[UNET_PREFIX + name].to(device)
            fused = shifted_weight(weight.detach().to(device, torch.float32), u, s, vh, delta)
            weight.copy_(fused.to(weight.device, weight.dtype))
    pipe.load_textual_inversion(tensors[TOKEN_KEY], token=token)


# Method name → how its weights go into a pipeline (WHOLE_PIPELINE_METHODS need none).
FUSERS: dict[str, Callable[[Any, Path, str], None]] = {
    "lora": fuse_lora, "ti": fuse_textual_inversion, "custom_diffusion": fuse_custom_diffusion_weights,
    "svdiff": fuse_svdiff}


# Textual inversion ---------------------------------------------------------------------------------------------

def read_learned_embeds(path: Path):
    """(token, embedding (n_vectors, hidden)) from a learned_embeds.safetensors as textual inversion writes it."""
    from safetensors.torch import load_file

    state = load_file(str(path))
    if len(state) != 1:
        raise InvalidArgument(f"{path.name} holds {len(state)} tokens; a textual-inversion file holds one")
    [(token, embedding)] = state.items()
    return token, embedding.reshape(-1, embedding.shape[-1])


# Custom Diffusion ----------------------------------------------------------------------------------------------

def fuse_custom_diffusion(unet, plain_processors: dict) -> None:
    """Writes the weights of `unet`'s Custom Diffusion processors into its attention layers (K/V, and Q/out where
    they were trained too), then sets `plain_processors` back: a plain UNet that computes the same."""
    import torch
    from diffusers.models.attention_processor import (CustomDiffusionAttnProcessor, CustomDiffusionAttnProcessor2_0,
                                                      CustomDiffusionXFormersAttnProcessor)

    kinds = (CustomDiffusionAttnProcessor, CustomDiffusionAttnProcessor2_0, CustomDiffusionXFormersAttnProcessor)
    processors = unet.attn_processors
    trained = {name: p for name, p in processors.items() if isinstance(p, kinds) and p.train_kv}
    if not trained:
        raise ValueError("the UNet has no Custom Diffusion processors with trained K/V to fuse: were they loaded "
                         "(`unet.load_attn_procs(..., _pipeline=pipe)`)?")
    modules = dict(unet.named_modules())
    with torch.no_grad():
        for name, processor in trained.items():
            attn = modules[name.removesuffix(".processor")]
            attn.to_k.weight.copy_(processor.to_k_custom_diffusion.weight)
            attn.to_v.weight.copy_(processor.to_v_custom_diffusion.weight)
            if processor.train_q_out:
                out, trained_out = attn.to_out[0], processor.to_out_custom_diffusion[0]
                attn.to_q.weight.copy_(processor.to_q_custom_diffusion.weight)
                out.weight.copy_(trained_out.weight)
                if out.bias is not None:
                    out.bias.copy_(trained_out.bias if trained_out.bias is not None else torch.zeros_like(out.bias))
    unet.set_attn_processor(dict(plain_processors))


# SVDiff (Han et al., ICCV 2023): the spectral-shift arithmetic training and fusing share ------------------------

def spectral_layers(unet) -> list:
    """(module name, module) for every nn.Linear and nn.Conv2d of `unet`, in module order: the shifted layers."""
    import torch

    return [(name, module) for name, module in unet.named_modules()
            if isinstance(module, (torch.nn.Linear, torch.nn.Conv2d))]


def decompose(weight, device=None):
    """The reduced SVD (U, σ, Vᵀ) of `weight` seen as a matrix (out, in·kh·kw), in float32 on `device` (default:
    the weight's); U is (out, r), σ (r,) descending, Vᵀ (r, in·kh·kw), r = min of the two."""
    import torch

    matrix = weight.detach().to(device or weight.device, torch.float32).reshape(weight.shape[0], -1)
    u, s, vh = torch.linalg.svd(matrix, full_matrices=False)
    return u, s, vh


def shifted_weight(weight, u, s, vh, delta):
    """W + U diag(ReLU(σ + δ) − σ) Vᵀ, reshaped to `weight`'s shape and dtype: the paper's U diag(ReLU(σ + δ)) Vᵀ
    when U diag(σ) Vᵀ is the SVD of W, and exactly W at δ = 0.

    The shift ReLU(σ + δ) − σ is computed in float32 whatever the buffers' dtype (fp16 buffers on CUDA), so small
    δ are not rounded away before they scale U's columns."""
    import torch

    shift = torch.relu(s.float() + delta.float()) - s.float()
    update = (u * shift.to(u.dtype)) @ vh
    return weight + update.reshape(weight.shape).to(weight.dtype)


def read_spectral_shifts(path: Path) -> tuple[dict, dict]:
    """The tensors of a spectral_shifts.safetensors file and its layers' base shapes {name: [out, in, kh, kw]};
    FailedPrecondition for a file of another format or a newer version."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as handle:
        metadata = handle.metadata() or {}
        tensors = {key: handle.get_tensor(key) for key in handle.keys()}
    if metadata.get("format") != SVDIFF_FORMAT:
        raise FailedPrecondition(f"{path.name} is not a persona SVDiff file (format {metadata.get('format')!r}): "
                                 f"train the concept again with method svdiff")
    if int(metadata.get("format_version", "0")) > SVDIFF_FORMAT_VERSION:
        raise FailedPrecondition(f"{path.name} has SVDiff format version {metadata['format_version']}, newer than "
                                 f"this server's {SVDIFF_FORMAT_VERSION}: upgrade persona")
    shapes = json.loads(metadata["shapes"])
    missing = [name for name in shapes if UNET_PREFIX + name not in tensors] + (
        [TOKEN_KEY] if TOKEN_KEY not in tensors else [])
    if missing:
        raise FailedPrecondition(f"{path.name} lacks tensors {', '.join(missing[:5])}: the file is damaged; train the "
                                 "concept again")
    return tensors, shapes
