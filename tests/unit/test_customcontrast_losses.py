"""CustomContrast's losses (services/train/customcontrast/losses.py) against cases computed by hand."""
from __future__ import annotations

import math

import pytest
import torch

from persona.services.models.customcontrast.attention import global_attention_map
from persona.services.runtime.errors import InvalidArgument
from persona.services.train.customcontrast.losses import (
    appearance_similarity, cscl_loss, location_loss, macl_loss, total_loss)

R = 1 / math.sqrt(2)


def test_cscl_is_symmetric_infonce_over_the_cls_tokens():
    # v1=(1,0), v2=(0,1); t1=(1,0), t2=(1,1)/√2 → cos(v_i, t_j) = [[1, .7071], [0, .7071]], τ = 1.
    visual = torch.tensor([[1.0, 0.0], [0.0, 3.0]])  # lengths do not matter: cosine
    textual = torch.tensor([[2.0, 0.0], [1.0, 1.0]])
    e, e_r = math.e, math.exp(R)
    image_to_text = (-math.log(e / (e + e_r)) - math.log(e_r / (1 + e_r))) / 2  # rows: 0.55738, 0.40084
    text_to_image = (-math.log(e / (e + 1)) + math.log(2)) / 2  # columns: 0.31326, log 2
    expected = (image_to_text + text_to_image) / 2
    assert expected == pytest.approx(0.49116, abs=1e-4)
    assert cscl_loss(visual, textual, temperature=1.0).item() == pytest.approx(expected, abs=1e-6)


def test_cscl_falls_as_the_pairs_align_and_refuses_a_batch_of_one():
    aligned = torch.eye(3)
    assert cscl_loss(aligned, aligned).item() < cscl_loss(aligned, aligned.roll(1, dims=0)).item()
    with pytest.raises(InvalidArgument, match="`visual_cls` holds 1 sample"):
        cscl_loss(torch.ones(1, 4), torch.ones(1, 4))


def test_macl_scales_each_negative_by_the_real_subjects_similarity():
    # One layer, τ = 1. a1=(1,0), a2=(1,1)/√2, p1=(1,0), p2=(0,1); S_12 = 0.5 → w = 2.
    anchors = torch.tensor([[[1.0, 0.0]], [[1.0, 1.0]]])
    positives = torch.tensor([[[5.0, 0.0]], [[0.0, 1.0]]])
    appearance = torch.tensor([[1.0, 0.5], [0.5, 1.0]])
    negative = 2 * R  # w · cos(a1, a2)
    l1 = -math.log(math.e / (math.e + math.exp(negative)))  # 0.92155
    l2 = -math.log(math.exp(R) / (math.exp(R) + math.exp(negative)))  # 1.10794
    assert (l1 + l2) / 2 == pytest.approx(1.014745, abs=1e-5)
    assert macl_loss(anchors, positives, appearance, temperature=1.0).item() == pytest.approx((l1 + l2) / 2, abs=1e-6)

    # A look-alike pair (S = 1) is pushed apart less than a pair of unlike subjects (S = 0.5).
    look_alike = macl_loss(anchors, positives, torch.ones(2, 2), temperature=1.0).item()
    assert look_alike < macl_loss(anchors, positives, appearance, temperature=1.0).item()


def test_macl_averages_over_layers_and_leaves_same_subject_samples_out_of_the_negatives():
    anchors = torch.tensor([[[1.0, 0.0]], [[1.0, 1.0]]])
    positives = torch.tensor([[[5.0, 0.0]], [[0.0, 1.0]]])
    appearance = torch.tensor([[1.0, 0.5], [0.5, 1.0]])
    one_layer = macl_loss(anchors, positives, appearance, temperature=1.0)
    two_layers = macl_loss(anchors.repeat(1, 2, 1), positives.repeat(1, 2, 1), appearance, temperature=1.0)
    assert two_layers.item() == pytest.approx(one_layer.item(), abs=1e-6)
    # Both samples show one subject: no negatives remain, each term is -log 1 = 0.
    same = macl_loss(anchors, positives, appearance, subject_ids=torch.tensor([7, 7]), temperature=1.0)
    assert same.item() == pytest.approx(0.0, abs=1e-6)


def test_macl_tokens_are_flattened_per_layer_and_bad_shapes_are_named():
    anchors, positives = torch.randn(3, 2, 4, 5), torch.randn(3, 2, 4, 5)
    appearance = appearance_similarity(torch.randn(3, 8))
    assert torch.diagonal(appearance).allclose(torch.ones(3))
    assert macl_loss(anchors, positives, appearance).ndim == 0
    with pytest.raises(InvalidArgument, match="`appearance` has shape"):
        macl_loss(anchors, positives, torch.ones(2, 2))
    with pytest.raises(InvalidArgument, match="`positives` has shape"):
        macl_loss(anchors, positives[:, :1], appearance)


def test_location_loss_is_background_mean_minus_subject_mean():
    attention = torch.tensor([[[0.4, 0.1], [0.3, 0.2]]])
    mask = torch.tensor([[[1.0, 0.0], [0.0, 0.0]]])
    # background (0.1 + 0.3 + 0.2)/3 = 0.2, subject 0.4.
    assert location_loss(attention, mask).item() == pytest.approx(-0.2, abs=1e-5)
    with pytest.raises(InvalidArgument, match="`mask` has shape"):
        location_loss(attention, torch.ones(1, 4, 4))


def test_the_global_map_averages_the_placeholder_column_and_each_image_token_normalised():
    text = torch.tensor([[0.9, 0.1], [0.7, 0.3], [0.8, 0.2], [0.6, 0.4]])[None, None]  # (B=1, heads=1, HW=4, S=2)
    image = torch.tensor([[0.2, 0.8], [0.6, 0.4], [0.2, 0.8], [0.6, 0.4]])[None, None]
    got = global_attention_map([(text, image)], placeholder=torch.tensor([[False, True]]), size=(2, 2))
    # placeholder column (sums to 1) [.1 .3 .2 .4]; image columns /1.6 and /2.4.
    expected = torch.tensor([[(0.1 + 0.125 + 1 / 3), (0.3 + 0.375 + 1 / 6)],
                             [(0.2 + 0.125 + 1 / 3), (0.4 + 0.375 + 1 / 6)]]) / 3
    assert got[0].allclose(expected, atol=1e-6)
    assert got.sum().item() == pytest.approx(1.0, abs=1e-6)
    # Two placeholder slots: their columns are averaged (here .5 each → the constant text map .25 per pixel).
    both = global_attention_map([(text, image)], placeholder=torch.tensor([[True, True]]), size=(2, 2))
    assert both[0].allclose(torch.tensor([[0.25 + 0.125 + 1 / 3, 0.25 + 0.375 + 1 / 6],
                                          [0.25 + 0.125 + 1 / 3, 0.25 + 0.375 + 1 / 6]]) / 3, atol=1e-6)


def test_the_total_weighs_contrast_by_1e_2_and_location_by_1e_3_and_drops_ablated_terms():
    d, c, m, loc = (torch.tensor(v) for v in (1.0, 2.0, 3.0, 4.0))
    assert total_loss(d, c, m, loc).item() == pytest.approx(1.0 + 0.01 * 5 + 0.001 * 4)
    assert total_loss(d, None, m, loc).item() == pytest.approx(1.0 + 0.03 + 0.004)  # without CSCL
    assert total_loss(d).item() == pytest.approx(1.0)
