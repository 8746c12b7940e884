"""P3S-Diffusion's training pieces (§III) against hand-computed cases on tiny tensors: the negative-region fill
(Eq. 3), the RNGR encoder (Eq. 4–5), the injected self-attention and the condition branch (Eq. 6–8), the timestep
weights (Eq. 9–10) and the attention-consistency loss (Eq. 11–13)."""
from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest
import torch
from PIL import Image

from persona.services.runtime.errors import InvalidArgument
from persona.services.models.p3s import injection, rngr, weights
from persona.services.train.methods.p3s import consistency, fill

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


def test_drawing_weights_are_the_trained_schedule_with_the_requests_overrides():
    trained = {"weight_schedule": "increasing", "weight_alpha": 0.4, "weight_beta": 0.1, "weight_k": 1.0,
               "weight_constant": 0.8, "num_train_timesteps": 100}
    # As trained: ε_t = 1 − 0.4 (1 − t/100) + 0.1, so t=50 → 1 − 0.2 + 0.1 = 0.9.
    assert float(weights.drawing_weights(trained)(50)) == pytest.approx(0.9)
    # Unset (None, "") overrides keep the trained values.
    assert weights.drawing_weights(trained, {"p3s_weight_alpha": None, "p3s_weight_schedule": ""}) == \
        weights.trained_weights(trained)
    # decreasing, α = 1, k = 2 (β, T as trained): t=50 → 1 − 0.25 + 0.1 = 0.85.
    eps = weights.drawing_weights(trained, {"p3s_weight_schedule": "decreasing", "p3s_weight_alpha": 1.0,
                                            "p3s_weight_k": 2.0})
    assert float(eps(50)) == pytest.approx(0.85)
    # α = 0, β = −1: ε_t = 1 − 0 − 1 = 0 at every step (the copy's features vanish).
    assert weights.drawing_weights(trained, {"p3s_weight_alpha": 0.0, "p3s_weight_beta": -1.0})(
        torch.tensor([0, 37, 100])).tolist() == [0.0, 0.0, 0.0]
    # "constant" is the concept's constant; a concept saved without weight settings takes the paper's.
    assert float(weights.drawing_weights(trained, {"p3s_weight_schedule": "constant"})(7)) == pytest.approx(0.8)
    assert weights.trained_weights({}) == weights.TimestepWeights()


def test_generate_takes_the_training_options_of_the_schedule_with_the_concepts_values_as_default():
    drawing = {o.name: o for o in weights.drawing_options()}
    for option in (*weights.WEIGHT_OPTIONS, weights.INJECTION_LAMBDA):
        same = dataclasses.replace(drawing[option.name], default=option.default, default_text=option.default_text,
                                   help=option.help)
        assert same == option and drawing[option.name].default is None
    with pytest.raises(InvalidArgument, match="`p3s_weight_k` is 0.0"):
        drawing["p3s_weight_k"].check(0.0)
    # λ: the request's when set, else the concept's trained one, else the paper's.
    assert weights.drawing_lambda({"injection_lambda": 0.7}, 1.5) == 1.5
    assert weights.drawing_lambda({"injection_lambda": 0.7}) == 0.7 and weights.drawing_lambda({}) == 0.2


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
    assert fill.removal_region(SUBJECT, NEGATIVE, "negative_clicks").tolist() == [[False, False], [True, False]]
    assert fill.removal_region(SUBJECT, None, "outside_mask").tolist() == [[False, False], [True, True]]
    # A photo without negative clicks keeps every pixel.
    assert fill.removal_region(SUBJECT, None, "negative_clicks").tolist() == [[False, False], [False, False]]
    with pytest.raises(InvalidArgument, match="p3s_region"):
        fill.removal_region(SUBJECT, NEGATIVE, "inside")


def test_negative_clicks_fill_only_the_negative_region_outside_the_subject():
    # 3×4 photo: the subject in columns 0–1, a second object under the negative click in columns 2–3 of rows 0–1
    # (its segment spills onto the subject at (1, 1)); row 2 is background. Filled: the segment minus the subject,
    # i.e. (0, 2), (0, 3), (1, 2), (1, 3); the subject and the background stay as they were.
    subject = np.array([[1, 1, 0, 0], [1, 1, 0, 0], [0, 0, 0, 0]], dtype=bool)
    negative = np.array([[0, 0, 1, 1], [0, 1, 1, 1], [0, 0, 0, 0]], dtype=bool)
    expected = [[False, False, True, True], [False, False, True, True], [False, False, False, False]]
    assert fill.removal_region(subject, negative, "negative_clicks").tolist() == expected
    # Colour fill: subject mean (10, 20, 30) → (245, 235, 225) on exactly those pixels.
    pixels = np.full((3, 4, 3), 99, dtype=np.uint8)
    pixels[subject] = (10, 20, 30)
    out = np.asarray(fill.remove_negative(Image.fromarray(pixels), subject, negative, region="negative_clicks"))
    assert (out[np.array(expected)] == (245, 235, 225)).all()
    assert (out[~np.array(expected)] == pixels[~np.array(expected)]).all()


def test_colour_fill_is_the_complement_of_the_subjects_mean_colour():
    # Subject pixels (200, 50, 50) and (100, 150, 50): mean (150, 100, 50) → fill (105, 155, 205).
    image = _image([[[200, 50, 50], [100, 150, 50]], [[1, 2, 3], [4, 5, 6]]])
    out = np.asarray(fill.remove_negative(image, SUBJECT, region="outside_mask", fill="colour"))
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


@pytest.fixture(scope="module")
def tiny_inpainting(tiny_model, tmp_path_factory):
    """The tiny base model as a Stable Diffusion inpainting pipeline: its UNet with SD-inpainting's 9 input channels
    (latent, mask, masked-image latent), random weights, saved as a diffusers folder."""
    from diffusers import StableDiffusionInpaintPipeline, UNet2DConditionModel

    config = dict(UNet2DConditionModel.load_config(tiny_model, subfolder="unet"), in_channels=9)
    torch.manual_seed(0)
    pipe = StableDiffusionInpaintPipeline.from_pretrained(tiny_model, unet=UNet2DConditionModel.from_config(config),
                                                          safety_checker=None, requires_safety_checker=False)
    folder = tmp_path_factory.mktemp("p3s-inpainting")
    pipe.save_pretrained(folder)
    return folder


def test_inpaint_fill_paints_only_the_region(tiny_inpainting):
    pixels = np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    subject = np.zeros((64, 64), dtype=bool)
    subject[:32] = True
    pipeline = fill.load_inpainting_pipeline(str(tiny_inpainting))
    out = np.asarray(fill.remove_negative(Image.fromarray(pixels), subject, region="outside_mask", fill="inpaint",
                                          inpainter=pipeline, prompt="a plain wall"))
    assert (out[subject] == pixels[subject]).all()
    assert (out[~subject] != pixels[~subject]).mean() > 0.9


def test_an_inpainting_model_that_cannot_load_is_a_failed_precondition(tmp_path):
    from persona.services.runtime.errors import FailedPrecondition

    with pytest.raises(FailedPrecondition, match="p3s_inpainting_model"):
        fill.load_inpainting_pipeline(str(tmp_path / "nowhere"))


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


# --- the p3s method through the training loop ----------------------------------------------------------------------

@pytest.fixture(scope="module")
def clip_vision(tmp_path_factory):
    from tiny_models import tiny_clip_vision

    return tiny_clip_vision(tmp_path_factory.mktemp("p3s-clip"))


def _centre_masks(examples):
    masks = []
    for image, _ in examples:
        mask = np.zeros((image.height, image.width), dtype=bool)
        mask[image.height // 4: 3 * image.height // 4, image.width // 4: 3 * image.width // 4] = True
        masks.append(mask)
    return masks


@pytest.fixture(scope="module")
def p3s_trained(tiny_model, dogs, clip_vision, tmp_path_factory):
    """3 steps of p3s on two dog photos (centre-square masks) at 32 px; (result, the progress reports)."""
    from persona.services.train.config import TrainConfig
    from persona.services.train.loop import train
    from persona.services.train.methods.p3s.config import P3SConfig

    config = TrainConfig(method="p3s", steps=3, resolution=32, learning_rate=1e-3, device="cpu",
                         p3s=P3SConfig(clip_model=str(clip_vision)))
    reported = []
    result = train(tiny_model, dogs[:2], config, tmp_path_factory.mktemp("p3s-out"),
                   instance_masks=_centre_masks(dogs[:2]), on_step=lambda step, losses, _: reported.append(losses))
    return result, reported


def test_p3s_trains_the_condition_branch_through_the_loop(p3s_trained):
    from safetensors import safe_open

    result, reported = p3s_trained
    assert result.steps == 3 and all(math.isfinite(loss) for loss in result.losses)
    assert all(math.isfinite(r["attention_consistency"]) and r["attention_consistency"] >= 0 for r in reported)
    assert result.artifact.name == "p3s_condition.safetensors"
    with safe_open(str(result.artifact), "pt") as saved:
        zero_convs = [saved.get_tensor(k) for k in saved.keys() if k.startswith("branch.zero_convs.")]
        rngr_conv = saved.get_tensor("rngr.zero_conv.weight")
        assert saved.get_tensor("reference.latents").shape == (2, 4, 16, 16)
        copied = saved.get_tensor("branch.down.0.resnet.conv1.weight")
    # Trained: the zero convs moved off zero, and the copy's own weights off the frozen UNet's.
    assert all(t.abs().sum() > 0 for t in zero_convs) and rngr_conv.abs().sum() > 0
    frozen = result.components.unet.down_blocks[0].resnets[0].conv1.weight.detach()
    assert not torch.equal(copied, frozen)


def test_a_saved_condition_loads_onto_the_base_unet_and_draws(p3s_trained, tiny_model):
    from diffusers import StableDiffusionPipeline

    from persona.services.models.p3s.condition import AttachedCondition, load_condition

    result, _ = p3s_trained
    pipe = StableDiffusionPipeline.from_pretrained(tiny_model, safety_checker=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    condition = load_condition(result.artifact, pipe.unet)
    assert condition.settings["injection_lambda"] == 0.2 and condition.settings["num_train_timesteps"] == 1000

    def draw():
        return np.asarray(pipe("a photo of sks dog", num_inference_steps=2, height=32, width=32,
                               generator=torch.Generator().manual_seed(0), output_type="np").images[0])

    plain = draw()
    with pytest.raises(InvalidArgument, match="p3s_reference"):
        AttachedCondition(pipe.unet, condition, reference=2)
    attached = AttachedCondition(pipe.unet, condition, reference=1)
    conditioned = draw()
    attached.remove()
    assert np.isfinite(conditioned).all() and not np.array_equal(conditioned, plain)
    assert np.array_equal(draw(), plain)  # removed: the base UNet again
    # Drawn larger than trained (64 px: a 32×32 latent grid against 16×16 references), I'' is resized.
    attached = AttachedCondition(pipe.unet, condition)
    try:
        larger = pipe("a photo of sks dog", num_inference_steps=1, height=64, width=64, output_type="np").images[0]
    finally:
        attached.remove()
    assert larger.shape == (64, 64, 3) and np.isfinite(larger).all()


def test_p3s_refuses_a_photo_without_a_mask(tiny_model, dogs, clip_vision, tmp_path):
    from persona.services.train.config import TrainConfig
    from persona.services.train.loop import train
    from persona.services.train.methods.p3s.config import P3SConfig

    config = TrainConfig(method="p3s", steps=1, resolution=32, device="cpu", p3s=P3SConfig(clip_model=str(clip_vision)))
    masks = _centre_masks(dogs[:2])
    masks[1] = None
    with pytest.raises(InvalidArgument, match="persona-cli mask"):
        train(tiny_model, dogs[:2], config, tmp_path / "out", instance_masks=masks)
    # negative_clicks without the regions: said at once, not after a run.
    negative = dataclasses.replace(config, p3s=P3SConfig(clip_model=str(clip_vision), region="negative_clicks"))
    with pytest.raises(InvalidArgument, match="outside_mask"):
        train(tiny_model, dogs[:2], negative, tmp_path / "out", instance_masks=_centre_masks(dogs[:2]))


def test_p3s_composes_with_prior_preservation_the_masked_loss_and_checkpointing(tiny_model, dogs, clip_vision, tmp_path):
    # Class images have no reference: their rows take the frozen UNet's plain attention and are left out of L_ac.
    from persona.services.train.config import TrainConfig
    from persona.services.train.loop import train
    from persona.services.train.methods.p3s.config import P3SConfig

    config = TrainConfig(method="p3s", steps=2, resolution=32, device="cpu", regularizers=("mask",),
                         gradient_checkpointing=True,
                         p3s=P3SConfig(clip_model=str(clip_vision), fill="blur", weight_schedule="increasing"))
    reported = []
    result = train(tiny_model, dogs[:1], config, tmp_path / "out", class_examples=[(dogs[3][0], "a photo of dog")],
                   instance_masks=_centre_masks(dogs[:1]), on_step=lambda step, losses, _: reported.append(losses))
    assert result.steps == 2
    assert all(math.isfinite(r["prior"]) and math.isfinite(r["attention_consistency"]) for r in reported)


@pytest.mark.parametrize("changes, field", [
    (dict(clip_model=" "), "p3s_clip_model"), (dict(region="all"), "p3s_region"), (dict(fill="noise"), "p3s_fill"),
    (dict(fill="inpaint"), "p3s_inpainting_model"), (dict(rngr_attention_dim=0), "p3s_rngr_attention_dim"),
    (dict(injection_lambda=-0.1), "p3s_injection_lambda"), (dict(weight_schedule="cosine"), "p3s_weight_schedule"),
    (dict(weight_k=0.0), "p3s_weight_k"), (dict(consistency_weight=-1.0), "p3s_consistency_weight"),
    (dict(consistency_layers="first"), "p3s_consistency_layers"),
])
def test_a_bad_p3s_setting_is_refused_by_name(changes, field):
    from persona.services.train.config import TrainConfig
    from persona.services.train.methods.p3s.config import P3SConfig

    with pytest.raises(InvalidArgument, match=f"`{field}`"):
        TrainConfig(method="p3s", p3s=P3SConfig(**changes)).validate()
