"""Drawing a CustomContrast subject step by step (services/models/customcontrast/conditioning.py) on the tiny base
model: the token table feeds each step, the unconditional half is the base model's, and the location mask of one
step gates the next."""
from __future__ import annotations

import pytest
import torch
from diffusers import DDIMScheduler
from PIL import Image

from persona.services.models.builders import build_tiny_base_model
from persona.services.models.customcontrast.build import clip_pixels, load_customcontrast_models, subject_tokens
from persona.services.models.customcontrast.conditioning import carry_location_mask, set_step_conditioning
from persona.services.models.customcontrast.text import placeholder_caption, placeholder_mask


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    base = build_tiny_base_model(tmp_path_factory.mktemp("tiny"))
    torch.manual_seed(0)
    models = load_customcontrast_models(base, "tiny", width=16, heads=4, num_layers=1, num_visual_tokens=3,
                                        num_text_tokens=2, contrast_width=8)
    scheduler = DDIMScheduler.from_pretrained(base / "scheduler")
    scheduler.set_timesteps(3)
    photo = clip_pixels(Image.new("RGB", (64, 64), (230, 25, 25)), 32)[None]
    table = subject_tokens(models.encoder.eval(), models.image_encoder, photo, scheduler.timesteps)
    tokenizer = models.tokenizer
    prompt = tokenizer([placeholder_caption("a photo of a sks ring on a beach", "sks", 2)], padding="max_length",
                       max_length=tokenizer.model_max_length, return_tensors="pt").input_ids
    negative = tokenizer([""], padding="max_length", max_length=tokenizer.model_max_length,
                         return_tensors="pt").input_ids
    placeholder = placeholder_mask(prompt, tokenizer.convert_tokens_to_ids("sks</w>"), 2)
    return models, scheduler, table, prompt, negative, placeholder


def test_a_guided_loop_runs_with_the_location_mask_carried_between_steps(setup):
    models, scheduler, table, prompt, negative, placeholder = setup
    latents = torch.randn(1, 4, 32, 32, generator=torch.Generator().manual_seed(0))
    models.injection.location_mask = None
    masks = []
    with torch.no_grad():
        for t in scheduler.timesteps:
            set_step_conditioning(models.injection, models.text_encoder, table, int(t), prompt, placeholder, negative)
            masks.append(models.injection.location_mask)
            noise = models.unet(torch.cat([latents] * 2), t, encoder_hidden_states=torch.zeros(2, 77, 32)).sample
            carry_location_mask(models.injection, placeholder, (32, 32))
            uncond, cond = noise.chunk(2)
            latents = scheduler.step(uncond + 5.0 * (cond - uncond), t, latents).prev_sample
    assert masks[0] is None  # the first step has no earlier map
    assert all(m.shape == (2, 32, 32) for m in masks[1:])  # [unconditional: all ones; conditional: the mask]
    assert torch.equal(masks[1][0], torch.ones(32, 32))
    assert set(masks[1][1].unique().tolist()) <= {0.0, 1.0} and 0 < masks[1][1].sum() < 32 * 32
    assert torch.isfinite(latents).all()


def test_the_unconditional_half_is_the_base_models_prediction(setup):
    models, scheduler, table, prompt, negative, placeholder = setup
    t = int(scheduler.timesteps[0])
    latents = torch.randn(2, 4, 32, 32, generator=torch.Generator().manual_seed(1))
    models.injection.location_mask = None
    with torch.no_grad():
        set_step_conditioning(models.injection, models.text_encoder, table, t, prompt, placeholder, negative,
                              record_maps=False)
        guided = models.unet(latents, t, encoder_hidden_states=torch.zeros(2, 77, 32)).sample
        for processor in models.processors:
            processor.scale = 0.0
        try:
            plain = models.unet(latents, t, encoder_hidden_states=torch.zeros(2, 77, 32)).sample
        finally:
            for processor in models.processors:
                processor.scale = 1.0
    assert torch.allclose(guided[0], plain[0], atol=1e-5)
    assert not torch.allclose(guided[1], plain[1], atol=1e-4)  # the subject's image tokens act on the other half
