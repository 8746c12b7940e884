"""Regulariser plugins: each equation against hand-computed values on small tensors (masked loss, incl. an
all-zero mask; SPL), and both through 30 training steps of the tiny model: their terms are reported, finite, and
behave as their papers say (the masked run learns only where the mask is; SPL stays bounded)."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from PIL import Image

from persona.services.runtime.errors import InvalidArgument
from persona.services.train.config import TrainConfig
from persona.services.train.loop import train
from persona.services.train.regularizers import weighted_pixel_mean
from persona.services.train.regularizers.masked_loss import latent_mask, pixel_weights
from persona.services.train.regularizers.spl import semantic_preservation_loss


def test_weighted_pixel_mean_is_the_normalised_weighted_mean():
    error = torch.tensor([[[[1.0, 2.0], [3.0, 6.0]], [[0.0, 0.0], [0.0, 0.0]]]])  # (1, 2 channels, 2, 2)
    weights = torch.tensor([[[[1.0, 0.0], [0.0, 1.0]]]])
    # (1 + 6 + 0 + 0) / (2 channels · 2 weighted pixels) = 1.75
    assert weighted_pixel_mean(error, weights).item() == pytest.approx(1.75)
    assert weighted_pixel_mean(error, None).item() == pytest.approx(12 / 8)
    # An all-zero mask has nothing to weight: the plain mean, not 0/0.
    assert weighted_pixel_mean(error, torch.zeros_like(weights)).item() == pytest.approx(12 / 8)
    # Half weight on two pixels: (0.5·1 + 0.5·6) / (2 · 1) = 1.75 — the scale follows the weights' sum.
    assert weighted_pixel_mean(error, weights * 0.5).item() == pytest.approx(1.75)


def test_masks_become_latent_coverage_and_weights():
    mask = np.zeros((4, 4), dtype=bool)
    mask[:2, :2] = True
    mask[2, 2] = True
    coverage = latent_mask(mask, 2)
    assert coverage.tolist() == [[1.0, 0.0], [0.0, 0.25]]
    weights = pixel_weights(coverage, 0.1)
    assert weights.flatten().tolist() == pytest.approx([1.0, 0.1, 0.1, 0.1 + 0.9 * 0.25])


def test_a_mask_is_cropped_exactly_as_its_photo_on_a_non_square_photo():
    """400×300 photo, the subject at the left edge: the training crop (the centred 300×300 square, x 50–350)
    holds none of it, so the mask must mark no latent pixel; a subject inside the crop lands where its pixels do."""
    from persona.services.train.loop import _to_tensor

    edge = np.zeros((300, 400), dtype=bool)
    edge[:, :40] = True
    assert latent_mask(edge, 8).max().item() == 0.0

    photo = np.zeros((300, 400, 3), dtype=np.uint8)
    inside = np.zeros((300, 400), dtype=bool)
    inside[75:150, 50:125] = True  # crop rows 75–150, columns 0–75: latent row 1, column 0 of a 4×4 grid
    photo[inside] = 255
    coverage = latent_mask(inside, 4)
    assert coverage.tolist() == [[0.0, 0.0, 0.0, 0.0], [1.0, 0.0, 0.0, 0.0], [0.0, 0.0, 0.0, 0.0], [0.0, 0.0, 0.0, 0.0]]
    pixels = _to_tensor(Image.fromarray(photo), 32)  # what training sees, in [-1, 1]
    white = pixels.mean(dim=0) > 0
    lit = torch.nn.functional.interpolate(white[None, None].float(), size=(4, 4), mode="area")[0, 0]
    assert torch.equal(lit > 0.5, coverage > 0.5)


def test_spl_is_one_minus_cosine():
    a, b = torch.tensor([[1.0, 0.0]]), torch.tensor([[1.0, 1.0]])
    assert semantic_preservation_loss(a, b).item() == pytest.approx(1 - 1 / math.sqrt(2))
    assert semantic_preservation_loss(b, b).item() == pytest.approx(0.0, abs=1e-7)


def test_unknown_regularizers_and_weights_are_refused():
    with pytest.raises(InvalidArgument, match="`regularizers`"):
        TrainConfig(regularizers=("core2",)).validate()
    with pytest.raises(InvalidArgument, match="`unmasked_weight`"):
        TrainConfig(unmasked_weight=1.5).validate()


@pytest.fixture(scope="module")
def photos(dreambench):
    return [(Image.open(p).convert("RGB"), "a photo of sks dog") for p in sorted((dreambench / "dog").glob("*.jpg"))[:2]]


def test_masked_loss_learns_only_where_the_mask_is(tiny_model, photos, tmp_path):
    """With unmasked weight 0 and a mask covering nothing of one photo but everything of the other, the run's
    instance losses equal those of training on the full photo alone where it was drawn (the other photo falls
    back to the plain loss: its weights are all zero) — and every step reports finite terms."""
    full = np.ones((photos[0][0].height, photos[0][0].width), dtype=bool)
    reported = []
    config = TrainConfig(method="lora", steps=30, resolution=32, learning_rate=1e-2, regularizers=("mask",),
                         unmasked_weight=0.0)
    result = train(tiny_model, photos, config, tmp_path / "masked", instance_masks=[full, None],
                   on_step=lambda step, losses, speed: reported.append(losses))
    plain = train(tiny_model, photos, TrainConfig(method="lora", steps=30, resolution=32, learning_rate=1e-2),
                  tmp_path / "plain")
    # A full mask and no mask weigh every pixel alike: the same run as without the regulariser.
    assert result.losses == pytest.approx(plain.losses, rel=1e-5)
    assert any("photo(s) 1 have no mask" in w for w in result.warnings)
    assert all(math.isfinite(r["loss"]) for r in reported)


def test_a_partial_mask_changes_the_loss_and_spl_is_reported(tiny_model, photos, tmp_path):
    half = np.zeros((photos[0][0].height, photos[0][0].width), dtype=bool)
    half[:, : half.shape[1] // 2] = True
    reported = []
    config = TrainConfig(method="ti", steps=30, resolution=32, learning_rate=1e-1, token="sks",
                         initializer_token="dog", class_name="dog", regularizers=("mask", "spl"))
    result = train(tiny_model, photos, config, tmp_path / "ti", instance_masks=[half, half],
                   on_step=lambda step, losses, speed: reported.append(losses))
    plain = train(tiny_model, photos, TrainConfig(method="ti", steps=30, resolution=32, learning_rate=1e-1,
                                                  token="sks", initializer_token="dog"), tmp_path / "ti-plain")
    assert result.losses != pytest.approx(plain.losses, rel=1e-3)  # the mask changed what was learned
    spl = [r["spl"] for r in reported]
    assert all(0 <= v <= 2 for v in spl)  # 1 − cos is bounded
    # The new token starts as the class word's embedding, so the two phrases start close; SPL keeps them so.
    assert spl[0] < 0.05 and max(spl) < 0.5
    assert all(r["loss"] == pytest.approx(r["instance"] + r["spl"], rel=1e-5) for r in reported)
