"""What each ONNX graph of a Stable Diffusion export is: the three modules loaded in fp32 (the parity reference),
the thin wrappers whose forward is exactly the graph (text encoder → hidden states, UNet → noise prediction, VAE
decode without scaling), and per graph its input/output names, dynamic axes and the inputs it is traced and checked
with (onnx_export.py's module docstring gives the choices). onnx_export.py exports and checks them.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

# Seed of the random inputs graphs are traced and parity-checked with.
VERIFY_SEED = 0


def load_modules(model_dir: Path, torch_device) -> dict:
    import torch
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel

    from persona.services.runtime.model_loading import loading_models

    # fp32 always: the reference for parity, and the converter makes fp16 from an fp32 graph.
    with loading_models():  # one load at a time in the process (runtime.model_loading says why)
        modules = dict(
            text_encoder=CLIPTextModel.from_pretrained(model_dir, subfolder="text_encoder", dtype=torch.float32),
            unet=UNet2DConditionModel.from_pretrained(model_dir, subfolder="unet", dtype=torch.float32),
            vae=AutoencoderKL.from_pretrained(model_dir, subfolder="vae", dtype=torch.float32),
        )
    for module in modules.values():
        module.to(torch_device).eval().requires_grad_(False)
    return modules


def _wrap_text_encoder(text_encoder):
    import torch

    class TextEncoder(torch.nn.Module):
        """input_ids → (last_hidden_state, pooler_output)."""

        def __init__(self):
            super().__init__()
            self.text_encoder = text_encoder

        def forward(self, input_ids):
            out = self.text_encoder(input_ids=input_ids, return_dict=True)
            return out.last_hidden_state, out.pooler_output

    return TextEncoder()


def _wrap_unet(unet):
    import torch

    class UNet(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.unet = unet

        def forward(self, sample, timestep, encoder_hidden_states):
            return self.unet(sample, timestep, encoder_hidden_states, return_dict=False)[0]

    return UNet()


def _wrap_vae_decoder(vae):
    import torch

    class VaeDecoder(torch.nn.Module):
        """vae.decode on latents already divided by scaling_factor (the caller divides)."""

        def __init__(self):
            super().__init__()
            self.vae = vae

        def forward(self, latent_sample):
            return self.vae.decode(latent_sample, return_dict=False)[0]

    return VaeDecoder()


@dataclass
class GraphSpec:
    name: str
    module: Any
    input_names: list[str]
    output_names: list[str]
    dynamic_axes: dict[str, dict[int, str]]
    export_inputs: tuple  # traced with these
    verify_inputs: tuple  # compared on these (another batch and size than traced, so dynamic axes are exercised)
    always_external: bool = False


def graph_specs(modules: dict, torch_device) -> list[GraphSpec]:
    import torch

    text_encoder, unet, vae = modules["text_encoder"], modules["unet"], modules["vae"]
    generator = torch.Generator("cpu").manual_seed(VERIFY_SEED)

    def randn(*shape):
        return torch.randn(*shape, generator=generator, dtype=torch.float32).to(torch_device)

    config = text_encoder.config
    seq = config.max_position_embeddings
    vocab = config.vocab_size

    def ids(batch, length):
        tokens = torch.randint(0, vocab, (batch, length), generator=generator, dtype=torch.int64)
        tokens[:, 0] = config.bos_token_id if 0 <= config.bos_token_id < vocab else 0
        tokens[:, -1] = config.eos_token_id if 0 <= config.eos_token_id < vocab else vocab - 1
        return tokens.to(torch_device)

    channels = unet.config.in_channels
    # Traced at a side that is not a multiple of the UNet's total upsampling (see module docstring).
    up_factor = 2 ** unet.num_upsamplers
    traced_side = up_factor + 1
    verify_h, verify_w = 2 * up_factor, up_factor  # a multiple, non-square: the common case
    cross_dim = unet.config.cross_attention_dim

    text_spec = GraphSpec(
        name="text_encoder",
        module=_wrap_text_encoder(text_encoder),
        input_names=["input_ids"],
        output_names=["last_hidden_state", "pooler_output"],
        dynamic_axes={"input_ids": {0: "batch", 1: "sequence"},
                      "last_hidden_state": {0: "batch", 1: "sequence"},
                      "pooler_output": {0: "batch"}},
        export_inputs=(ids(1, seq),),
        verify_inputs=(ids(2, seq),),
    )
    unet_spec = GraphSpec(
        name="unet",
        module=_wrap_unet(unet),
        input_names=["sample", "timestep", "encoder_hidden_states"],
        output_names=["out_sample"],
        dynamic_axes={"sample": {0: "batch", 2: "height", 3: "width"},
                      "timestep": {0: "batch"},
                      "encoder_hidden_states": {0: "batch", 1: "sequence"},
                      "out_sample": {0: "batch", 2: "height", 3: "width"}},
        export_inputs=(randn(1, channels, traced_side, traced_side),
                       torch.tensor([500.0], dtype=torch.float32, device=torch_device),
                       randn(1, seq, cross_dim)),
        verify_inputs=(randn(2, channels, verify_h, verify_w),
                       torch.tensor([981.0, 1.0], dtype=torch.float32, device=torch_device),
                       randn(2, seq, cross_dim)),
        always_external=True,
    )
    latent = vae.config.latent_channels
    vae_spec = GraphSpec(
        name="vae_decoder",
        module=_wrap_vae_decoder(vae),
        input_names=["latent_sample"],
        output_names=["sample"],
        dynamic_axes={"latent_sample": {0: "batch", 2: "height", 3: "width"},
                      "sample": {0: "batch", 2: "height", 3: "width"}},
        export_inputs=(randn(1, latent, traced_side, traced_side),),
        verify_inputs=(randn(2, latent, verify_h, verify_w),),
    )
    return [text_spec, unet_spec, vae_spec]
