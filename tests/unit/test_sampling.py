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


@pytest.mark.parametrize("scheduler", ["ddim", "euler"])
def test_a_batch_equals_its_images_drawn_alone_and_the_pipeline_with_a_generator_list(pipe, scheduler):
    from persona.services.generate.sampling import sample_batch

    models = TorchModels(pipe.text_encoder, pipe.unet, pipe.vae, device=torch.device("cpu"))
    config = dict(pipe.scheduler.config)
    batch = [SamplingSettings("a sks dog on the beach", negative_prompt="blurry", seed=4, steps=3, height=32,
                              width=32, scheduler=scheduler),
             SamplingSettings("a sks dog in the snow", seed=9, steps=3, height=32, width=32, scheduler=scheduler)]
    together = [np.asarray(i, dtype=np.int16) for i in sample_batch(models, pipe.tokenizer, config, batch)]
    alone = [np.asarray(sample(models, pipe.tokenizer, config, s), dtype=np.int16) for s in batch]
    assert all(np.abs(t - a).max() <= 1 for t, a in zip(together, alone))

    pipe.scheduler = make_scheduler(scheduler, config)
    theirs = pipe([s.prompt for s in batch], negative_prompt=[s.negative_prompt for s in batch], num_inference_steps=3,
                  height=32, width=32, generator=[torch.Generator("cpu").manual_seed(s.seed) for s in batch]).images
    assert all(np.abs(t - np.asarray(p, dtype=np.int16)).max() <= 1 for t, p in zip(together, theirs))


def test_a_batch_must_share_steps_and_size(pipe):
    from persona.services.generate.sampling import sample_batch

    models = TorchModels(pipe.text_encoder, pipe.unet, pipe.vae, device=torch.device("cpu"))
    with pytest.raises(ValueError, match="share"):
        sample_batch(models, pipe.tokenizer, dict(pipe.scheduler.config),
                     [SamplingSettings("a", steps=2), SamplingSettings("b", steps=3)])


def test_a_model_evicted_between_load_and_draw_is_loaded_again(tiny_model, model_cache, tmp_path):
    """The embedded engine keeps one model here; another request's load evicts this request's model after it was
    loaded and before it draws: the domain loads it again instead of failing."""
    from types import SimpleNamespace

    from persona.services.generate.domain import EmbeddedEngine, GenerateDomain, GenerateRequest
    from persona.services.generate.settings import GenerateSettings
    from persona.services.models.base_models import resolve_base_model
    from persona.services.train.settings import TrainSettings

    settings = GenerateSettings(device="cpu", max_loaded=1)
    engine = EmbeddedEngine(settings)
    train_settings = TrainSettings(base_model_cache_dir=model_cache, device="cpu")
    models = SimpleNamespace(resolve_base=lambda ref: resolve_base_model(ref or "tiny", train_settings))
    domain = GenerateDomain(models, engine, settings, tmp_path)
    images = domain.generate("local", GenerateRequest(prompts=("a dog",), base_model="tiny", steps=1, width=32,
                                                      height=32))  # validated and loaded here, drawn when iterated
    engine.load("another request's model", tiny_model)
    [image] = list(images)
    assert image.png.startswith(b"\x89PNG") and [m.key for m in engine.loaded()] == [f"base:{tiny_model}"]
