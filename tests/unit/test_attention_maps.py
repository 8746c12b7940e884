"""Identifier cross-attention maps on the tiny model: the capture does not change the image, the map has the
image's size in [0, 1], it follows the identifier's token column, and the UNet's processors come back."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from persona.services.evaluate.attention import draw_with_attention, identifier_token_indices, overlay
from persona.services.generate.sampling import SamplingSettings, TorchModels, sample


@pytest.fixture(scope="module")
def pipe(tiny_model):
    from diffusers import StableDiffusionPipeline

    return StableDiffusionPipeline.from_pretrained(tiny_model, safety_checker=None, requires_safety_checker=False)


def test_identifier_positions_count_the_start_token(pipe):
    assert identifier_token_indices(pipe.tokenizer, "a sks dog on the beach", "sks") == [2]
    with pytest.raises(ValueError, match="not in the prompt"):
        identifier_token_indices(pipe.tokenizer, "a dog on the beach", "sks")


def test_the_map_follows_the_identifier_and_leaves_the_image_alone(pipe):
    models = TorchModels(pipe.text_encoder, pipe.unet, pipe.vae, device=torch.device("cpu"))
    config = dict(pipe.scheduler.config)
    settings = SamplingSettings("a sks dog on the beach", seed=3, steps=3, scheduler="ddim", height=48, width=64)
    processors = dict(pipe.unet.attn_processors)
    image, heat = draw_with_attention(models, pipe.tokenizer, config, settings, "sks")
    assert {k: type(v) for k, v in pipe.unet.attn_processors.items()} == {k: type(v) for k, v in processors.items()}
    plain = sample(models, pipe.tokenizer, config, settings)
    assert np.abs(np.asarray(image, dtype=np.int16) - np.asarray(plain, dtype=np.int16)).max() <= 1
    assert heat.shape == (48, 64) and heat.dtype == np.float32 and heat.min() >= 0 and heat.max() <= 1
    assert heat.max() > heat.min()  # a real map, not a constant
    _, other = draw_with_attention(models, pipe.tokenizer, config, settings, "beach")
    assert not np.allclose(heat, other)  # another token's column gives another map
    shown = overlay(image, heat)
    assert shown.size == image.size and shown.mode == "RGB"
