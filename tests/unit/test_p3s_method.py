"""P3S-Diffusion's training pieces (§III) against hand-computed cases on tiny tensors: the negative-region fill
(Eq. 3), the RNGR encoder (Eq. 4–5), the injected self-attention and the condition branch (Eq. 6–8), the timestep
weights (Eq. 9–10) and the attention-consistency loss (Eq. 11–13)."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from PIL import Image

from persona.services.runtime.errors import InvalidArgument
from persona.services.train.methods.p3s import consistency, fill, injection, rngr, weights

E = math.e


# --- timestep weights (Eq. 10) ------------------------------------------------------------------------------------

def test_decreasing_weights_are_eq_10_with_the_papers_constants():
    # ε_t = 1 − 0.5 (t/1000)² + 0.2: t=0 → 1.2, t=500 → 1 − 0.125 + 0.2 = 1.075, t=1000 → 0.7.
    eps = weights.TimestepWeights()(torch.tensor([0, 500, 1000]))
    assert eps.tolist() == pytest.approx([1.2, 1.075, 0.7])


def test_increasing_weights_mirror_eq_10():
    # ε_t = 1 − 0.5 (1 − t/1000)² + 0.2: t=0 → 0.7, t=250 → 1 − 0.5·0.5625 + 0.2 = 0.91875, t=1000 → 1.2.
    eps = weights.TimestepWeights(schedule="increasing")(torch.tensor([0, 250, 1000]))
    assert eps.tolist() == pytest.approx([0.7, 0.91875, 1.2])


def test_constant_weights_and_other_constants():
    assert weights.TimestepWeights(schedule="constant", constant=0.8)(torch.tensor([3, 999])).tolist() == \
        pytest.approx([0.8, 0.8])
    # α = 1, β = 0, k = 1, T = 10: ε_5 = 1 − 0.5 = 0.5.
    assert float(weights.TimestepWeights(alpha=1.0, beta=0.0, k=1.0, num_train_timesteps=10)(5)) == 0.5


def test_unknown_schedule_is_refused_by_name():
    with pytest.raises(InvalidArgument, match="p3s_weight_schedule"):
        weights.TimestepWeights(schedule="linear")


# --- attention-consistency loss (Eq. 11–12) -------------------------------------------------------------------------

def test_consistency_loss_one_row_by_hand():
    # MSE([1, 0], [.5, .5]) = (.25 + .25)/2 = .25; avg = (1 + 1)/2 = 1 → .25.
    loss = consistency.attention_consistency_loss(torch.tensor([[1.0, 0.0]]), torch.tensor([[0.5, 0.5]]))
    assert float(loss) == pytest.approx(0.25)


def test_consistency_loss_is_divided_by_the_mean_sum():
    # Two rows: MSE still .25 (4 squared errors of .25), sums 2 and 2 → avg 2 → .125. Identical maps → 0.
    copy_map = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    original = torch.full((2, 2), 0.5)
    assert float(consistency.attention_consistency_loss(copy_map, original)) == pytest.approx(0.125)
    assert float(consistency.attention_consistency_loss(original, original)) == 0.0


def test_consistency_loss_refuses_maps_of_different_shapes():
    with pytest.raises(InvalidArgument, match="same resolution"):
        consistency.attention_consistency_loss(torch.zeros(1, 4, 2), torch.zeros(1, 16, 2))


def test_paired_layers_take_the_last_original_layer_of_each_block():
    original = ["down_blocks.0.attentions.0.t.attn2", "up_blocks.1.attentions.0.t.attn2",
                "up_blocks.1.attentions.1.t.attn2", "mid_block.attentions.0.t.attn2"]
    copy_names = ["down_blocks.0.attentions.0.t.attn2", "mid_block.attentions.0.t.attn2",
                  "up_blocks.1.attentions.0.t.attn2"]
    assert consistency.paired_layers(original, copy_names) == [
        ("up_blocks.1.attentions.1.t.attn2", "up_blocks.1.attentions.0.t.attn2")]
    assert consistency.paired_layers(original, copy_names, "all") == [
        ("down_blocks.0.attentions.0.t.attn2", "down_blocks.0.attentions.0.t.attn2"),
        ("mid_block.attentions.0.t.attn2", "mid_block.attentions.0.t.attn2"),
        ("up_blocks.1.attentions.1.t.attn2", "up_blocks.1.attentions.0.t.attn2")]
    with pytest.raises(InvalidArgument, match="p3s_consistency_layers"):
        consistency.paired_layers(original, copy_names, "first")


# --- negative-region fill (Eq. 3) -----------------------------------------------------------------------------------

def _image(rows) -> Image.Image:
    return Image.fromarray(np.array(rows, dtype=np.uint8))


SUBJECT = np.array([[True, True], [False, False]])
NEGATIVE = np.array([[False, True], [True, False]])


def test_removal_regions():
    assert fill.removal_region(SUBJECT, NEGATIVE, "negative").tolist() == [[False, False], [True, False]]
    assert fill.removal_region(SUBJECT, None, "outside").tolist() == [[False, False], [True, True]]
    with pytest.raises(InvalidArgument, match="persona-cli mask --negative"):
        fill.removal_region(SUBJECT, None, "negative")
    with pytest.raises(InvalidArgument, match="p3s_region"):
        fill.removal_region(SUBJECT, NEGATIVE, "inside")


def test_colour_fill_is_the_complement_of_the_subjects_mean_colour():
    # Subject pixels (200, 50, 50) and (100, 150, 50): mean (150, 100, 50) → fill (105, 155, 205).
    image = _image([[[200, 50, 50], [100, 150, 50]], [[1, 2, 3], [4, 5, 6]]])
    out = np.asarray(fill.remove_negative(image, SUBJECT, region="outside", fill="colour"))
    assert out.tolist() == [[[200, 50, 50], [100, 150, 50]], [[105, 155, 205], [105, 155, 205]]]


def test_blur_fill_changes_only_the_region():
    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)
    region = np.zeros((8, 8), dtype=bool)
    region[4:, :] = True
    out = np.asarray(fill.blur_fill(Image.fromarray(pixels), region))
    assert (out[~region] == pixels[~region]).all()
    assert (out[region] != pixels[region]).any()
    # A flat image blurs to itself.
    flat = np.full((8, 8, 3), 77, dtype=np.uint8)
    assert (np.asarray(fill.blur_fill(Image.fromarray(flat), region)) == 77).all()


def test_inpaint_fill_without_a_model_is_refused_by_name():
    image = _image([[[0, 0, 0], [0, 0, 0]], [[0, 0, 0], [0, 0, 0]]])
    with pytest.raises(InvalidArgument, match="p3s_inpainting_model"):
        fill.remove_negative(image, SUBJECT, NEGATIVE, fill="inpaint")
    with pytest.raises(InvalidArgument, match="does not match"):
        fill.colour_fill(image, np.zeros((3, 3), dtype=bool), SUBJECT)


# --- RNGR encoder (Eq. 4–5) -----------------------------------------------------------------------------------------

def _set(linear, value):
    with torch.no_grad():
        linear.weight.fill_(value)
        if linear.bias is not None:
            linear.bias.zero_()


def test_rngr_at_initialisation_adds_the_mean_value_everywhere():
    # Z = 0 → Q = 0 → uniform softmax over the 2 CLIP tokens: I'' = I' + mean(W^V c_s) = I' + 2·(1 + 3)/2 = I' + 4.
    encoder = rngr.RngrEncoder(latent_channels=1, clip_dim=1, attention_dim=1)
    _set(encoder.to_v, 2.0)
    latent = torch.tensor([[[[1.0, -1.0]]]])  # (1, 1, 1, 2)
    out = encoder(latent, torch.tensor([[[1.0], [3.0]]]))
    assert out.tolist() == [[[[5.0, 3.0]]]]


def test_rngr_cross_attention_by_hand():
    # Z, W^Q, W^K, W^V all 1 (d = 1): one pixel of value 1 queries tokens [0, 1] with scores [0, 1] →
    # weights [1, e]/(1 + e) → bias e/(1 + e) → I'' = 1 + e/(1 + e).
    encoder = rngr.RngrEncoder(latent_channels=1, clip_dim=1, attention_dim=1)
    for layer in (encoder.to_q, encoder.to_k, encoder.to_v):
        _set(layer, 1.0)
    with torch.no_grad():
        encoder.zero_conv.weight.fill_(1.0)
    out = encoder(torch.ones(1, 1, 1, 1), torch.tensor([[[0.0], [1.0]]]))
    assert float(out.detach()) == pytest.approx(1 + E / (1 + E))


def test_rngr_zero_conv_starts_at_zero():
    encoder = rngr.RngrEncoder(latent_channels=4, clip_dim=8)
    assert not encoder.zero_conv.weight.any() and not encoder.zero_conv.bias.any()


# --- injected self-attention (Eq. 7–8) ------------------------------------------------------------------------------

def _unit_attention():
    """A one-channel, one-head diffusers Attention with every weight 1 and no bias: Q = z, K = [z, f], V = [.]."""
    from diffusers.models.attention_processor import Attention

    attn = Attention(query_dim=1, heads=1, dim_head=1)
    for layer in (attn.to_q, attn.to_k, attn.to_v, attn.to_out[0]):
        _set(layer, 1.0)
    return attn.eval()


def test_injected_attention_by_hand():
    # z = [1, 0], f = [0, 2], λ = 0.2: K' = [1, 0, 0, 2], V' = [1 + 0, 0 + 0.4, 0, 2] = [1, 0.4, 0, 2].
    # Query 1: scores [1, 0, 0, 2] → (e·1 + 0.4 + 0 + e²·2)/(e + 2 + e²). Query 0: uniform → 3.4/4 = 0.85.
    z = torch.tensor([[[1.0], [0.0]]])
    f = torch.tensor([[[0.0], [2.0]]])
    out = injection.injected_attention(_unit_attention(), z, f, lam=0.2)
    assert out.flatten().tolist() == pytest.approx([(E + 0.4 + 2 * E * E) / (E + 2 + E * E), 0.85])


def test_injected_attention_with_zero_features_dilutes_the_plain_attention():
    # f = 0: the two extra keys score 0 and carry value 0. Query 1: e·1/(e + 3); plain attention would be e/(e + 1).
    z = torch.tensor([[[1.0], [0.0]]])
    out = injection.injected_attention(_unit_attention(), z, torch.zeros_like(z))
    assert out.flatten().tolist() == pytest.approx([E / (E + 3), 1 / 4])


def test_processor_is_plain_without_features_and_for_rows_without_a_reference():
    from diffusers.models.attention_processor import AttnProcessor2_0

    attn = _unit_attention()
    z = torch.tensor([[[1.0], [0.0]], [[0.5], [2.0]]])
    plain = AttnProcessor2_0()(attn, z)
    state = injection.InjectionState()
    processor = injection.InjectedSelfAttnProcessor("layer", state)
    assert torch.equal(processor(attn, z), plain)
    state.features = {"layer": torch.ones_like(z)}
    state.has_reference = torch.tensor([True, False])
    out = processor(attn, z)
    assert torch.allclose(out[1], plain[1])
    assert torch.allclose(out[0], injection.injected_attention(attn, z[:1], torch.ones_like(z[:1]))[0])


def test_recording_processor_returns_the_plain_output_and_softmax_maps():
    from diffusers.models.attention_processor import Attention, AttnProcessor2_0

    torch.manual_seed(0)
    attn = Attention(query_dim=8, cross_attention_dim=6, heads=2, dim_head=4).eval()
    hidden, text = torch.randn(3, 5, 8), torch.randn(3, 7, 6)
    maps: list = []
    out = injection.RecordingCrossAttnProcessor(maps)(attn, hidden, text)
    assert torch.allclose(out, AttnProcessor2_0()(attn, hidden, text), atol=1e-6)
    assert maps[0].shape == (3, 2, 5, 7)
    assert torch.allclose(maps[0].sum(-1), torch.ones(3, 2, 5))


# --- the condition branch (Eq. 6) on a tiny UNet --------------------------------------------------------------------

@pytest.fixture(scope="module")
def tiny_unet():
    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    # The built-in tiny base model's UNet layout (services/models/base_models.py).
    return UNet2DConditionModel(sample_size=16, in_channels=4, out_channels=4, block_out_channels=(32, 64),
                                layers_per_block=1, down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                                up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=32,
                                attention_head_dim=8, norm_num_groups=32).eval()


def test_branch_features_match_every_self_attention_and_start_at_zero(tiny_unet):
    branch = injection.ConditionBranch(tiny_unet)
    levels = branch(torch.randn(2, 4, 16, 16), torch.tensor([10, 900]), torch.randn(2, 77, 32))
    assert sorted(levels) == ["down_blocks.0", "mid_block", "up_blocks.1"]
    features = branch.layer_features(levels, torch.tensor([1.0, 0.5]))
    # One f_i per frozen self-attention layer, shaped as the tokens that layer sees: (B, h·w, C).
    assert sorted(features) == sorted(injection.self_attention_names(tiny_unet))
    shapes = {name: tuple(f.shape) for name, f in features.items()}
    assert shapes["mid_block.attentions.0.transformer_blocks.0.attn1.processor"] == (2, 8 * 8, 64)
    assert shapes["up_blocks.1.attentions.1.transformer_blocks.0.attn1.processor"] == (2, 16 * 16, 32)
    assert all(not f.any() for f in features.values())  # zero convs


def test_injected_unet_trains_the_zero_convs(tiny_unet):
    tiny_unet.requires_grad_(False)
    branch = injection.ConditionBranch(tiny_unet)
    assert all(p.requires_grad for p in branch.parameters())
    state = injection.InjectionState()
    original = tiny_unet.attn_processors
    tiny_unet.set_attn_processor({name: injection.InjectedSelfAttnProcessor(name, state) if name.endswith("attn1.processor")
                                  else processor for name, processor in original.items()})
    try:
        x, t, c = torch.randn(1, 4, 16, 16), torch.tensor([500]), torch.randn(1, 77, 32)
        state.features = branch.layer_features(branch(x, t, c), weights.TimestepWeights()(t))
        tiny_unet(x, t, c).sample.square().mean().backward()
    finally:
        tiny_unet.set_attn_processor(original)
    grads = [conv.weight.grad for conv in branch.zero_convs.values()]
    assert all(g is not None and g.abs().sum() > 0 for g in grads)
    assert all(p.grad is None for p in tiny_unet.parameters())
