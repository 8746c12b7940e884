"""A p3s concept on Triton without Triton: its request parameters typed and checked by name (floats also as the
text BLS carries), unset settings resolved as the embedded engine resolves them, and the repository writer's p3s
UNet component (the base UNet's files plus the condition file, no CUDA graph) beside the base model's shared text
encoder and VAE; ONNX components refuse a p3s concept naming the torch backend."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from persona.services.generate.triton_p3s import (P3S_COMPONENT, P3S_PARAMETERS, bls_parameters, drawing_parameters,
                                                  p3s_parameters, refuse_p3s_parameters)
from persona.services.generate.triton_repository import TritonRepository
from persona.services.models.builders import tiny_base_model
from persona.services.models.p3s.condition import WEIGHT_NAME, read_summary, save_condition
from persona.services.models.p3s.weights import drawing_weights
from persona.services.runtime.errors import FailedPrecondition, InvalidArgument

GOOD = {"p3s_weight_schedule": "decreasing", "p3s_weight_alpha": 0.5, "p3s_weight_beta": 0.2, "p3s_weight_k": 2.0,
        "p3s_injection_lambda": 0.2, "p3s_reference": 1}


def test_the_parameters_are_generates_p3s_fields_typed_and_checked_by_name():
    assert set(P3S_PARAMETERS) == set(GOOD)
    assert p3s_parameters({**GOOD, "concept": "cpt_a"}, photos=2) == GOOD
    # The BLS hop: floats as their exact repr text, read back as the same doubles.
    assert p3s_parameters(bls_parameters({**GOOD, "p3s_weight_alpha": 0.1 + 0.2}), 2)["p3s_weight_alpha"] == 0.1 + 0.2
    assert p3s_parameters({**GOOD, "p3s_weight_k": 3}, 2)["p3s_weight_k"] == 3.0
    for bad, named in (({"p3s_reference": 2}, "`p3s_reference` is 2: use a photo index 0–1"),
                       ({"p3s_reference": "1"}, "`p3s_reference` is '1': send an integer"),
                       ({"p3s_weight_k": 0.0}, "`p3s_weight_k` is 0.0: use a positive number"),
                       ({"p3s_weight_alpha": "nan"}, "`p3s_weight_alpha` is nan"),
                       ({"p3s_weight_beta": True}, "`p3s_weight_beta` is True: send a number"),
                       ({"p3s_weight_schedule": "sideways"}, "`p3s_weight_schedule` is 'sideways': use one of"),
                       ({"p3s_injection_lambda": None}, "`p3s_injection_lambda` is missing")):
        with pytest.raises(InvalidArgument, match=named):
            p3s_parameters({**GOOD, **bad}, photos=2)
    refuse_p3s_parameters({"concept": "cpt_a", "steps": 3}, "cpt_a")
    with pytest.raises(InvalidArgument, match="`p3s_weight_k` is set but concept cpt_a is not a p3s concept"):
        refuse_p3s_parameters({"p3s_weight_k": 2.0}, "cpt_a")


def test_the_engine_sends_the_settings_resolved_as_the_embedded_engine_draws_them():
    trained = {"weight_schedule": "increasing", "weight_alpha": 0.3, "weight_k": 3.0, "injection_lambda": 0.4}
    sent = drawing_parameters(3, trained, 0, {}, None)
    assert sent == {"p3s_weight_schedule": "increasing", "p3s_weight_alpha": 0.3, "p3s_weight_beta": 0.2,
                    "p3s_weight_k": 3.0, "p3s_injection_lambda": 0.4, "p3s_reference": 0}
    overrides = {"p3s_weight_alpha": -1.0, "p3s_weight_schedule": "constant"}
    sent = drawing_parameters(3, trained, 2, overrides, 1.5)
    weights = drawing_weights(trained, overrides)
    assert (sent["p3s_weight_schedule"], sent["p3s_weight_alpha"], sent["p3s_weight_k"]) == (
        weights.schedule, weights.alpha, weights.k)
    assert (sent["p3s_injection_lambda"], sent["p3s_reference"]) == (1.5, 2)
    with pytest.raises(InvalidArgument, match="`p3s_reference` is 3: use a photo index 0–2"):
        drawing_parameters(3, trained, 3, {}, None)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    return tiny_base_model(tmp_path_factory.mktemp("models"))


@pytest.fixture(scope="module")
def condition(tiny, tmp_path_factory) -> Path:
    from diffusers import UNet2DConditionModel

    from persona.services.models.p3s.injection import ConditionBranch
    from persona.services.models.p3s.rngr import RngrEncoder

    unet = UNet2DConditionModel.from_pretrained(tiny, subfolder="unet")
    path = tmp_path_factory.mktemp("condition") / WEIGHT_NAME
    return save_condition(path, ConditionBranch(unet), RngrEncoder(4, 32), torch.zeros(2, 4, 16, 16),
                          torch.zeros(2, 5, 32), "sks", {"injection_lambda": 0.3})


def test_a_p3s_concept_gets_a_conditioned_unet_beside_the_base_models_components(tiny, condition, tmp_path):
    assert read_summary(condition) == (2, {"injection_lambda": 0.3})
    repository = TritonRepository(tmp_path / "models", component_backend="torch")
    base = repository.add("base", tiny)
    entry = repository.add("cpt_p3s", tiny, condition=condition)
    assert entry.p3s_photos == 2 and base.p3s_photos == 0
    # Text encoder and VAE shared with the base model; the UNet its own, named by the UNet and the condition.
    assert {c: entry.components[c] for c in ("text_encoder", "vae_decoder")} == {
        c: base.components[c] for c in ("text_encoder", "vae_decoder")}
    unet = entry.components["unet"]
    assert unet.startswith(f"{P3S_COMPONENT}_") and unet != base.components["unet"]
    version = repository.root / unet / "1"
    assert (version / WEIGHT_NAME).stat().st_ino == condition.stat().st_ino  # hard-linked, not copied
    assert (version / "unet" / "config.json").is_file() and "TorchComponent" in (version / "model.py").read_text()
    config = (repository.root / unet / "config.pbtxt").read_text()
    assert 'key: "component" value { string_value: "p3s_unet" }' in config
    assert 'key: "cuda_graphs" value { string_value: "0" }' in config  # per-step features: no capture
    pipeline = json.loads((repository.root / "sd_pipeline" / "concepts" / "cpt_p3s" / "1" / "pipeline.json").read_text())
    assert pipeline["p3s"] == {"photos": 2} and "p3s" not in json.loads(
        (repository.root / "sd_pipeline" / "concepts" / "base" / "1" / "pipeline.json").read_text())
    assert repository.entry("cpt_p3s") == entry
    assert repository.add("cpt_p3s", tiny, condition=condition) == entry  # nothing changed: nothing rewritten


def test_onnx_components_refuse_a_p3s_concept_naming_the_torch_backend(tiny, condition, tmp_path):
    for backend in ("python", "onnxruntime", "tensorrt"):
        with pytest.raises(FailedPrecondition, match="PERSONA_TRITON_COMPONENT_BACKEND=torch"):
            TritonRepository(tmp_path / backend, component_backend=backend).add("cpt_p3s", tiny, condition=condition)


def test_the_triton_engine_takes_a_p3s_concept_with_torch_components_only(tmp_path):
    """With ONNX or TensorRT components the domain refuses a p3s concept before loading anything, naming both ways
    that draw it."""
    from types import SimpleNamespace

    from persona.services.generate.domain import GenerateDomain
    from persona.services.generate.settings import GenerateSettings
    from persona.services.generate.triton_engine import ExternalTriton, TritonEngine

    concept = SimpleNamespace(concept_id="cpt_p3s", method="p3s", state="READY", job_id="job_1",
                              files_of=lambda role: ["p3s_condition.safetensors"])
    models = SimpleNamespace(get=lambda tenant, concept_id: concept)
    for backend in ("python", "onnxruntime", "tensorrt", "torch"):
        engine = TritonEngine(TritonRepository(tmp_path / backend, component_backend=backend),
                              ExternalTriton("127.0.0.1:1"))
        assert engine.attaches_conditions == (backend == "torch")
        if backend == "torch":
            continue
        domain = GenerateDomain(models, engine, GenerateSettings(device="cpu"), tmp_path / "cache")
        with pytest.raises(FailedPrecondition) as refused:
            domain.load("acme", "cpt_p3s")
        assert "PERSONA_TRITON_COMPONENT_BACKEND=torch" in str(refused.value)
        assert "PERSONA_GENERATE_ENGINE=embedded" in str(refused.value)
