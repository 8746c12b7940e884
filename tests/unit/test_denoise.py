"""The static-buffer denoising step (the CUDA-graph fast path, run eagerly on the CPU): DDIM's update against a
hand-computed case and against diffusers' DDIMScheduler.step bit for bit, the whole loop's images equal to the plain
loop's exactly, and the in-place weight copy that lets a captured graph draw another concept."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from persona.services.generate import denoise
from persona.services.generate.sampling import LoopSettings, TorchModels, sample_ids, tokenize


@pytest.fixture(scope="module")
def pipe(tiny_model):
    from diffusers import StableDiffusionPipeline

    return StableDiffusionPipeline.from_pretrained(tiny_model, safety_checker=None, requires_safety_checker=False)


def test_ddim_coefficients_and_update_by_hand():
    """4 training steps, betas 0.1…0.4 → ᾱ = 0.9, 0.72, 0.504, 0.3024; 2 inference steps → timesteps 2, 0."""
    from diffusers import DDIMScheduler

    scheduler = DDIMScheduler(num_train_timesteps=4, beta_start=0.1, beta_end=0.4, beta_schedule="linear",
                              set_alpha_to_one=True, steps_offset=0, clip_sample=False)
    scheduler.set_timesteps(2)
    assert scheduler.timesteps.tolist() == [2, 0]
    table = denoise.ddim_coefficients(scheduler)
    expected = [[math.sqrt(0.504), math.sqrt(0.496), math.sqrt(0.9), math.sqrt(0.1)],  # t=2, prev 0
                [math.sqrt(0.9), math.sqrt(0.1), 1.0, 0.0]]  # t=0, prev < 0: ᾱ_prev = 1 (set_alpha_to_one)
    np.testing.assert_allclose(table.numpy(), expected, atol=1e-6)

    # x = 1, ε = 0.5 at t=2: x0 = (1 − sqrt(0.496)·0.5) / sqrt(0.504); x_prev = sqrt(0.9)·x0 + sqrt(0.1)·0.5.
    x0 = (1 - math.sqrt(0.496) * 0.5) / math.sqrt(0.504)
    out = denoise.ddim_update(torch.tensor([0.5]), torch.tensor([1.0]), table[0])
    assert out.item() == pytest.approx(math.sqrt(0.9) * x0 + math.sqrt(0.1) * 0.5, abs=1e-6)


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_ddim_update_equals_diffusers_step_bit_for_bit(pipe, prediction_type):
    from diffusers import DDIMScheduler

    scheduler = DDIMScheduler.from_config({**pipe.scheduler.config, "prediction_type": prediction_type})
    scheduler.set_timesteps(7)
    table = denoise.ddim_coefficients(scheduler)
    generator = torch.Generator().manual_seed(0)
    sample = torch.randn(2, 4, 8, 8, generator=generator)
    for index, t in enumerate(scheduler.timesteps):
        output = torch.randn(2, 4, 8, 8, generator=generator)
        theirs = scheduler.step(output, t, sample, eta=0.0).prev_sample
        ours = denoise.ddim_update(output, sample, table[index], prediction_type)
        assert torch.equal(ours, theirs), (prediction_type, int(t))
        sample = theirs


@pytest.mark.parametrize("guidance", [7.3, 1.0])
def test_the_static_loop_draws_the_plain_loops_images_exactly(pipe, guidance):
    models = TorchModels(pipe.text_encoder, pipe.unet, pipe.vae, device=torch.device("cpu"))
    loop = LoopSettings(steps=4, guidance_scale=guidance, scheduler="ddim", height=32, width=48)
    prompts = tokenize(pipe.tokenizer, ["a sks dog on the beach", "a sks dog in the snow"])
    negatives = tokenize(pipe.tokenizer, ["blurry", ""])
    config = dict(pipe.scheduler.config)
    plain = sample_ids(models, config, loop, prompts, negatives, [3, 8], static=False)
    steps = []
    static = sample_ids(models, config, loop, prompts, negatives, [3, 8], on_step=lambda i, n: steps.append((i, n)))
    assert static.shape == (2, 32, 48, 3) and np.array_equal(static, plain)
    assert steps == [(1, 4), (2, 4), (3, 4), (4, 4)]
    assert len(models._denoisers) == 1  # one per shape, reused: a second draw captures nothing new
    again = sample_ids(models, config, loop, prompts, negatives, [3, 8])
    assert np.array_equal(again, plain) and len(models._denoisers) == 1


def test_schedulers_without_a_static_step_run_the_plain_loop(pipe):
    from persona.services.generate.sampling import make_scheduler

    config = dict(pipe.scheduler.config)
    assert denoise.supports(make_scheduler("ddim", config))
    assert not denoise.supports(make_scheduler("euler", config))
    assert not denoise.supports(make_scheduler("dpmpp", config))
    assert not denoise.supports(make_scheduler("ddim", {**config, "clip_sample": True}))


def test_weights_are_copied_into_the_same_tensors_and_draw_the_new_concept(pipe):
    """A captured graph reads fixed addresses: the copy must keep every parameter's storage, and the models must
    then draw what a fresh load of the new weights draws."""
    from diffusers import UNet2DConditionModel

    unet = UNet2DConditionModel.from_config(pipe.unet.config).eval()
    unet.load_state_dict(pipe.unet.state_dict())
    models = TorchModels(pipe.text_encoder, unet, pipe.vae, device=torch.device("cpu"))
    loop = LoopSettings(steps=2, guidance_scale=7.5, scheduler="ddim", height=32, width=32)
    ids, negatives = tokenize(pipe.tokenizer, ["a sks dog"]), tokenize(pipe.tokenizer, [""])
    before = sample_ids(models, dict(pipe.scheduler.config), loop, ids, negatives, [1])

    concept = {name: value * 1.05 for name, value in pipe.unet.state_dict().items()}
    pointers = {name: p.data_ptr() for name, p in unet.named_parameters()}
    assert denoise.copy_weights_in_place(unet, concept) == len(concept)
    assert {name: p.data_ptr() for name, p in unet.named_parameters()} == pointers
    assert all(torch.equal(unet.state_dict()[name], value) for name, value in concept.items())

    fresh = UNet2DConditionModel.from_config(pipe.unet.config).eval()
    fresh.load_state_dict(concept)
    expected = sample_ids(TorchModels(pipe.text_encoder, fresh, pipe.vae, device=torch.device("cpu")),
                          dict(pipe.scheduler.config), loop, ids, negatives, [1])
    after = sample_ids(models, dict(pipe.scheduler.config), loop, ids, negatives, [1])
    assert np.array_equal(after, expected) and not np.array_equal(after, before)


def test_weights_of_another_architecture_are_refused_untouched(pipe):
    unet = pipe.unet
    state = unet.state_dict()
    name = next(iter(state))
    snapshot = state[name].clone()
    wrong_shape = {**{k: v for k, v in state.items()}, name: torch.zeros(3, 3)}
    with pytest.raises(ValueError, match=f"weight `{name}` has shape"):
        denoise.copy_weights_in_place(unet, wrong_shape)
    with pytest.raises(ValueError, match="missing"):
        denoise.copy_weights_in_place(unet, {k: v for k, v in state.items() if k != name})
    assert torch.equal(unet.state_dict()[name], snapshot)


def test_a_full_embedded_engine_hot_loads_a_concept_of_the_same_base_into_the_same_modules(tiny_model, tmp_path):
    """max_loaded 1: loading a concept of the base's architecture reuses the base's modules (and so, on CUDA, its
    captured graphs), and draws what a fresh load of that concept draws; another architecture loads afresh."""
    from persona.bench.generate import _nudged_unet_copy
    from persona.services.generate.domain import EmbeddedEngine
    from persona.services.generate.sampling import SamplingSettings
    from persona.services.generate.settings import GenerateSettings

    concept = _nudged_unet_copy(tiny_model, tmp_path / "concept")
    settings = GenerateSettings(device="cpu", max_loaded=1)
    batch = [SamplingSettings("a sks dog", seed=5, steps=2, scheduler="ddim", height=32, width=32)]
    engine = EmbeddedEngine(settings)
    engine.load("base", tiny_model)
    base_modules = engine._models["base"][0]
    base_image = np.asarray(engine.draw_batch("base", batch)[0])
    engine.load("concept", concept)
    assert engine._models["concept"][0] is base_modules and [m.key for m in engine.loaded()] == ["concept"]
    hot = np.asarray(engine.draw_batch("concept", batch)[0])

    fresh = EmbeddedEngine(settings)
    fresh.load("concept", concept)
    assert np.array_equal(hot, np.asarray(fresh.draw_batch("concept", batch)[0]))
    assert not np.array_equal(hot, base_image)
