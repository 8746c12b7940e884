"""One CustomContrast training step (services/train/customcontrast/step.py) on persona's built-in tiny base model,
the built-in tiny CLIP image encoder and toy-world multi-view subjects: every term present, Eq. 9 assembled from them, the
ablation switches, and a few optimiser steps that train only the encoder and the visual K'/V'."""
from __future__ import annotations

import random

import pytest
import torch
from persona.bench.toyworld_views import write_multiview_dataset
from persona.services.models.builders import build_tiny_base_model
from persona.services.models.customcontrast.build import CustomContrastModels, load_customcontrast_models
from persona.services.runtime.errors import InvalidArgument
from persona.services.train.customcontrast.multiview import read_multiview_dataset, sample_batch
from persona.services.train.customcontrast.step import LossSwitches, load_batch, loss_terms

NUM_TOKENS = 2


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    return build_tiny_base_model(tmp_path_factory.mktemp("tiny"))


def _models(base, **encoder_options) -> CustomContrastModels:
    torch.manual_seed(0)
    return load_customcontrast_models(base, "tiny", width=16, heads=4, num_layers=2, num_visual_tokens=4,
                                      num_text_tokens=NUM_TOKENS, fourier_frequencies=4, contrast_width=8,
                                      **encoder_options)


@pytest.fixture(scope="module")
def samples(tmp_path_factory):
    dataset = read_multiview_dataset(write_multiview_dataset(tmp_path_factory.mktemp("views"), subjects=4, views=3,
                                                             seed=0, size=64))
    picks = sample_batch(dataset, 3, random.Random(0))
    return [(reference, positive, dataset.subjects[i].class_name) for reference, positive, i in picks]


def test_every_term_is_there_and_the_total_is_eq_9(base, samples):
    models = _models(base)
    batch = load_batch(samples, models.tokenizer, NUM_TOKENS, size=64, clip_size=32)
    assert batch.masks.shape == (3, 64, 64) and batch.placeholder.sum(dim=1).tolist() == [NUM_TOKENS] * 3
    terms = loss_terms(models, batch, LossSwitches(), torch.Generator().manual_seed(0))
    assert set(terms) == {"diffusion", "cscl", "macl", "location", "total"}
    assert all(torch.isfinite(value) for value in terms.values())
    expected = terms["diffusion"] + 1e-2 * (terms["cscl"] + terms["macl"]) + 1e-3 * terms["location"]
    assert terms["total"].item() == pytest.approx(expected.item(), rel=1e-6)
    assert models.injection.maps == {} and not models.injection.record_maps  # nothing left behind for the next call


def test_the_ablations_leave_their_terms_out(base, samples):
    models = _models(base)
    batch = load_batch(samples, models.tokenizer, NUM_TOKENS, size=64, clip_size=32)
    terms = loss_terms(models, batch, LossSwitches(cscl=False, macl=False), torch.Generator().manual_seed(0))
    assert set(terms) == {"diffusion", "location", "total"}
    visual_only = _models(base, use_textual=False, use_tv_fusion=False)
    with pytest.raises(InvalidArgument, match="`use_textual` off"):
        loss_terms(visual_only, batch, LossSwitches())
    terms = loss_terms(visual_only, batch, LossSwitches(cscl=False, macl=False, location=False))
    assert set(terms) == {"diffusion", "total"}


def test_a_few_steps_train_the_encoder_and_k_v_only(base, samples):
    models = _models(base)
    batch = load_batch(samples, models.tokenizer, NUM_TOKENS, size=64, clip_size=32)
    frozen = {name: p.detach().clone() for name, p in models.unet.named_parameters() if not p.requires_grad}
    trainable = models.trainable_parameters()
    before = [p.detach().clone() for p in trainable]
    optimizer = torch.optim.AdamW(trainable, lr=1e-3)
    generator = torch.Generator().manual_seed(0)
    for _ in range(2):
        terms = loss_terms(models, batch, LossSwitches(), generator)
        optimizer.zero_grad()
        terms["total"].backward()
        optimizer.step()
    moved = sum(not torch.equal(b, p) for b, p in zip(before, trainable))
    assert moved == len(trainable)
    assert all(torch.equal(p, frozen[n]) for n, p in models.unet.named_parameters() if n in frozen)
    assert all(p.grad is None for p in models.text_encoder.parameters())
