"""CustomContrast assembled around a base model (services/models/customcontrast/build.py): widths read from the
base model, the image encoder by reference, CLIP preprocessing, and a subject's token table."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from persona.services.models.builders import build_tiny_base_model
from persona.services.models.customcontrast.build import (
    CLIP_MEAN, clip_pixels, load_customcontrast_models, load_image_encoder, subject_tokens)
from persona.services.runtime.errors import FailedPrecondition, InvalidArgument


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    base = build_tiny_base_model(tmp_path_factory.mktemp("tiny"))
    return load_customcontrast_models(base, "tiny", width=16, heads=4, num_layers=1, num_visual_tokens=3,
                                      num_text_tokens=2, contrast_width=8)


def test_the_encoder_fits_the_base_models_widths(models):
    config = models.encoder.config
    assert config.word_width == models.text_encoder.get_input_embeddings().embedding_dim == 32
    assert config.cross_attention_width == models.unet.config.cross_attention_dim
    assert config.num_cross_attention_layers == len(models.processors) > 0
    assert config.clip_width == models.image_encoder.config.hidden_size
    assert not any(p.requires_grad for p in models.unet.parameters() if not any(p is q for q in
                                                                                  models.processors.parameters()))


def test_a_subjects_tokens_are_one_row_per_timestep(models):
    photos = torch.stack([clip_pixels(Image.new("RGB", (40, 40), (200, 30, 30)), 32) for _ in range(2)])
    table = subject_tokens(models.encoder.eval(), models.image_encoder, photos, torch.tensor([999, 500, 1]))
    layers = len(models.processors)
    assert table.text_tokens.shape == (3, layers, 2, 32)
    assert table.image_tokens.shape == (3, layers, 2, models.unet.config.cross_attention_dim)
    text, image = table.at(500)
    assert torch.equal(image, table.image_tokens[1])
    with pytest.raises(InvalidArgument, match="`timestep` 7 is not one of the 3"):
        table.at(7)


def test_clip_pixels_normalise_and_blank_the_background():
    image = Image.fromarray(np.full((8, 8, 3), 255, np.uint8))
    mask = Image.fromarray(np.zeros((8, 8), np.uint8))
    assert torch.allclose(clip_pixels(image, 4, mask), torch.zeros(3, 4, 4), atol=1e-5)  # all background: the mean
    white = clip_pixels(image, 4)
    assert white[0, 0, 0].item() == pytest.approx((1 - CLIP_MEAN[0]) / 0.26862954, rel=1e-5)


def test_an_image_encoder_not_on_disk_says_how_to_fetch_it():
    with pytest.raises(FailedPrecondition, match="`hf download nobody/no-such-clip`"):
        load_image_encoder("nobody/no-such-clip")


def test_a_base_stored_in_fp16_loads_in_fp32(tmp_path):
    """Community folders and the toy world's base store fp16; the encoder trains in fp32 against them (an fp16 UNet
    failed the toy world's first encoder run: "expected scalar type Float but found Half")."""
    from diffusers import StableDiffusionPipeline

    base = build_tiny_base_model(tmp_path / "tiny")
    StableDiffusionPipeline.from_pretrained(base, torch_dtype=torch.float16, safety_checker=None,
                                            requires_safety_checker=False).save_pretrained(tmp_path / "fp16")
    loaded = load_customcontrast_models(tmp_path / "fp16", "tiny", width=16, heads=4, num_layers=1,
                                        num_visual_tokens=3, num_text_tokens=2, contrast_width=8)
    assert {p.dtype for m in (loaded.unet, loaded.vae, loaded.text_encoder) for p in m.parameters()} == {torch.float32}
