"""SVDiff on the tiny base model: the spectral-shift reconstruction against hand-computed matrices, the parametrised
UNet equal to the base at δ = 0, only the shifts and the token row training, a small file, and a fused plain UNet
that computes what the trained one does."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from persona.services.models.fusing import (SVDIFF_WEIGHTS as WEIGHT_NAME, TOKEN_KEY, UNET_PREFIX, decompose,
                                            fuse_into_pipeline, read_spectral_shifts, shifted_weight, spectral_layers)
from persona.services.runtime.errors import FailedPrecondition
from persona.services.train.config import TrainConfig
from persona.services.train.loop import train
from persona.services.train.methods import Components
from persona.services.train.methods.svdiff import SvdiffMethod

PROMPT = "a photo of sks dog"
# 32 px keeps a step near 0.2 s on two CPU cores; the method's default learning rate (1e-3).
RESOLUTION = 32
STEPS = 30
# The tiny UNet: 83 Linear/Conv2d weights with 3,620 singular values in all; the text encoder's hidden size is 32.
TINY_LAYERS, TINY_SHIFTS, TINY_HIDDEN = 83, 3620, 32


@pytest.fixture(scope="module")
def trained(tiny_model, dogs, tmp_path_factory):
    config = TrainConfig(method="svdiff", steps=STEPS, resolution=RESOLUTION, token="sks", initializer_token="dog")
    return train(tiny_model, dogs, config, tmp_path_factory.mktemp("svdiff"))


def _components(path) -> Components:
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

    return Components(base_model_dir=path, tokenizer=CLIPTokenizer.from_pretrained(path, subfolder="tokenizer"),
                      text_encoder=CLIPTextModel.from_pretrained(path, subfolder="text_encoder"),
                      vae=AutoencoderKL.from_pretrained(path, subfolder="vae"),
                      unet=UNet2DConditionModel.from_pretrained(path, subfolder="unet"), noise_scheduler=None)


def _pipe(path):
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(path, safety_checker=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _unet_out(unet, text) -> torch.Tensor:
    """The UNet's prediction on a fixed noisy latent at two timesteps."""
    g = torch.Generator().manual_seed(0)
    size = unet.config.sample_size
    latents = torch.randn(2, unet.config.in_channels, size, size, generator=g)
    with torch.no_grad():
        return unet(latents, torch.tensor([10, 700]), text).sample


def _encode(tokenizer, text_encoder, prompt: str = PROMPT) -> torch.Tensor:
    ids = tokenizer([prompt, prompt], padding="max_length", max_length=tokenizer.model_max_length,
                    return_tensors="pt").input_ids
    with torch.no_grad():
        return text_encoder(ids)[0]


def _shifts(components) -> dict:
    """{layer name: its SpectralShift} of a trained (parametrised) UNet."""
    return {name: module.parametrizations.weight[0] for name, module in spectral_layers(components.unet)}


def test_reconstruction_of_a_3x2_matrix_by_hand():
    # W = 3·u1·e1ᵀ + 1·u2·e2ᵀ with u1 = (0.6, 0.8, 0), u2 = (0.8, -0.6, 0): σ = (3, 1), V = I.
    weight = torch.tensor([[1.8, 0.8], [2.4, -0.6], [0.0, 0.0]])
    u, s, vh = decompose(weight)
    assert u.shape == (3, 2) and vh.shape == (2, 2)
    assert torch.allclose(s, torch.tensor([3.0, 1.0]), atol=1e-6)
    # δ = (1, -2): σ' = ReLU(4, -1) = (4, 0), so W' = 4·u1·e1ᵀ.
    expected = torch.tensor([[2.4, 0.0], [3.2, 0.0], [0.0, 0.0]])
    assert torch.allclose(shifted_weight(weight, u, s, vh, torch.tensor([1.0, -2.0])), expected, atol=1e-6)
    # δ = (-0.5, 0.5): σ' = (2.5, 1.5), so W' = 2.5·u1·e1ᵀ + 1.5·u2·e2ᵀ.
    expected = torch.tensor([[1.5, 1.2], [2.0, -0.9], [0.0, 0.0]])
    assert torch.allclose(shifted_weight(weight, u, s, vh, torch.tensor([-0.5, 0.5])), expected, atol=1e-6)
    # δ = 0: the weight itself, bit for bit.
    assert torch.equal(shifted_weight(weight, u, s, vh, torch.zeros(2)), weight)


def test_conv_weights_are_shifted_as_out_by_in_k_k_matrices():
    g = torch.Generator().manual_seed(0)
    weight = torch.randn(6, 3, 3, 3, generator=g)
    delta = 0.3 * torch.randn(6, generator=g)
    u, s, vh = decompose(weight)
    assert (u.shape, s.shape, vh.shape) == ((6, 6), (6,), (6, 27))
    # The paper's form, U diag(ReLU(σ + δ)) Vᵀ on the (out, in·kh·kw) matrix, folded back to a kernel.
    paper = (u @ torch.diag(torch.relu(s + delta)) @ vh).reshape(6, 3, 3, 3)
    assert torch.allclose(shifted_weight(weight, u, s, vh, delta), paper, atol=1e-5)


def test_at_zero_shifts_the_parametrised_unet_is_the_base_unet(tiny_model):
    from torch.nn.utils import parametrize

    base = _components(tiny_model)
    shifted = _components(tiny_model)
    method = SvdiffMethod()
    method.prepare(shifted, TrainConfig(method="svdiff", device="cpu"))
    layers = spectral_layers(shifted.unet)
    assert len(layers) == len(method.shifts) == TINY_LAYERS
    assert all(parametrize.is_parametrized(module, "weight") for _, module in layers)
    assert sum(shift.delta.numel() for shift in method.shifts.values()) == TINY_SHIFTS
    # Trainable: the shifts and the embedding matrix (whose other rows are put back after each step).
    params = method.trainable_parameters()
    assert len(params) == TINY_LAYERS + 1 and params[-1] is shifted.text_encoder.get_input_embeddings().weight
    assert {name for name, p in shifted.unet.named_parameters() if p.requires_grad} == {
        f"{name}.parametrizations.weight.0.delta" for name, _ in layers}
    # The new token starts as "dog", so "sks" prompts encode as "dog" ones; the UNet computes exactly the base's.
    text = _encode(base.tokenizer, base.text_encoder, "a photo of dog dog")
    assert torch.allclose(_encode(shifted.tokenizer, shifted.text_encoder), text, atol=1e-6)
    expected = _unet_out(base.unet, text)
    assert (_unet_out(shifted.unet, text) - expected).abs().max().item() < 1e-5


def test_only_the_shifts_and_the_token_row_train(trained, tiny_model):
    assert len(trained.losses) == STEPS
    assert all(math.isfinite(v) for v in trained.losses) and max(trained.losses) < 2.0, trained.losses
    base, c = _components(tiny_model), trained.components
    # UNet: every frozen weight, bias and norm scale is the base's; some shifts moved.
    base_state = base.unet.state_dict()
    for key, value in c.unet.state_dict().items():
        if key.endswith(".parametrizations.weight.original"):
            assert torch.equal(value, base_state[key.replace(".parametrizations.weight.original", ".weight")]), key
        elif ".parametrizations.weight.0." not in key:
            assert torch.equal(value, base_state[key]), key
    deltas = torch.cat([shift.delta.detach() for shift in _shifts(c).values()])
    assert deltas.abs().max() > 1e-4
    # Text encoder: only the new row of the embedding matrix differs; the VAE is untouched.
    token_id = c.tokenizer.convert_tokens_to_ids("sks")
    dog_id = c.tokenizer.encode("dog", add_special_tokens=False)[0]
    embeddings = c.text_encoder.get_input_embeddings().weight
    base_embeddings = base.text_encoder.get_input_embeddings().weight
    assert token_id == base_embeddings.shape[0] == embeddings.shape[0] - 1
    assert torch.equal(embeddings[:token_id], base_embeddings)
    assert (embeddings[token_id] - base_embeddings[dog_id]).abs().max() > 1e-4
    base_text = base.text_encoder.state_dict()
    for key, value in c.text_encoder.state_dict().items():
        if "token_embedding" not in key:
            assert torch.equal(value, base_text[key]), key
    for key, value in c.vae.state_dict().items():
        assert torch.equal(value, base.vae.state_dict()[key]), key



def test_the_saved_file_is_small_and_holds_the_shifts_and_the_token(trained):
    assert trained.artifact.name == WEIGHT_NAME and [p.name for p in trained.artifact.parent.iterdir()] == [WEIGHT_NAME]
    # 3,620 float32 shifts (14.5 KB) + the token row + metadata (layer names and shapes): well under 40 KB.
    # (The tiny UNet itself is 3.2 MB in fp32; SD-1.5's file is ~0.94 MB, see the method's docstring.)
    size = trained.artifact.stat().st_size
    assert 4 * (TINY_SHIFTS + TINY_HIDDEN) < size < 40_000
    tensors, shapes = read_spectral_shifts(trained.artifact)
    shifts = _shifts(trained.components)
    assert set(tensors) == {UNET_PREFIX + name for name in shifts} | {TOKEN_KEY}
    for name, shift in shifts.items():
        assert shapes[name] == list(shift.shape)
        assert tensors[UNET_PREFIX + name].dtype == torch.float32
        assert torch.equal(tensors[UNET_PREFIX + name], shift.delta.detach())
    token_id = trained.components.tokenizer.convert_tokens_to_ids("sks")
    row = trained.components.text_encoder.get_input_embeddings().weight[token_id]
    assert tensors[TOKEN_KEY].shape == (1, TINY_HIDDEN) and torch.equal(tensors[TOKEN_KEY][0], row.detach())


def test_fused_plain_unet_computes_what_the_trained_one_does(trained, tiny_model):
    from torch.nn.utils import parametrize

    pipe = _pipe(tiny_model)
    base_out = _unet_out(pipe.unet, _encode(pipe.tokenizer, pipe.text_encoder))
    fuse_into_pipeline("svdiff", pipe, trained.artifact.parent, "sks")
    # Plain layers, the base's keys: diffusers, ONNX and TensorRT see an ordinary UNet.
    assert not any(parametrize.is_parametrized(m) for m in pipe.unet.modules())
    assert set(pipe.unet.state_dict()) == set(_components(tiny_model).unet.state_dict())
    c = trained.components
    ours = _unet_out(c.unet, _encode(c.tokenizer, c.text_encoder))
    fused = _unet_out(pipe.unet, _encode(pipe.tokenizer, pipe.text_encoder))
    assert (fused - ours).abs().max().item() < 1e-4
    assert (fused - base_out).abs().max().item() > 1e-3  # and that is not the base model's output
    # The pipeline draws with it.
    image = pipe(PROMPT, height=64, width=64, num_inference_steps=2, generator=torch.Generator().manual_seed(0),
                 output_type="np").images
    assert np.isfinite(image).all()


def test_fusing_into_another_base_model_or_another_file_is_refused(trained, tiny_model, tmp_path):
    from safetensors.torch import save_file

    pipe = _pipe(tiny_model)
    tensors, _ = read_spectral_shifts(trained.artifact)
    # Shapes recorded at training time that this UNet does not have.
    save_file(tensors, str(tmp_path / WEIGHT_NAME), metadata={
        "format": "persona.svdiff", "format_version": "1", "shapes": '{"conv_in": [64, 4, 3, 3]}'})
    with pytest.raises(FailedPrecondition, match="conv_in"):
        fuse_into_pipeline("svdiff", pipe, tmp_path, "sks")
    save_file({"x": torch.zeros(1)}, str(tmp_path / WEIGHT_NAME))
    with pytest.raises(FailedPrecondition, match="not a persona SVDiff file"):
        fuse_into_pipeline("svdiff", pipe, tmp_path, "sks")
