"""Custom Diffusion on the tiny base model: only cross-attention K/V and the token row train, the saved files load
with diffusers' own loaders, the fused plain UNet computes the same, and the loss stays bounded."""
from __future__ import annotations


import numpy as np
import pytest
import torch

from persona.services.models.fusing import fuse_into_pipeline
from persona.services.runtime.errors import InvalidArgument
from persona.services.train.config import TrainConfig
from persona.services.train.loop import train
from persona.services.train.methods.custom_diffusion import WEIGHT_NAME

PROMPT = "a photo of sks dog"
EMBEDDING_NAME = "learned_embeds.safetensors"
# 32 px keeps a step near 0.2 s on two CPU cores; a learning rate at which 30 steps visibly move K/V.
RESOLUTION = 32
STEPS = 30


@pytest.fixture(scope="module")
def trained(tiny_model, dogs, tmp_path_factory):
    config = TrainConfig(method="custom_diffusion", steps=STEPS, resolution=RESOLUTION, learning_rate=1e-3,
                         token="sks", initializer_token="dog")
    return train(tiny_model, dogs, config, tmp_path_factory.mktemp("custom_diffusion"))


def _pipe(path):
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(path, safety_checker=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _unet_input(unet):
    """A fixed noisy latent and timestep."""
    g = torch.Generator().manual_seed(0)
    size = unet.config.sample_size
    return torch.randn(2, unet.config.in_channels, size, size, generator=g), torch.tensor([10, 700])


def _encode(tokenizer, text_encoder, prompt: str = PROMPT):
    ids = tokenizer([prompt, prompt], padding="max_length", max_length=tokenizer.model_max_length,
                    return_tensors="pt").input_ids
    with torch.no_grad():
        return text_encoder(ids)[0]


def _unet_out(unet, text) -> torch.Tensor:
    latents, timesteps = _unet_input(unet)
    with torch.no_grad():
        return unet(latents, timesteps, text).sample


def _cross_attention_kv_keys(unet) -> set[str]:
    return {f"{name.removesuffix('.processor')}.processor.{kv}_custom_diffusion.weight"
            for name, module in unet.attn_processors.items() if module.train_kv for kv in ("to_k", "to_v")}


def test_only_cross_attention_kv_and_the_token_row_train(trained, tiny_model):
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextModel

    c = trained.components
    base_unet = UNet2DConditionModel.from_pretrained(tiny_model, subfolder="unet").state_dict()
    unet = c.unet.state_dict()
    # Every base weight is bitwise the same; the only new weights are the cross-attention layers' K/V copies.
    assert all(torch.equal(unet[k], v) for k, v in base_unet.items())
    kv_keys = _cross_attention_kv_keys(c.unet)
    assert set(unet) - set(base_unet) == kv_keys
    cross_attention_layers = [name for name in c.unet.attn_processors if ".attn2." in name]
    assert all(".attn2." in k for k in kv_keys) and len(kv_keys) == 2 * len(cross_attention_layers)
    for key in kv_keys:  # each started as the layer's own projection and moved
        original = base_unet[key.replace(".processor.", ".").replace("_custom_diffusion", "")]
        assert unet[key].shape == original.shape and not torch.equal(unet[key], original), key
    # The text encoder is the base one plus the new token's row, the only row that moved from its start ("dog").
    base_text = CLIPTextModel.from_pretrained(tiny_model, subfolder="text_encoder").state_dict()
    text = c.text_encoder.state_dict()
    embedding_key = next(k for k in text if k.endswith("token_embedding.weight"))
    assert all(torch.equal(text[k], v) for k, v in base_text.items() if k != embedding_key)
    token_id = c.tokenizer.convert_tokens_to_ids("sks")
    dog_id = c.tokenizer.encode("dog", add_special_tokens=False)[0]
    assert token_id == base_text[embedding_key].shape[0] == text[embedding_key].shape[0] - 1
    assert torch.equal(text[embedding_key][:token_id], base_text[embedding_key])
    assert not torch.equal(text[embedding_key][token_id], base_text[embedding_key][dog_id])


def test_saved_files_load_with_diffusers_loaders_and_match_in_memory(trained, tiny_model):
    c = trained.components
    out = trained.output_dir
    assert trained.artifact == out / WEIGHT_NAME
    assert sorted(p.name for p in out.iterdir()) == sorted([WEIGHT_NAME, EMBEDDING_NAME])

    pipe = _pipe(tiny_model)
    plain = _unet_out(pipe.unet, _encode(pipe.tokenizer, pipe.text_encoder, "a photo of dog"))
    # diffusers' own loaders, as its Custom Diffusion example loads the example's output.
    pipe.unet.load_attn_procs(out, weight_name=WEIGHT_NAME, _pipeline=pipe)
    pipe.load_textual_inversion(out, weight_name=EMBEDDING_NAME)
    assert {type(p).__name__ for p in pipe.unet.attn_processors.values()} == {"CustomDiffusionAttnProcessor"}

    loaded_text = _encode(pipe.tokenizer, pipe.text_encoder)
    ours_text = _encode(c.tokenizer, c.text_encoder)
    assert torch.allclose(loaded_text, ours_text, atol=1e-5, rtol=0)
    loaded, ours = _unet_out(pipe.unet, loaded_text), _unet_out(c.unet, ours_text)
    assert (loaded - ours).abs().max().item() < 1e-5
    assert (ours - plain).abs().max().item() > 1e-4  # and the concept is not the base model


def test_fuse_into_pipeline_gives_a_plain_unet_that_computes_the_same(trained, tiny_model, tmp_path):
    from diffusers import UNet2DConditionModel
    from diffusers.models.attention_processor import AttnProcessor2_0

    c = trained.components
    pipe = _pipe(tiny_model)
    fuse_into_pipeline("custom_diffusion", pipe, trained.output_dir, "sks")
    assert all(type(p) is AttnProcessor2_0 for p in pipe.unet.attn_processors.values())
    assert not any("custom_diffusion" in k for k in pipe.unet.state_dict())

    # What the diffusers export writes: a plain UNet folder, loaded back without any Custom Diffusion code.
    pipe.save_pretrained(tmp_path / "fused")
    plain_unet = UNet2DConditionModel.from_pretrained(tmp_path / "fused", subfolder="unet")
    text = _encode(c.tokenizer, c.text_encoder)
    fused = _unet_out(plain_unet, text)
    assert (fused - _unet_out(c.unet, text)).abs().max().item() < 1e-5
    assert torch.allclose(_encode(pipe.tokenizer, pipe.text_encoder), text, atol=1e-5, rtol=0)
    image = pipe("a sks dog", height=64, width=64, num_inference_steps=2, generator=torch.Generator().manual_seed(0),
                 output_type="np").images
    assert np.isfinite(image).all()


def test_loss_stays_finite_and_bounded_over_30_steps(trained):
    losses = trained.losses
    assert len(losses) == STEPS and np.isfinite(losses).all()
    # The tiny model is random: bounded, not necessarily falling.
    assert np.mean(losses[-5:]) <= 1.5 * np.mean(losses[:5]), losses


def test_train_text_encoder_is_refused_naming_both_options():
    with pytest.raises(InvalidArgument) as e:
        TrainConfig(method="custom_diffusion", train_text_encoder=True).validate()
    assert "`train_text_encoder`" in e.value.message and "`method`" in e.value.message
    assert "custom_diffusion" in e.value.message
    assert TrainConfig(method="custom_diffusion").lr == 1e-5  # train_custom_diffusion.py's default


@pytest.mark.parametrize("changes, field", [(dict(token=" "), "`token`"),
                                            (dict(initializer_token="golden retriever"), "`initializer_token`")])
def test_a_bad_token_is_refused_naming_the_field(tiny_model, dogs, tmp_path, changes, field):
    config = TrainConfig(method="custom_diffusion", steps=1, resolution=RESOLUTION, **changes)
    with pytest.raises(InvalidArgument) as e:
        train(tiny_model, dogs[:1], config, tmp_path)
    assert field in e.value.message
