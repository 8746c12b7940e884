"""The training loop on the tiny base model: losses fall, artifacts load in plain diffusers, config errors, determinism."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from persona.services.runtime.errors import InvalidArgument
from persona.services.train.config import TrainConfig
from persona.services.train.loop import train

PROMPT = "a photo of sks dog"
# 32 px (half the tiny model's native 64) keeps a step near 0.2 s on two CPU cores.
RESOLUTION = 32
STEPS = 30
# Learning rates at which 30 steps visibly lower the loss of the tiny random model (seed 0).
LEARNING_RATES = {"dreambooth": 5e-4, "lora": 1e-2, "ti": 1e-1}


@pytest.fixture(scope="module")
def base(tiny_model) -> Path:
    return tiny_model


@pytest.fixture(scope="module")
def trained(base, dogs, tmp_path_factory):
    """One 30-step run per method, shared by the tests below."""
    results = {}

    def get(method: str):
        if method not in results:
            config = TrainConfig(method=method, steps=STEPS, resolution=RESOLUTION,
                                 learning_rate=LEARNING_RATES[method], token="sks", initializer_token="dog")
            results[method] = train(base, dogs, config, tmp_path_factory.mktemp(method))
        return results[method]
    return get


def _pipe(path, **components):
    from diffusers import StableDiffusionPipeline

    return StableDiffusionPipeline.from_pretrained(path, safety_checker=None, requires_safety_checker=False,
                                                   **components).to("cpu")


def _sample(pipe) -> np.ndarray:
    pipe.set_progress_bar_config(disable=True)
    return pipe(PROMPT, height=RESOLUTION * 2, width=RESOLUTION * 2, num_inference_steps=2,
                generator=torch.Generator().manual_seed(0), output_type="np").images


@pytest.mark.parametrize("method", ["dreambooth", "lora"])
def test_loss_falls(trained, method):
    losses = trained(method).losses
    assert len(losses) == STEPS
    assert np.mean(losses[-5:]) < 0.9 * np.mean(losses[:5]), losses


def test_textual_inversion_lowers_loss_on_a_fixed_batch(trained, dogs, base):
    # One embedding row barely moves a random UNet's loss, so compare the learned row with the initial one
    # on the same noise and timesteps rather than noisy per-step losses.
    from diffusers import DDPMScheduler

    from persona.services.train.loop import _to_tensor

    result = trained("ti")
    c = result.components
    scheduler = DDPMScheduler.from_pretrained(base, subfolder="scheduler")
    g = torch.Generator().manual_seed(123)
    with torch.no_grad():
        pixels = torch.stack([_to_tensor(image, RESOLUTION) for image, _ in dogs])
        latents = c.vae.encode(pixels).latent_dist.mean.repeat(8, 1, 1, 1) * c.vae.config.scaling_factor
        noise = torch.randn(latents.shape, generator=g)
        timesteps = torch.randint(0, 1000, (latents.shape[0],), generator=g)
        noisy = scheduler.add_noise(latents, noise, timesteps)
        ids = c.tokenizer([PROMPT] * latents.shape[0], padding="max_length", max_length=77,
                          return_tensors="pt").input_ids
        embeddings = c.text_encoder.get_input_embeddings().weight
        token_id = c.tokenizer.convert_tokens_to_ids("sks")
        dog_id = c.tokenizer.encode("dog", add_special_tokens=False)[0]

        def loss() -> float:
            pred = c.unet(noisy, timesteps, c.text_encoder(ids)[0]).sample
            return torch.nn.functional.mse_loss(pred, noise).item()

        learned = loss()
        saved = embeddings[token_id].clone()
        embeddings[token_id] = embeddings[dog_id]
        initial = loss()
        embeddings[token_id] = saved
    assert learned < initial


def test_dreambooth_folder_loads_and_changes_output(trained, base):
    result = trained("dreambooth")
    assert (result.artifact / "model_index.json").exists()
    assert np.abs(_sample(_pipe(result.artifact)) - _sample(_pipe(base))).max() > 1e-3


def test_lora_loads_changes_output_and_matches_in_memory(trained, base):
    result = trained("lora")
    assert result.artifact.name == "pytorch_lora_weights.safetensors"
    loaded = _pipe(base)
    loaded.load_lora_weights(result.artifact.parent, weight_name=result.artifact.name)
    out = _sample(loaded)
    assert np.abs(out - _sample(_pipe(base))).max() > 1e-3
    in_memory = _sample(_pipe(base, unet=result.components.unet))
    assert np.abs(out - in_memory).max() < 1e-5


def test_textual_inversion_loads_and_changes_output(trained, base):
    result = trained("ti")
    assert result.artifact.name == "learned_embeds.safetensors"
    pipe = _pipe(base)
    pipe.load_textual_inversion(result.artifact, token="sks")
    assert np.abs(_sample(pipe) - _sample(_pipe(base))).max() > 1e-3


def test_same_seed_same_weights(base, dogs, tmp_path):
    from safetensors.torch import load_file

    config = TrainConfig(method="lora", steps=3, resolution=RESOLUTION, learning_rate=1e-2, seed=7)
    first = load_file(train(base, dogs, config, tmp_path / "a").artifact)
    second = load_file(train(base, dogs, config, tmp_path / "b").artifact)
    assert first.keys() == second.keys()
    assert all(torch.equal(first[k], second[k]) for k in first)
    other = load_file(train(base, dogs, TrainConfig(method="lora", steps=3, resolution=RESOLUTION,
                                                    learning_rate=1e-2, seed=8), tmp_path / "c").artifact)
    assert any(not torch.equal(first[k], other[k]) for k in first)


def test_prior_preservation_callbacks_and_stop(base, dogs, tmp_path):
    seen = []
    config = TrainConfig(method="lora", steps=10, resolution=RESOLUTION, min_snr_gamma=5.0,
                         lr_scheduler="cosine", lr_warmup_steps=2)
    result = train(base, dogs[:2], config, tmp_path, class_examples=[(img, "a photo of dog") for img, _ in dogs[2:]],
                   on_step=lambda step, losses, it_s: seen.append((step, losses, it_s)),
                   should_stop=lambda: len(seen) >= 3)
    assert result.stopped and result.steps == 3 and [s for s, _, _ in seen] == [1, 2, 3]
    _, losses, it_s = seen[0]
    assert set(losses) == {"loss", "instance", "prior"} and it_s > 0
    assert losses["loss"] == pytest.approx(losses["instance"] + losses["prior"], rel=1e-5)
    assert result.artifact.exists()


@pytest.mark.parametrize("changes, field", [
    (dict(steps=0), "`steps`"),
    (dict(steps=100_001), "`steps`"),
    (dict(learning_rate=0.0), "`learning_rate`"),
    (dict(lora_rank=0), "`lora_rank`"),
    (dict(method="hypernetwork"), "`method`"),
    (dict(mixed_precision="fp8"), "`mixed_precision`"),
    (dict(lr_scheduler="step"), "`lr_scheduler`"),
])
def test_validate_names_the_field(changes, field):
    with pytest.raises(InvalidArgument) as e:
        TrainConfig(**changes).validate()
    assert field in e.value.message


def test_train_text_encoder_conflict_names_both_options():
    with pytest.raises(InvalidArgument) as e:
        TrainConfig(method="ti", train_text_encoder=True).validate()
    assert "`train_text_encoder`" in e.value.message and "`method`" in e.value.message
    TrainConfig(method="dreambooth", train_text_encoder=True).validate()
    TrainConfig(method="lora", train_text_encoder=True).validate()


def test_bf16_trained_weights_need_bf16_mixed_precision_and_save_in_fp32(base, dogs, tmp_path):
    from safetensors.torch import load_file

    with pytest.raises(InvalidArgument) as e:
        TrainConfig(trained_dtype="bf16").validate()
    assert "`trained_dtype`" in e.value.message and "`mixed_precision`" in e.value.message
    config = TrainConfig(method="lora", steps=2, resolution=RESOLUTION, mixed_precision="bf16", trained_dtype="bf16")
    result = train(base, dogs[:2], config, tmp_path / "lora")
    assert result.steps == 2 and all(np.isfinite(result.losses))
    assert {t.dtype for t in load_file(result.artifact).values()} == {torch.float32}


def test_lora_on_the_text_encoder_loads_in_diffusers_and_matches_in_memory(base, dogs, tmp_path):
    from safetensors.torch import load_file

    config = TrainConfig(method="lora", steps=3, resolution=RESOLUTION, learning_rate=1e-2, train_text_encoder=True)
    result = train(base, dogs[:2], config, tmp_path / "lora")
    keys = load_file(result.artifact).keys()
    assert any(k.startswith("text_encoder.") for k in keys) and any(k.startswith("unet.") for k in keys)
    loaded = _pipe(base)
    loaded.load_lora_weights(result.artifact.parent, weight_name=result.artifact.name)
    in_memory = _pipe(base, unet=result.components.unet, text_encoder=result.components.text_encoder)
    assert np.abs(_sample(loaded) - _sample(in_memory)).max() < 1e-5


def test_default_learning_rates():
    assert TrainConfig(method="dreambooth").lr == 5e-6
    assert TrainConfig(method="lora").lr == 1e-4
    assert TrainConfig(method="ti").lr == 5e-4
    assert TrainConfig(method="ti", learning_rate=1e-3).lr == 1e-3


def _lora_tensors(result) -> dict:
    from safetensors.torch import load_file

    return load_file(result.artifact)


class _Crash(Exception):
    pass


def test_crash_then_resume_equals_uninterrupted_run(base, dogs, tmp_path):
    config = TrainConfig(method="lora", steps=6, resolution=RESOLUTION, learning_rate=1e-2, checkpoint_every=2)
    uninterrupted = train(base, dogs[:2], config, tmp_path / "straight")

    def crash_at_5(step, losses, it_per_s):
        if step == 5:
            raise _Crash()
    with pytest.raises(_Crash):
        train(base, dogs[:2], config, tmp_path / "resumed", on_step=crash_at_5, checkpoint_dir=tmp_path / "ckpt")
    assert (tmp_path / "ckpt" / "checkpoint.pt").exists()
    resumed = train(base, dogs[:2], config, tmp_path / "resumed", checkpoint_dir=tmp_path / "ckpt")

    assert resumed.resumed_from == 4 and resumed.steps == 6
    assert resumed.losses == pytest.approx(uninterrupted.losses, abs=1e-6)
    expected, actual = _lora_tensors(uninterrupted), _lora_tensors(resumed)
    assert expected.keys() == actual.keys()
    for key in expected:
        torch.testing.assert_close(actual[key], expected[key], atol=1e-6, rtol=0)


def test_stop_writes_a_checkpoint_that_resumes(base, dogs, tmp_path):
    config = TrainConfig(method="ti", steps=5, resolution=RESOLUTION, learning_rate=1e-1)
    uninterrupted = train(base, dogs[:2], config, tmp_path / "straight")
    steps_done = []  # should_stop is also asked inside a step (between UNet blocks): stop by steps, not by calls

    def stop_after_two():
        return len(steps_done) >= 2
    stopped = train(base, dogs[:2], config, tmp_path / "stopped", should_stop=stop_after_two,
                    on_step=lambda step, *rest, **kw: steps_done.append(step), checkpoint_dir=tmp_path / "ckpt")
    assert stopped.stopped and stopped.steps == 2 and stopped.artifact.exists()
    resumed = train(base, dogs[:2], config, tmp_path / "resumed", checkpoint_dir=tmp_path / "ckpt")
    assert resumed.resumed_from == 2
    from safetensors.torch import load_file
    torch.testing.assert_close(load_file(resumed.artifact)["sks"], load_file(uninterrupted.artifact)["sks"],
                               atol=1e-6, rtol=0)


def test_checkpoint_of_other_settings_is_refused(base, dogs, tmp_path):
    from persona.services.runtime.errors import FailedPrecondition

    config = TrainConfig(method="lora", steps=3, resolution=RESOLUTION, checkpoint_every=1)
    with pytest.raises(_Crash):
        train(base, dogs[:1], config, tmp_path / "a", checkpoint_dir=tmp_path / "ckpt",
              on_step=lambda step, losses, speed: (_ for _ in ()).throw(_Crash()) if step == 2 else None)
    with pytest.raises(FailedPrecondition, match="other settings"):
        train(base, dogs[:1], TrainConfig(method="lora", steps=3, resolution=RESOLUTION, seed=1),
              tmp_path / "b", checkpoint_dir=tmp_path / "ckpt")


def test_validation_images_every_n_steps_do_not_change_training(base, dogs, tmp_path):
    plain = TrainConfig(method="lora", steps=4, resolution=RESOLUTION, learning_rate=1e-2)
    with_validation = TrainConfig(method="lora", steps=4, resolution=RESOLUTION, learning_rate=1e-2,
                                  validation_every=2, validation_prompts=("a sks dog on the beach",),
                                  validation_steps=2)
    drawn = []
    a = train(base, dogs[:2], plain, tmp_path / "a")
    b = train(base, dogs[:2], with_validation, tmp_path / "b", on_validation=lambda step, images: drawn.append(
        (step, images)))
    assert [step for step, _ in drawn] == [2, 4]
    prompt, image = drawn[0][1][0]
    assert prompt == "a sks dog on the beach" and image.size == (RESOLUTION, RESOLUTION)
    assert a.losses == b.losses


@pytest.mark.parametrize("calls_before_stop", [1, 3, 20, 40])
def test_a_stop_asked_in_the_middle_of_a_step_ends_the_run_without_finishing_it(base, dogs, tmp_path,
                                                                                calls_before_stop):
    """should_stop is asked once before the step and again inside its forward and backward: a yes there abandons the
    step (1: before the first block's forward; 3, 20: further in; 40: in backward, the tiny UNet's forward asking
    25 times and its backward as many)."""
    calls = []

    def should_stop() -> bool:
        calls.append(True)
        return len(calls) > calls_before_stop

    config = TrainConfig(method="lora", steps=1, resolution=RESOLUTION)
    result = train(base, dogs[:1], config, tmp_path / "lora", should_stop=should_stop)
    assert result.stopped and result.steps == 0 and result.losses == ()
    assert len(calls) == calls_before_stop + 1  # nothing asked after the stop
    assert result.artifact.exists()  # the weights as they were are still saved
