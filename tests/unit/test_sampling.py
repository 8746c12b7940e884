"""The sampling loop equals diffusers' StableDiffusionPipeline for the same weights, seed, scheduler, steps, guidance."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from persona.services.generate.sampling import SCHEDULERS, SamplingSettings, TorchModels, make_scheduler, sample


@pytest.fixture(scope="module")
def pipe(tiny_model):
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(tiny_model, safety_checker=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.mark.parametrize("scheduler", list(SCHEDULERS))
@pytest.mark.parametrize("guidance", [7.5, 1.0])
def test_equals_the_diffusers_pipeline(pipe, scheduler, guidance):
    settings = SamplingSettings(prompt="a photo of sks dog on the beach", negative_prompt="blurry", seed=3, steps=4,
                                guidance_scale=guidance, scheduler=scheduler, height=64, width=48)
    models = TorchModels(pipe.text_encoder, pipe.unet, pipe.vae, device=torch.device("cpu"))
    ours = np.asarray(sample(models, pipe.tokenizer, dict(pipe.scheduler.config), settings), dtype=np.int16)

    pipe.scheduler = make_scheduler(scheduler, dict(pipe.scheduler.config))
    theirs = pipe(settings.prompt, negative_prompt=settings.negative_prompt, num_inference_steps=settings.steps,
                  guidance_scale=guidance, height=64, width=48, generator=torch.Generator("cpu").manual_seed(3),
                  output_type="pil").images[0]
    assert ours.shape == (64, 48, 3)
    assert np.abs(ours - np.asarray(theirs, dtype=np.int16)).max() <= 1  # 8-bit pixels; rounding at most


def test_seed_decides_the_image(pipe):
    models = TorchModels(pipe.text_encoder, pipe.unet, pipe.vae, device=torch.device("cpu"))
    config = dict(pipe.scheduler.config)
    a, b, c = (np.asarray(sample(models, pipe.tokenizer, config, SamplingSettings("a dog", seed=s, steps=2,
                                                                                   height=32, width=32)))
               for s in (1, 1, 2))
    assert (a == b).all() and not (a == c).all()


def test_unknown_scheduler_is_named():
    with pytest.raises(ValueError, match="heun"):
        make_scheduler("heun", {})
