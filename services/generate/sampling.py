"""The one sampling loop: text encoding, classifier-free guidance over the scheduler's steps, VAE decoding.

It is written against three callables (`SamplerModels`), so the same code drives torch modules in-process and
ONNX Runtime sessions inside Triton's python models; the embedded default and the Triton path cannot drift
apart. Step for step it does what diffusers' `StableDiffusionPipeline.__call__` does (same tokenisation,
unconditional batch first, `scale_model_input`, `step(..., eta=0)`, decode of latents / scaling factor), so for
the same weights, seed, scheduler, steps and guidance the images equal the pipeline's.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Protocol, Sequence

# Scheduler names of the API → diffusers classes (configured from the model's scheduler_config.json).
SCHEDULERS = {
    "ddim": "DDIMScheduler",
    "dpmpp": "DPMSolverMultistepScheduler",  # DPM-Solver++ (2M), diffusers' default algorithm_type
    "euler": "EulerDiscreteScheduler",
}
DEFAULT_SCHEDULER = "dpmpp"
DEFAULT_STEPS = 25
DEFAULT_GUIDANCE = 7.5
MAX_STEPS = 500
MAX_SIDE = 2048


class SamplerModels(Protocol):
    """What the loop needs from a Stable Diffusion model; tensors are torch tensors on `device`."""

    device: Any
    # Latent channels and the VAE's downscale factor and latent scaling.
    latent_channels: int
    vae_scale_factor: int
    scaling_factor: float

    def encode_text(self, input_ids) -> Any:
        """(batch, seq) token ids → (batch, seq, dim) last hidden state."""

    def predict_noise(self, latents, timestep, text_embeddings) -> Any:
        """The UNet: (batch, c, h, w) latents, a scalar timestep, embeddings → noise (or v) prediction."""

    def decode(self, latents) -> Any:
        """The VAE decoder on *unscaled* latents (already divided by scaling_factor) → images in [-1, 1]."""


@dataclass(frozen=True)
class SamplingSettings:
    """One image's settings; every field is what the response reports back."""

    prompt: str
    negative_prompt: str = ""
    seed: int = 0
    steps: int = DEFAULT_STEPS
    guidance_scale: float = DEFAULT_GUIDANCE
    scheduler: str = DEFAULT_SCHEDULER
    height: int = 512
    width: int = 512


def scheduler_config(folder) -> dict:
    """The scheduler config of a model folder (diffusers, ONNX export or a Triton concept folder: all keep it at
    scheduler/scheduler_config.json)."""
    import json
    from pathlib import Path

    return json.loads((Path(folder) / "scheduler" / "scheduler_config.json").read_text())


def make_scheduler(name: str, scheduler_config: dict):
    """A fresh diffusers scheduler of `name` configured like the model's own."""
    import diffusers

    if name not in SCHEDULERS:
        raise ValueError(f"unknown scheduler {name!r}: use one of {', '.join(SCHEDULERS)}")
    return getattr(diffusers, SCHEDULERS[name]).from_config(scheduler_config)


def sample(models: SamplerModels, tokenizer, scheduler_config: dict, settings: SamplingSettings,
           on_step: Callable[[int, int], None] | None = None):
    """Draws one image for `settings`; returns it as a PIL image."""
    return sample_batch(models, tokenizer, scheduler_config, [settings], on_step)[0]


def sample_batch(models: SamplerModels, tokenizer, scheduler_config: dict, batch: Sequence[SamplingSettings],
                 on_step: Callable[[int, int], None] | None = None) -> list:
    """Draws one image per entry of `batch` in one pass of the loop (one UNet call per step for all of them);
    returns PIL images in order. Entries may differ in prompt, negative prompt and seed; steps, guidance,
    scheduler and size must be equal (`batch_key` says which settings can share a batch). Image k equals what
    `sample` draws for `batch[k]` alone, as diffusers' pipeline with one generator per image does."""
    import torch

    batch = list(batch)
    if not batch:
        return []
    first = batch[0]
    if any(batch_key(s) != batch_key(first) for s in batch):
        raise ValueError("settings in one batch must share steps, guidance_scale, scheduler, height and width")
    with torch.inference_mode():
        scheduler = make_scheduler(first.scheduler, scheduler_config)
        do_guidance = first.guidance_scale > 1.0
        embeddings = _encode(models, tokenizer, [s.prompt for s in batch])
        if do_guidance:  # the unconditional half first, as diffusers orders the CFG batch
            embeddings = torch.cat([_encode(models, tokenizer, [s.negative_prompt for s in batch]), embeddings])

        # Starting noise from one CPU generator per image: the same seed gives the same image on any device and
        # in any batch.
        shape = (1, models.latent_channels, first.height // models.vae_scale_factor,
                 first.width // models.vae_scale_factor)
        generators = [torch.Generator("cpu").manual_seed(s.seed) for s in batch]
        latents = torch.cat([torch.randn(shape, generator=g, dtype=torch.float32) for g in generators])
        latents = latents.to(models.device)
        scheduler.set_timesteps(first.steps, device=models.device)
        latents = latents * scheduler.init_noise_sigma
        step_kwargs = _step_kwargs(scheduler, generators if len(generators) > 1 else generators[0])

        timesteps = scheduler.timesteps
        for index, t in enumerate(timesteps):
            model_input = torch.cat([latents] * 2) if do_guidance else latents
            model_input = scheduler.scale_model_input(model_input, t)
            noise = models.predict_noise(model_input, t, embeddings).float()
            if do_guidance:
                uncond, text = noise.chunk(2)
                noise = uncond + first.guidance_scale * (text - uncond)
            latents = scheduler.step(noise, t, latents, **step_kwargs).prev_sample
            if on_step is not None:
                on_step(index + 1, len(timesteps))

        images = models.decode(latents / models.scaling_factor).float()
        return to_pil(images)


def batch_key(settings: SamplingSettings) -> tuple:
    """Settings with equal keys can be drawn in one batch."""
    return (settings.steps, settings.guidance_scale, settings.scheduler, settings.height, settings.width)


def _encode(models: SamplerModels, tokenizer, texts: list[str]):
    ids = tokenizer(texts, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                    return_tensors="pt").input_ids
    return models.encode_text(ids.to(models.device)).float()


def _step_kwargs(scheduler, generator) -> dict:
    """eta=0 (deterministic DDIM) and a generator where the scheduler's step takes them, as the pipeline passes."""
    import inspect

    accepted = set(inspect.signature(scheduler.step).parameters)
    kwargs = {}
    if "eta" in accepted:
        kwargs["eta"] = 0.0
    if "generator" in accepted:
        kwargs["generator"] = generator
    return kwargs


def to_pil(images) -> list:
    """(batch, 3, H, W) tensors in [-1, 1] → PIL images, as diffusers' VaeImageProcessor.postprocess("pil")."""
    import numpy as np
    from PIL import Image

    array = (images / 2 + 0.5).clamp(0, 1).cpu().permute(0, 2, 3, 1).float().numpy()
    return [Image.fromarray((a * 255).round().astype(np.uint8)) for a in array]


class TorchModels:
    """SamplerModels over the torch modules of a diffusers Stable Diffusion folder (the in-process engine)."""

    def __init__(self, text_encoder, unet, vae, device, dtype=None):
        self.text_encoder, self.unet, self.vae = text_encoder, unet, vae
        self.device = device
        self.dtype = dtype or next(unet.parameters()).dtype
        self.latent_channels = unet.config.in_channels
        self.vae_scale_factor = 2 ** (len(vae.config.block_out_channels) - 1)
        self.scaling_factor = vae.config.scaling_factor

    @classmethod
    def from_folder(cls, folder, device: str = "cpu", dtype=None) -> "TorchModels":
        import torch
        from diffusers import AutoencoderKL, UNet2DConditionModel
        from transformers import CLIPTextModel

        from persona.services.runtime.model_loading import loading_models

        dtype = dtype or torch.float32
        with loading_models():  # one load at a time in the process (runtime.model_loading says why)
            parts = dict(
                text_encoder=CLIPTextModel.from_pretrained(folder, subfolder="text_encoder", dtype=dtype),
                unet=UNet2DConditionModel.from_pretrained(folder, subfolder="unet", dtype=dtype),
                vae=AutoencoderKL.from_pretrained(folder, subfolder="vae", dtype=dtype),
            )
        for module in parts.values():
            module.to(device).eval()
        return cls(**parts, device=torch.device(device), dtype=dtype)

    def encode_text(self, input_ids):
        return self.text_encoder(input_ids)[0]

    def predict_noise(self, latents, timestep, text_embeddings):
        return self.unet(latents.to(self.dtype), timestep, text_embeddings.to(self.dtype)).sample

    def decode(self, latents):
        return self.vae.decode(latents.to(self.dtype)).sample
