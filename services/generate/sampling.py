"""The one sampling loop: text encoding, classifier-free guidance over the scheduler's steps, VAE decoding.

It is written against three callables (`SamplerModels`), so the same code drives torch modules in-process and
ONNX Runtime sessions inside Triton's python models; the embedded default and the Triton path cannot drift
apart. Step for step it does what diffusers' `StableDiffusionPipeline.__call__` does (same tokenisation,
unconditional batch first, `scale_model_input`, `step(..., eta=0)`, decode of latents / scaling factor), so for
the same weights, seed, scheduler, steps and guidance the images equal the pipeline's.
"""
from __future__ import annotations

import contextlib
from dataclasses import astuple, dataclass
from typing import Any, Callable, Iterator, Protocol, Sequence

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


@dataclass(frozen=True)
class LoopSettings:
    """What every image of one pass of the loop shares (images differ only in prompt, negative prompt and seed)."""

    steps: int
    guidance_scale: float
    scheduler: str
    height: int
    width: int

    @classmethod
    def of(cls, settings: SamplingSettings) -> "LoopSettings":
        return cls(settings.steps, settings.guidance_scale, settings.scheduler, settings.height, settings.width)


def sample(models: SamplerModels, tokenizer, scheduler_config: dict, settings: SamplingSettings,
           on_step: Callable[[int, int], None] | None = None):
    """Draws one image for `settings`; returns it as a PIL image."""
    return sample_batch(models, tokenizer, scheduler_config, [settings], on_step)[0]


def sample_batch(models: SamplerModels, tokenizer, scheduler_config: dict, batch: Sequence[SamplingSettings],
                 on_step: Callable[[int, int], None] | None = None, static: bool = True) -> list:
    """Draws one image per entry of `batch` in one pass of the loop (one UNet call per step for all of them);
    returns PIL images in order. Entries may differ in prompt, negative prompt and seed; steps, guidance,
    scheduler and size must be equal (`batch_key` says which settings can share a batch). Image k equals what
    `sample` draws for `batch[k]` alone, as diffusers' pipeline with one generator per image does. `static`: as
    `sample_ids` takes it."""
    batch = list(batch)
    if not batch:
        return []
    loop = LoopSettings.of(batch[0])
    if any(LoopSettings.of(s) != loop for s in batch):
        raise ValueError("settings in one batch must share steps, guidance_scale, scheduler, height and width")
    pixels = sample_ids(models, scheduler_config, loop, tokenize(tokenizer, [s.prompt for s in batch]),
                        tokenize(tokenizer, [s.negative_prompt for s in batch]), [s.seed for s in batch], on_step,
                        static)
    return to_pil(pixels)


def tokenize(tokenizer, texts: Sequence[str]):
    """(batch, model_max_length) int64 token ids, padded and truncated as diffusers' pipeline does."""
    return tokenizer(list(texts), padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                     return_tensors="pt").input_ids


def sample_ids(models: SamplerModels, scheduler_config: dict, loop: LoopSettings, prompt_ids, negative_ids,
               seeds: Sequence[int], on_step: Callable[[int, int], None] | None = None, static: bool = True):
    """The loop on token ids (`tokenize`; negative ids are used only with guidance > 1): one image per seed, as
    (batch, height, width, RGB) uint8 pixels (a numpy array). `static`: run the steps on static buffers where the
    scheduler allows (denoise.py: the same images; on CUDA, with `models.cuda_graphs`, replayed from one CUDA graph
    per shape); False: the plain loop."""
    import torch

    from . import denoise

    with torch.inference_mode():
        scheduler = make_scheduler(loop.scheduler, scheduler_config)
        do_guidance = loop.guidance_scale > 1.0
        embeddings = _encode(models, prompt_ids)
        if do_guidance:  # the unconditional half first, as diffusers orders the CFG batch
            embeddings = torch.cat([_encode(models, negative_ids), embeddings])

        # Starting noise from one CPU generator per image: the same seed gives the same image on any device and
        # in any batch.
        shape = (1, models.latent_channels, loop.height // models.vae_scale_factor,
                 loop.width // models.vae_scale_factor)
        generators = [torch.Generator("cpu").manual_seed(int(seed)) for seed in seeds]
        latents = torch.cat([torch.randn(shape, generator=g, dtype=torch.float32) for g in generators])
        latents = latents.to(models.device)
        scheduler.set_timesteps(loop.steps, device=models.device)
        latents = latents * scheduler.init_noise_sigma

        if static and denoise.supports(scheduler):
            steps = denoise.denoiser(models, latents, embeddings, do_guidance, scheduler.config.prediction_type)
            latents = steps.run(latents, embeddings, loop.guidance_scale, scheduler.timesteps,
                                denoise.ddim_coefficients(scheduler), on_step)
        else:
            step_kwargs = _step_kwargs(scheduler, generators if len(generators) > 1 else generators[0])
            for index, t in enumerate(scheduler.timesteps):
                model_input = torch.cat([latents] * 2) if do_guidance else latents
                model_input = scheduler.scale_model_input(model_input, t)
                noise = models.predict_noise(model_input, t, embeddings).float()
                if do_guidance:
                    uncond, text = noise.chunk(2)
                    noise = uncond + loop.guidance_scale * (text - uncond)
                latents = scheduler.step(noise, t, latents, **step_kwargs).prev_sample
                if on_step is not None:
                    on_step(index + 1, len(scheduler.timesteps))

        images = models.decode(latents / models.scaling_factor).float()
        return to_pixels(images)


def batch_key(settings: SamplingSettings) -> tuple:
    """Settings with equal keys can be drawn in one batch."""
    return astuple(LoopSettings.of(settings))


def _encode(models: SamplerModels, ids):
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


def to_pixels(images):
    """(batch, 3, H, W) tensors in [-1, 1] → (batch, H, W, 3) uint8 pixels, as diffusers'
    VaeImageProcessor.postprocess("pil") rounds them."""
    import numpy as np

    array = (images / 2 + 0.5).clamp(0, 1).cpu().permute(0, 2, 3, 1).float().numpy()
    return (array * 255).round().astype(np.uint8)


def to_pil(pixels) -> list:
    """(batch, H, W, 3) uint8 pixels → PIL images."""
    from PIL import Image

    return [Image.fromarray(image) for image in pixels]


class TorchModels:
    """SamplerModels over the torch modules of a diffusers Stable Diffusion folder (the in-process engine).

    `cuda_graphs`: on CUDA, each shape's denoising step is captured once and replayed (denoise.py); off by default
    because hooks on the modules (evaluate's attention maps) would only see the capture. `compile_unet` adds
    torch.compile (inductor) under that graph; `load_weights` swaps in a model of the same architecture in place."""

    COMPONENTS = ("text_encoder", "unet", "vae")

    def __init__(self, text_encoder, unet, vae, device, dtype=None, cuda_graphs: bool = False):
        import torch

        self.text_encoder, self.unet, self.vae = text_encoder, unet, vae
        self.device = torch.device(device)
        self.dtype = dtype or next(unet.parameters()).dtype
        self.latent_channels = unet.config.in_channels
        self.vae_scale_factor = 2 ** (len(vae.config.block_out_channels) - 1)
        self.scaling_factor = vae.config.scaling_factor
        self.cuda_graphs = cuda_graphs and self.device.type == "cuda"
        self._unet_forward = unet

    @classmethod
    def from_folder(cls, folder, device: str = "cpu", dtype=None, cuda_graphs: bool = False) -> "TorchModels":
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
        return cls(**parts, device=torch.device(device), dtype=dtype, cuda_graphs=cuda_graphs)

    def compile_unet(self, cache_dir=None) -> None:
        """torch.compile the UNet (inductor's default mode: max-autotune compiles for > 9 minutes on an H100), its
        kernels cached under `cache_dir` (TORCHINDUCTOR_CACHE_DIR unless already set) so a restart reuses them;
        the CUDA graph of the whole step (cuda_graphs) still removes the launches."""
        import os

        import torch

        if cache_dir is not None:
            os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", str(cache_dir))
        self._unet_forward = torch.compile(self.unet, fullgraph=True, dynamic=False)

    def load_weights(self, folder) -> None:
        """Copies the weights of `folder` (a diffusers folder of the same architecture: a concept of the same base)
        into these modules in place, so captured CUDA graphs draw the new model with no new capture; ValueError
        when the architectures differ (then these modules may hold a mix: drop them)."""
        import json
        from pathlib import Path

        from safetensors.torch import load_file

        from .denoise import copy_weights_in_place

        folder = Path(folder)
        for name in self.COMPONENTS:
            module = getattr(self, name)
            config = json.loads((folder / name / "config.json").read_text())
            own = {k: v for k, v in module.config.to_dict().items() if not k.startswith("_")} if hasattr(
                module.config, "to_dict") else dict(module.config)
            differing = sorted(k for k, v in config.items() if not k.startswith("_") and k in own and own[k] != v
                               and k not in ("torch_dtype", "dtype", "transformers_version"))
            if differing:
                raise ValueError(f"{folder / name} differs in architecture ({', '.join(differing[:3])})")
            files = sorted(p for p in (folder / name).glob("*.safetensors") if ".fp16." not in p.name)
            if not files:
                raise ValueError(f"{folder / name} has no safetensors weights")
            state = {}
            for file in files:
                state.update(load_file(file, device=str(self.device)))
            copy_weights_in_place(module, state)

    @contextlib.contextmanager
    def eager_unet(self) -> Iterator[None]:
        """Inside, `predict_noise` calls the UNet module itself, not its compiled form (compile_unet), so hooks and
        attention processors set on it for the while (a p3s condition) run as set."""
        compiled, self._unet_forward = self._unet_forward, self.unet
        try:
            yield
        finally:
            self._unet_forward = compiled

    def encode_text(self, input_ids):
        return self.text_encoder(input_ids)[0]

    def predict_noise(self, latents, timestep, text_embeddings):
        return self._unet_forward(latents.to(self.dtype), timestep, text_embeddings.to(self.dtype),
                                  return_dict=False)[0]

    def decode(self, latents):
        return self.vae.decode(latents.to(self.dtype)).sample
