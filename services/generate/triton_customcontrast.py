"""A customcontrast concept on Triton: the UNet component that draws it, one denoising step per call, and what the
engine and `sd_pipeline` send it.

The component (`customcontrast_unet_<digest>`, a torch component: each step's text states, image tokens and
location mask are per-step python logic that no ONNX graph or TensorRT engine holds) is the base UNet with the
concept's visual K'/V' attached for the component's lifetime (`AttachedTokens`), the base text encoder and tokenizer
beside it (a step's per-layer text states are the text encoder run with the word tokens in the placeholder slots,
models/customcontrast/text.py) and the concept's two files. A call does what the embedded engine does around one
UNet call (generate/customcontrast.py, the same functions):

    inputs   sample [2B|B, C, h, w], timestep [2B|B]  the loop's UNet input (CFG: the unconditional half first)
             input_ids [B, S]                         the prompts with the identifier as N_t placeholder slots
             negative_ids [B, S]                      the negative prompts (read only with CFG: 2B sample rows)
             location_mask [B, h, w]                  §3.4's mask of the previous step; all ones on the first
                                                      (the gate then multiplies by exactly 1: no mask)
    outputs  out_sample                               the noise prediction
             next_location_mask [B, h, w]             the mask the next step takes

The step's row of the token table is the one nearest its timestep (`nearest_rows`, as embedded), so any scheduler
and step count draws from the one table. `TritonEngine` slots and tokenises the prompts (`prompt_ids`: a prompt
without the identifier is INVALID_ARGUMENT naming `prompts`, as embedded); `sd_pipeline` runs the shared loop over
`ConceptSteps`, which sends each step the draw's ids and the mask the previous step returned. The loop's own text
embeddings go unused (the component makes each layer's), so ConceptSteps skips the text-encoder calls.
"""
from __future__ import annotations

from pathlib import Path

from persona.services.runtime.errors import InvalidArgument

from ..models.customcontrast.concept import AttachedTokens, load_concept, nearest_rows
from .customcontrast import slotted_ids

# The UNet component of a customcontrast concept (triton_models.TORCH_COMPONENTS, triton_repository).
CUSTOMCONTRAST_COMPONENT = "customcontrast_unet"
# Its inputs and outputs beyond the plain UNet graph's sample and timestep, and out_sample.
STEP_INPUTS = (("input_ids", "INT64", [-1, -1]), ("negative_ids", "INT64", [-1, -1]),
               ("location_mask", "FP32", [-1, -1, -1]))
STEP_OUTPUTS = (("next_location_mask", "FP32", [-1, -1, -1]),)
TOKENIZER_FOLDER, TEXT_ENCODER_FOLDER = "tokenizer", "text_encoder"  # in the component's version folder


def prompt_ids(tokenizer, prompts: list[str], identifier: str, num_text_tokens: int):
    """(B, S) token ids of `prompts`, each naming the concept's `identifier` once (else INVALID_ARGUMENT naming
    `prompts`), as the embedded engine tokenises them: the identifier as N_t placeholder slots."""
    return slotted_ids(tokenizer, prompts, identifier, num_text_tokens)[0]


class ConceptUnet:
    """The forward of a customcontrast_unet component: `unet` (on its device, in `dtype`) with the concept in
    `folder` attached for good, and the text encoder and placeholder token of `folder`'s text_encoder/ and
    tokenizer/. Called with the component's inputs as tensors on the UNet's device."""

    def __init__(self, unet, folder: Path, dtype):
        from transformers import CLIPTextModel, CLIPTokenizer

        from ..models.customcontrast.text import PLACEHOLDER

        self.unet, self.dtype, device = unet, dtype, unet.device
        self.text_encoder = CLIPTextModel.from_pretrained(folder / TEXT_ENCODER_FOLDER, dtype=dtype)
        self.text_encoder.to(device).eval().requires_grad_(False)
        tokenizer = CLIPTokenizer.from_pretrained(folder / TOKENIZER_FOLDER)
        self.placeholder_id = tokenizer.convert_tokens_to_ids(f"{PLACEHOLDER}</w>")
        self.tokens = load_concept(folder)
        table = self.tokens.table
        table.image_tokens = table.image_tokens.to(device)
        if table.text_tokens is not None:
            table.text_tokens = table.text_tokens.to(device)
        self.attached = AttachedTokens(unet, self.tokens)

    def __call__(self, sample, timestep, input_ids, negative_ids, location_mask):
        from ..models.customcontrast.conditioning import carry_location_mask, set_step_conditioning
        from ..models.customcontrast.text import placeholder_mask

        input_ids, negative_ids = input_ids.long(), negative_ids.long()
        batch, size = len(input_ids), tuple(sample.shape[-2:])
        if len(sample) not in (batch, 2 * batch) or len(negative_ids) != batch or \
                tuple(location_mask.shape) != (batch, *size) or len(timestep) != len(sample):
            raise InvalidArgument(
                f"`sample` {list(sample.shape)}, `timestep` {list(timestep.shape)}, `input_ids` "
                f"{list(input_ids.shape)}, `negative_ids` {list(negative_ids.shape)} and `location_mask` "
                f"{list(location_mask.shape)} do not fit one step: B prompts, B or 2B (CFG) samples and timesteps, "
                "B negative prompts and a [B, h, w] mask")
        placeholder = placeholder_mask(input_ids, self.placeholder_id, self.tokens.num_text_tokens)
        step = float(timestep[0])
        injection = self.attached.injection
        # All ones is the first step's "no mask yet": None, as the embedded engine's first step runs.
        injection.location_mask = None if bool((location_mask == 1).all()) else location_mask.float()
        set_step_conditioning(injection, self.text_encoder, nearest_rows(self.tokens.table, [step]), int(step),
                              input_ids, placeholder, negative_ids if len(sample) == 2 * batch else None)
        # encoder_hidden_states: any of the right shape (the processors read the injection's per-layer states).
        noise = self.unet(sample.to(self.dtype), timestep.float(), injection.text_states[0],
                          return_dict=False)[0]
        return noise.float(), carry_location_mask(injection, placeholder, size).float()

    def remove(self) -> None:
        self.attached.remove()


class ConceptSteps:
    """sd_pipeline's SamplerModels for one draw of a customcontrast concept: `models` (triton_models.BlsModels)
    whose UNet is the concept's component, each call sent the draw's token ids and the previous step's mask."""

    def __init__(self, models, input_ids, negative_ids):
        self.models, self.input_ids, self.negative_ids = models, input_ids.long(), negative_ids.long()
        self.device, self.latent_channels = models.device, models.latent_channels
        self.vae_scale_factor, self.scaling_factor = models.vae_scale_factor, models.scaling_factor
        self.mask = None

    def encode_text(self, input_ids):
        import torch

        return torch.zeros((len(input_ids), 1, 1), device=self.device)  # unused: the component makes its own

    def predict_noise(self, latents, timestep, text_embeddings):
        import torch

        if self.mask is None:  # the first step: no mask yet (all ones gates nothing)
            self.mask = torch.ones((len(self.input_ids), *latents.shape[-2:]), device=latents.device)
        timesteps = torch.full((latents.shape[0],), float(timestep), dtype=torch.float32, device=latents.device)
        noise, self.mask = self.models.call("unet", {
            "sample": latents.float(), "timestep": timesteps, "input_ids": self.input_ids.to(latents.device),
            "negative_ids": self.negative_ids.to(latents.device), "location_mask": self.mask},
            ("out_sample", "next_location_mask"))
        return noise

    def decode(self, latents):
        return self.models.decode(latents)
