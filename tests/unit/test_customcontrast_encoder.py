"""The MFI encoder and its parallel cross-attention (services/models/customcontrast): shapes, the ablations'
shapes, the timestep and layer queries, Eq. 3 with λ = 0 being the UNet's own attention, and gradients reaching
every trainable part through a tiny UNet."""
from __future__ import annotations

import math

import pytest
import torch
from diffusers import UNet2DConditionModel

from persona.services.models.customcontrast.attention import (
    global_attention_map, install_decoupled_processors, location_mask)
from persona.services.models.customcontrast.encoder import MFIEncoder, MFIEncoderConfig, fourier_features
from persona.services.runtime.errors import InvalidArgument
from persona.services.train.customcontrast.losses import (
    appearance_similarity, cscl_loss, location_loss, macl_loss, total_loss)

CROSS = 32  # the tiny UNet's cross_attention_dim


def _config(**overrides) -> MFIEncoderConfig:
    fields = dict(clip_width=24, word_width=CROSS, cross_attention_width=CROSS, num_cross_attention_layers=3,
                  width=16, heads=4, num_layers=2, num_visual_tokens=5, num_text_tokens=2, fourier_frequencies=4,
                  contrast_width=8)
    return MFIEncoderConfig(**{**fields, **overrides})


def _clip_states(batch: int = 2, tokens: int = 7, width: int = 24, layers: int = 4) -> list[torch.Tensor]:
    return [torch.randn(batch, tokens, width) for _ in range(layers)]


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def test_outputs_are_shaped_for_each_cross_attention_layer():
    out = MFIEncoder(_config())(_clip_states(), torch.tensor([10, 900]))
    assert out.text_tokens.shape == (2, 3, 2, CROSS)  # (B, layers, N_t, d_word)
    assert out.image_tokens.shape == (2, 3, 2, CROSS)  # TV fusion: N_t tokens per layer
    assert out.visual_cls.shape == out.textual_cls.shape == (2, 8)


def test_the_ablations_keep_the_unets_shapes():
    without_fusion = MFIEncoder(_config(use_tv_fusion=False))(_clip_states(), torch.tensor([1, 2]))
    assert without_fusion.image_tokens.shape == (2, 3, 5, CROSS)  # the N_v visual tokens in every layer
    assert torch.equal(without_fusion.image_tokens[:, 0], without_fusion.image_tokens[:, 2])
    visual_only = MFIEncoder(_config(use_textual=False, use_tv_fusion=False))(_clip_states(), torch.tensor([1, 2]))
    assert visual_only.text_tokens is None and visual_only.textual_cls is None
    assert visual_only.image_tokens.shape == (2, 3, 5, CROSS)
    with pytest.raises(InvalidArgument, match="`use_tv_fusion` needs the textual Q-Former"):
        _config(use_textual=False)


def test_text_tokens_depend_on_the_timestep_and_the_layer_image_features_on_the_image():
    encoder = MFIEncoder(_config()).eval()
    states = _clip_states(batch=1)
    early, late = encoder(states, torch.tensor([0])), encoder(states, torch.tensor([999]))
    assert not torch.allclose(early.text_tokens, late.text_tokens)
    assert not torch.allclose(early.text_tokens[:, 0], early.text_tokens[:, 1])  # layer embeddings
    assert torch.equal(early.visual_cls, late.visual_cls)  # the visual Q-Former has no timestep
    other = encoder(_clip_states(batch=1), torch.tensor([0]))
    assert not torch.allclose(early.visual_cls, other.visual_cls)


def test_the_clip_layers_are_spread_over_the_depth():
    encoder = MFIEncoder(_config()).eval()
    states = _clip_states(batch=1, layers=7)  # embeddings + 6 layers: layers 2, 4, 6 are read
    with torch.no_grad():
        base = encoder(states, torch.tensor([5])).visual_cls
        for unread in (0, 1, 3, 5):
            changed = list(states)
            changed[unread] = torch.randn_like(states[unread])
            assert torch.equal(encoder(changed, torch.tensor([5])).visual_cls, base)
        changed = list(states)
        changed[4] = torch.randn_like(states[4])
        assert not torch.allclose(encoder(changed, torch.tensor([5])).visual_cls, base)


def test_fourier_features_by_hand():
    got = fourier_features(torch.tensor([0, 250]), frequencies=2, num_train_timesteps=1000)
    # f = 1, 2; t/T = 0.25 → angles 2π·0.25·(1, 2) = (π/2, π).
    expected = torch.tensor([[0.0, 0.0, 1.0, 1.0], [1.0, math.sin(math.pi), 0.0, -1.0]])
    assert got.allclose(expected, atol=1e-6)


def test_bad_inputs_name_the_field():
    encoder = MFIEncoder(_config())
    with pytest.raises(InvalidArgument, match="`clip_hidden_states` are 10 wide"):
        encoder(_clip_states(width=10), torch.tensor([1, 2]))
    with pytest.raises(InvalidArgument, match="`clip_hidden_states` has 3 entries; the encoder reads 3 layers"):
        encoder(_clip_states(layers=3), torch.tensor([1, 2]))
    with pytest.raises(InvalidArgument, match="`timesteps` has shape"):
        encoder(_clip_states(), torch.tensor([1]))
    with pytest.raises(InvalidArgument, match="`width` 18 is not a multiple of `heads` 4"):
        _config(width=18)


def _tiny_unet() -> UNet2DConditionModel:
    # The layout of persona's built-in `tiny` base model, smaller still.
    return UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, block_out_channels=(32, 64), layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=CROSS, attention_head_dim=8, norm_num_groups=32)


def test_with_lambda_zero_the_parallel_attention_is_the_unets_own():
    unet = _tiny_unet().eval()
    latents, text = torch.randn(2, 4, 8, 8), torch.randn(2, 5, CROSS)
    with torch.no_grad():
        plain = unet(latents, 10, encoder_hidden_states=text).sample
        injection, processors = install_decoupled_processors(unet, scale=0.0)
        injection.image_tokens = torch.randn(2, len(processors), 3, CROSS)
        silenced = unet(latents, 10, encoder_hidden_states=text).sample
        for processor in processors:
            processor.scale = 1.0
        injected = unet(latents, 10, encoder_hidden_states=text).sample
    assert len(processors) == sum(name.endswith("attn2.processor") for name in unet.attn_processors)
    assert torch.allclose(silenced, plain, atol=1e-5)
    assert not torch.allclose(injected, plain, atol=1e-3)


def test_every_trainable_part_gets_a_gradient_from_the_total_loss():
    unet = _tiny_unet()
    unet.requires_grad_(False)
    injection, processors = install_decoupled_processors(unet)
    encoder = MFIEncoder(_config(num_cross_attention_layers=len(processors)))
    batch = 3
    timesteps = torch.tensor([5, 500, 900])
    anchor = encoder(_clip_states(batch=batch), timesteps)
    positive = encoder(_clip_states(batch=batch), timesteps)  # other views of the same subjects

    # Stand-in text states per layer: the caption's states with the layer's text tokens in place of the placeholder
    # (index 1); text_states_per_layer does it through a text encoder (test_customcontrast_text.py).
    caption = torch.randn(batch, 5, CROSS)
    injection.text_states = [torch.cat([caption[:, :1], anchor.text_tokens[:, layer], caption[:, 2:]], dim=1)
                             for layer in range(len(processors))]
    injection.image_tokens = anchor.image_tokens
    injection.record_maps = True
    latents, noise = torch.randn(batch, 4, 8, 8), torch.randn(batch, 4, 8, 8)
    prediction = unet(latents, timesteps, encoder_hidden_states=caption).sample
    placeholder = torch.zeros(batch, 6, dtype=torch.bool)  # the N_t = 2 text tokens took the placeholder's place
    placeholder[:, 1:3] = True
    maps = global_attention_map([injection.maps[i] for i in sorted(injection.maps)], placeholder, size=(8, 8))
    mask = torch.zeros(batch, 8, 8)
    mask[:, 2:6, 2:6] = 1
    loss = total_loss(
        torch.nn.functional.mse_loss(prediction, noise),
        cscl_loss(anchor.visual_cls, anchor.textual_cls),
        macl_loss(anchor.text_tokens, positive.text_tokens, appearance_similarity(torch.randn(batch, 6)).abs()),
        location_loss(maps, mask))
    loss.backward()

    trainable = dict(encoder.named_parameters()) | {f"unet.{n}": p for n, p in processors.named_parameters()}
    missing = [name for name, p in trainable.items() if p.grad is None or not p.grad.abs().sum() > 0]
    assert missing == []
    assert all(p.grad is None for p in unet.parameters() if not any(p is q for q in processors.parameters()))


def test_the_location_mask_gates_the_subjects_attention_at_inference():
    unet = _tiny_unet().eval()
    latents, text = torch.randn(2, 4, 8, 8), torch.randn(2, 5, CROSS)
    injection, processors = install_decoupled_processors(unet)
    injection.image_tokens = torch.randn(2, len(processors), 3, CROSS)
    injection.placeholder = torch.zeros(2, 5, dtype=torch.bool)
    injection.placeholder[:, 1] = True
    with torch.no_grad():
        free = unet(latents, 10, encoder_hidden_states=text).sample
        injection.location_mask = torch.ones(2, 8, 8)
        everywhere = unet(latents, 10, encoder_hidden_states=text).sample
        injection.location_mask = torch.zeros(2, 8, 8)
        injection.placeholder[:] = False  # nowhere, and no placeholder: only the image branch is silenced
        nowhere = unet(latents, 10, encoder_hidden_states=text).sample
        for processor in processors:
            processor.scale = 0.0
        injection.location_mask = None
        without_images = unet(latents, 10, encoder_hidden_states=text).sample
    assert torch.allclose(everywhere, free, atol=1e-6)
    assert torch.allclose(nowhere, without_images, atol=1e-5)
    assert not torch.allclose(nowhere, free, atol=1e-3)


def test_the_location_mask_keeps_pixels_at_or_above_the_maps_mean():
    global_map = torch.tensor([[[0.1, 0.4], [0.2, 0.3]]])  # mean 0.25
    assert location_mask(global_map).tolist() == [[[0.0, 1.0], [0.0, 1.0]]]


def test_perceiver_attention_shares_an_images_features_across_its_query_sets():
    from persona.services.models.customcontrast.encoder import PerceiverAttention
    attention = PerceiverAttention(width=8, heads=2)
    features, queries = torch.randn(2, 5, 8), torch.randn(2 * 3, 4, 8)  # 3 query sets per image
    shared = attention(features, queries)
    repeated = attention(features.repeat_interleave(3, dim=0), queries)
    assert torch.allclose(shared, repeated, atol=1e-6)
