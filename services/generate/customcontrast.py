"""Drawing a customcontrast concept in-process (the embedded engine): the shared loop (sampling.sample_ids) over its
base model, with the concept's visual K'/V' attached to the UNet for the batch only and, around each UNet call, the
step's text states and image tokens set and §3.4's location mask carried to the next step
(models/customcontrast/conditioning.py). The prompt's identifier becomes the placeholder slots the word tokens fill;
each step takes the concept table's row nearest its timestep. On Triton a `customcontrast_unet` component makes the same
calls around its one UNet call per step (triton_customcontrast.py)."""
from __future__ import annotations

from typing import Sequence

from ..models.customcontrast.concept import AttachedTokens, ConceptTokens, nearest_rows, slot_prompt
from . import sampling
from .sampling import LoopSettings, SamplingSettings


class ConditionedModels:
    """SamplerModels around `models` (sampling.TorchModels) whose `predict_noise` sets the concept's conditioning for
    its timestep first and carries the location mask after: the loop itself runs unchanged."""

    def __init__(self, models, attached: AttachedTokens, table, prompt_ids, placeholder, negative_ids,
                 latent_size: tuple[int, int]):
        self.models, self.injection, self.table = models, attached.injection, table
        self.prompt_ids, self.placeholder, self.negative_ids = prompt_ids, placeholder, negative_ids
        self.latent_size = latent_size
        self.device, self.latent_channels = models.device, models.latent_channels
        self.vae_scale_factor, self.scaling_factor = models.vae_scale_factor, models.scaling_factor

    def encode_text(self, input_ids):
        return self.models.encode_text(input_ids)  # the loop's embeddings; the processors read the injection's

    def predict_noise(self, latents, timestep, text_embeddings):
        from ..models.customcontrast.conditioning import carry_location_mask, set_step_conditioning

        set_step_conditioning(self.injection, self.models.text_encoder, self.table, int(timestep), self.prompt_ids,
                              self.placeholder, self.negative_ids)
        noise = self.models.predict_noise(latents, timestep, text_embeddings)
        carry_location_mask(self.injection, self.placeholder, self.latent_size)
        return noise

    def decode(self, latents):
        return self.models.decode(latents)


def slotted_ids(tokenizer, prompts: Sequence[str], identifier: str, num_text_tokens: int):
    """((B, S) token ids, (B, S) placeholder mask) of `prompts`, each naming the concept's `identifier` once (else
    INVALID_ARGUMENT naming `prompts`): the identifier as `num_text_tokens` placeholder slots. Both engines' way."""
    from ..models.customcontrast.text import placeholder_ids  # torch: with the first draw, not at import

    slotted = [slot_prompt(prompt, identifier, num_text_tokens) for prompt in prompts]
    return placeholder_ids(tokenizer, slotted, num_text_tokens)


def draw(models, tokenizer, scheduler_config: dict, batch: Sequence[SamplingSettings],
         tokens: ConceptTokens) -> list:
    """PIL images of `batch` (entries sharing `sampling.batch_key`), each prompt naming the concept's identifier
    once (else INVALID_ARGUMENT naming `prompts`)."""
    batch = list(batch)
    loop = LoopSettings.of(batch[0])
    if any(LoopSettings.of(s) != loop for s in batch):
        raise ValueError("settings in one batch must share steps, guidance_scale, scheduler, height and width")
    prompt_ids, placeholder = slotted_ids(tokenizer, [s.prompt for s in batch], tokens.identifier,
                                          tokens.num_text_tokens)
    negative_ids = sampling.tokenize(tokenizer, [s.negative_prompt for s in batch])
    scheduler = sampling.make_scheduler(loop.scheduler, scheduler_config)
    scheduler.set_timesteps(loop.steps)  # the loop's own schedule: the rows its steps will ask for
    table = nearest_rows(tokens.table, scheduler.timesteps)
    device = models.device
    table.image_tokens = table.image_tokens.to(device)
    if table.text_tokens is not None:
        table.text_tokens = table.text_tokens.to(device)
    latent_size = (loop.height // models.vae_scale_factor, loop.width // models.vae_scale_factor)
    attached = AttachedTokens(models.unet, tokens)
    try:
        conditioned = ConditionedModels(models, attached, table, prompt_ids.to(device), placeholder.to(device),
                                        negative_ids.to(device) if loop.guidance_scale > 1.0 else None, latent_size)
        # The plain loop on the eager UNet: a CUDA graph or a compiled UNet would replay what they captured without
        # the per-step tokens.
        with models.eager_unet():
            pixels = sampling.sample_ids(conditioned, scheduler_config, loop, prompt_ids, negative_ids,
                                         [s.seed for s in batch], static=False)
    finally:
        attached.remove()
    return sampling.to_pil(pixels)
