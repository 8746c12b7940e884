"""A customcontrast concept on Triton without Triton: the repository writer's customcontrast UNet component (the base
UNet's and text encoder's files, the tokenizer and the concept's two files, no CUDA graph) beside the base model's
shared text encoder and VAE; ONNX and TensorRT components refuse it naming the torch backend, at the repository and
at the domain; the component's step, driven by sd_pipeline's side of the loop (`ConceptSteps`, here calling it
directly instead of through BLS), draws the embedded engine's image; prompts are slotted as the embedded engine
slots them, a prompt without the identifier refused naming `prompts`."""
from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from persona.services.generate import customcontrast, sampling
from persona.services.generate.triton_customcontrast import (CUSTOMCONTRAST_COMPONENT, ConceptSteps, ConceptUnet,
                                                             prompt_ids)
from persona.services.generate.triton_repository import TritonRepository
from persona.services.models.builders import tiny_base_model
from persona.services.models.customcontrast.attention import install_decoupled_processors
from persona.services.models.customcontrast.build import SubjectTokens
from persona.services.models.customcontrast.concept import (TOKENS_FILE, VISUAL_KV_FILE, ConceptTokens, load_concept,
                                                            read_prompt_slots, save_concept, table_timesteps)
from persona.services.runtime.errors import FailedPrecondition, InvalidArgument


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    return tiny_base_model(tmp_path_factory.mktemp("models"))


@pytest.fixture(scope="module")
def tokens(tiny, tmp_path_factory) -> Path:
    """A concept that fits the tiny UNet: random tokens, K'/V' moved off the UNet's own K/V (so it draws another
    image than the base model)."""
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextConfig

    unet = UNet2DConditionModel.from_pretrained(tiny, subfolder="unet")
    _, processors = install_decoupled_processors(unet)
    generator = torch.Generator().manual_seed(0)
    visual_kv = {k: v + 0.1 * torch.randn(v.shape, generator=generator) for k, v in processors.state_dict().items()}
    layers, width = len(processors), unet.config.cross_attention_dim
    word = CLIPTextConfig.from_pretrained(tiny, subfolder="text_encoder").hidden_size
    steps = table_timesteps(1000, 50)
    table = SubjectTokens(steps, torch.randn(len(steps), layers, 2, word, generator=generator),
                          torch.randn(len(steps), layers, 4, width, generator=generator))
    folder = tmp_path_factory.mktemp("concept")
    save_concept(folder, ConceptTokens(table, visual_kv, 1.0, 2, "zwx", "enc_0123", "ab" * 32))
    return folder / TOKENS_FILE


def test_a_customcontrast_concept_gets_a_unet_component_with_its_text_encoder_and_files(tiny, tokens, tmp_path):
    assert read_prompt_slots(tokens) == ("zwx", 2)
    repository = TritonRepository(tmp_path / "models", component_backend="torch")
    base = repository.add("base", tiny)
    entry = repository.add("cpt_cc", tiny, condition=tokens)
    assert {c: entry.components[c] for c in ("text_encoder", "vae_decoder")} == {
        c: base.components[c] for c in ("text_encoder", "vae_decoder")}
    unet = entry.components["unet"]
    assert unet.startswith(f"{CUSTOMCONTRAST_COMPONENT}_") and unet != base.components["unet"]
    version = repository.root / unet / "1"
    for path in ("unet/config.json", "text_encoder/config.json", "tokenizer/vocab.json", TOKENS_FILE,
                 VISUAL_KV_FILE):
        assert (version / path).is_file(), path
    assert (version / TOKENS_FILE).stat().st_ino == tokens.stat().st_ino  # hard-linked, not copied
    config = (repository.root / unet / "config.pbtxt").read_text()
    assert 'key: "component" value { string_value: "customcontrast_unet" }' in config
    assert 'key: "cuda_graphs" value { string_value: "0" }' in config  # per-step state: no capture
    for name in ("input_ids", "negative_ids", "location_mask", "next_location_mask"):
        assert f'name: "{name}"' in config, name
    pipeline = json.loads((repository.root / "sd_pipeline" / "concepts" / "cpt_cc" / "1" / "pipeline.json").read_text())
    assert pipeline["customcontrast"] == {"identifier": "zwx", "num_text_tokens": 2}
    assert repository.add("cpt_cc", tiny, condition=tokens) == entry  # nothing changed: nothing rewritten


def test_onnx_and_tensorrt_components_refuse_a_customcontrast_concept_naming_the_torch_backend(tiny, tokens,
                                                                                                tmp_path):
    from persona.services.generate.domain import GenerateDomain
    from persona.services.generate.settings import GenerateSettings
    from persona.services.generate.triton_engine import ExternalTriton, TritonEngine

    concept = SimpleNamespace(concept_id="cpt_cc", method="customcontrast", state="READY", job_id="job_1",
                              files_of=lambda role: [TOKENS_FILE, VISUAL_KV_FILE])
    models = SimpleNamespace(get=lambda tenant, concept_id: concept)
    for backend in ("python", "onnxruntime", "tensorrt"):
        with pytest.raises(FailedPrecondition, match="customcontrast concept.*PERSONA_TRITON_COMPONENT_BACKEND=torch"):
            TritonRepository(tmp_path / backend, component_backend=backend).add("cpt_cc", tiny, condition=tokens)
        engine = TritonEngine(TritonRepository(tmp_path / f"e-{backend}", component_backend=backend),
                              ExternalTriton("127.0.0.1:1"))
        domain = GenerateDomain(models, engine, GenerateSettings(device="cpu"), tmp_path / "cache")
        with pytest.raises(FailedPrecondition) as refused:
            domain.load("acme", "cpt_cc")
        assert "made with customcontrast" in str(refused.value)
        assert "PERSONA_TRITON_COMPONENT_BACKEND=torch" in str(refused.value)
        assert "PERSONA_GENERATE_ENGINE=embedded" in str(refused.value)


def test_prompts_are_slotted_as_the_embedded_engine_slots_them(tiny):
    from transformers import CLIPTokenizer

    from persona.services.models.customcontrast.text import placeholder_ids

    tokenizer = CLIPTokenizer.from_pretrained(tiny, subfolder="tokenizer")
    ids = prompt_ids(tokenizer, ["a zwx dog on the beach"], "zwx", 2)
    assert torch.equal(ids, placeholder_ids(tokenizer, ["a sks sks dog on the beach"], 2)[0])
    with pytest.raises(InvalidArgument, match=r"`prompts` 'a dog' names the concept's identifier 'zwx' 0 times"):
        prompt_ids(tokenizer, ["a dog"], "zwx", 2)


class _DirectBls:
    """triton_models.BlsModels' interface with the UNet component called in-process (no Triton)."""

    def __init__(self, unet: ConceptUnet, models):
        self.unet, self.models = unet, models
        self.device, self.latent_channels = models.device, models.latent_channels
        self.vae_scale_factor, self.scaling_factor = models.vae_scale_factor, models.scaling_factor

    def call(self, component, inputs, outputs):
        assert component == "unet" and outputs == ("out_sample", "next_location_mask")
        with torch.inference_mode():
            return self.unet(**inputs)

    def decode(self, latents):
        return self.models.decode(latents)


@pytest.mark.parametrize("scheduler,guidance", [("ddim", 7.5), ("euler", 1.0)])
def test_the_components_steps_draw_the_embedded_engines_image(tiny, tokens, tmp_path, scheduler, guidance):
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTokenizer

    repository = TritonRepository(tmp_path / "models", component_backend="torch")
    version = repository.root / repository.add("cpt_cc", tiny, condition=tokens).components["unet"] / "1"
    unet = UNet2DConditionModel.from_pretrained(version / "unet").eval().requires_grad_(False)
    component = ConceptUnet(unet, version, torch.float32)
    models = sampling.TorchModels.from_folder(tiny, device="cpu")
    tokenizer = CLIPTokenizer.from_pretrained(tiny, subfolder="tokenizer")
    config = sampling.scheduler_config(tiny)
    batch = [sampling.SamplingSettings("a zwx dog", "blurry", seed=s, steps=3, guidance_scale=guidance,
                                       scheduler=scheduler, height=32, width=32) for s in (7, 8)]
    embedded = np.stack([np.asarray(i) for i in customcontrast.draw(models, tokenizer, config, batch,
                                                                    load_concept(tokens.parent))])
    ids = prompt_ids(tokenizer, [s.prompt for s in batch], "zwx", 2)
    negative = sampling.tokenize(tokenizer, [s.negative_prompt for s in batch])
    steps = ConceptSteps(_DirectBls(component, models), ids, negative)
    drawn = sampling.sample_ids(steps, config, sampling.LoopSettings.of(batch[0]), ids, negative, [7, 8],
                                static=False)
    assert np.abs(drawn.astype(int) - embedded.astype(int)).max() <= 1
    base = np.stack([np.asarray(i) for i in sampling.sample_batch(models, tokenizer, config, batch, static=False)])
    assert np.abs(drawn.astype(int) - base.astype(int)).max() > 2  # the concept's tokens change the image
    with pytest.raises(InvalidArgument, match="`input_ids` hold the placeholder token"):
        component(torch.zeros(2, 4, 4, 4), torch.full((2,), 500.0), negative[:1], negative[:1], torch.ones(1, 4, 4))
