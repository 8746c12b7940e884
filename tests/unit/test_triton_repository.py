"""The Triton model repository writer on a real ONNX export of the tiny model: content-addressed components shared
between concepts, one pipeline model, versioned concept folders, configs for the python backend and the native
onnxruntime platform; and how a pipeline request's parameters become the loop's settings."""
from __future__ import annotations

import json
import os
import shutil

import pytest

from persona.services.models.onnx_export import export_pipeline_to_onnx
from persona.services.generate.triton_models import request_parameters
from persona.services.generate.triton_repository import TritonRepository, model_name
from persona.services.runtime.errors import FailedPrecondition, InvalidArgument


@pytest.fixture(scope="module")
def onnx_export(tiny_model, tmp_path_factory):
    return export_pipeline_to_onnx(tiny_model, tmp_path_factory.mktemp("onnx") / "export").out_dir


def test_a_concept_becomes_three_shared_components_and_a_versioned_folder(onnx_export, tmp_path):
    repo = TritonRepository(tmp_path / "models")
    entry = repo.add("cpt_a", onnx_export)
    assert entry.version == 1 and entry.native_resolution == 64
    assert sorted(entry.components) == ["text_encoder", "unet", "vae_decoder"]
    unet = tmp_path / "models" / entry.components["unet"]
    assert (unet / "1" / "model.onnx").is_file() and (unet / "1" / "model.onnx.data").is_file()
    # Hard-linked from the export: the graph is not copied.
    assert os.stat(unet / "1" / "model.onnx.data").st_ino == os.stat(onnx_export / "unet" / "model.onnx.data").st_ino
    config = (unet / "config.pbtxt").read_text()
    assert 'backend: "python"' in config and 'name: "timestep"' in config and "dims: [ -1, 4, -1, -1 ]" in config
    assert "OnnxRuntimeComponent" in (unet / "1" / "model.py").read_text()
    pipeline = tmp_path / "models" / "sd_pipeline"
    assert "StableDiffusionPipelineModel" in (pipeline / "1" / "model.py").read_text()
    # Token ids in, pixels out, no BYTES (TYPE_STRING) tensor in any model: triton_models says why.
    pipeline_config = (pipeline / "config.pbtxt").read_text()
    assert 'name: "PROMPT_IDS"' in pipeline_config and "TYPE_INT64" in pipeline_config
    assert not [p for p in (tmp_path / "models").rglob("config.pbtxt") if "TYPE_STRING" in p.read_text()]
    described = json.loads((pipeline / "concepts" / "cpt_a" / "1" / "pipeline.json").read_text())
    assert described["models"] == entry.components and described["latent_channels"] == 4

    # The same export again writes nothing new; a second concept of the same graphs shares every component.
    assert repo.add("cpt_a", onnx_export) == entry
    other = repo.add("cpt_b", onnx_export)
    assert other.components == entry.components
    assert sorted(p.name for p in (tmp_path / "models").iterdir()) == sorted(
        ["sd_pipeline", *entry.components.values()])

    # Removing one concept keeps the components the other uses; removing the last frees them.
    assert repo.remove("cpt_a") == []
    assert sorted(repo.remove("cpt_b")) == sorted(entry.components.values())
    assert sorted(p.name for p in (tmp_path / "models").iterdir()) == ["sd_pipeline"]


def test_a_changed_concept_gets_a_new_version_and_the_old_one_goes(onnx_export, tmp_path):
    repo = TritonRepository(tmp_path / "models")
    repo.add("cpt_a", onnx_export)
    changed = tmp_path / "changed"
    shutil.copytree(onnx_export, changed)
    vocab = changed / "tokenizer" / "added_tokens.json"
    vocab.write_text(json.dumps({"<sks>": 49408}))  # what a Textual Inversion token changes
    entry = repo.add("cpt_a", changed)
    assert entry.version == 2
    assert sorted(p.name for p in (tmp_path / "models" / "sd_pipeline" / "concepts" / "cpt_a").iterdir()) == ["2"]


def test_native_onnxruntime_components_have_no_python_model(onnx_export, tmp_path):
    repo = TritonRepository(tmp_path / "models", component_backend="onnxruntime", instance_kind="KIND_GPU")
    entry = repo.add("cpt_a", onnx_export)
    unet = tmp_path / "models" / entry.components["unet"]
    config = (unet / "config.pbtxt").read_text()
    assert 'platform: "onnxruntime_onnx"' in config and "KIND_GPU" in config
    assert not (unet / "1" / "model.py").exists()
    with pytest.raises(InvalidArgument, match="component_backend"):
        TritonRepository(tmp_path / "other", component_backend="tensorflow")


def test_an_export_without_a_manifest_is_refused(tmp_path):
    (tmp_path / "export").mkdir()
    with pytest.raises(FailedPrecondition, match="--format onnx"):
        TritonRepository(tmp_path / "models").add("cpt_a", tmp_path / "export")


def test_model_names_are_safe_and_stable():
    assert model_name("cpt_5b0e3c") == "cpt_5b0e3c"
    name = model_name("base:/home/me/models/sd 1.5")
    assert name == model_name("base:/home/me/models/sd 1.5") and "/" not in name and " " not in name
    assert name != model_name("base:/home/me/models/sd 2.1")


def test_a_pipeline_request_carries_its_shared_settings_as_typed_parameters():
    """`request.parameters()` is JSON; a whole guidance scale arrives as an int and is still a float; a missing or
    mistyped parameter is an error naming it."""
    raw = json.dumps({"concept": "cpt_a", "scheduler": "ddim", "steps": 30, "guidance_scale": 7.25, "height": 512,
                      "width": 768, "priority": 0})
    assert request_parameters(raw) == {"concept": "cpt_a", "scheduler": "ddim", "steps": 30, "guidance_scale": 7.25,
                                       "height": 512, "width": 768}
    whole = request_parameters({**json.loads(raw), "guidance_scale": 7})["guidance_scale"]
    assert whole == 7.0 and isinstance(whole, float)
    with pytest.raises(ValueError, match="`steps` is missing"):
        request_parameters({k: v for k, v in json.loads(raw).items() if k != "steps"})
    with pytest.raises(ValueError, match="`height` is '512': send an integer"):
        request_parameters({**json.loads(raw), "height": "512"})


def test_tensorrt_engines_become_native_tensorrt_plan_models(onnx_export, tmp_path):
    """A tensorrt_build folder (plans standing in: TensorRT cannot run here) is written as `tensorrt_plan` models
    with the graphs' tensor names, no model.py, geometry from the engines' manifest."""
    manifest = json.loads((onnx_export / "manifest.json").read_text())
    engines = tmp_path / "engines"
    components = {}
    for name in ("text_encoder", "unet", "vae_decoder"):
        (engines / name).mkdir(parents=True)
        (engines / name / "model.plan").write_bytes(f"plan {name}".encode())
        components[name] = {"path": f"{name}/model.plan", "inputs": manifest["components"][name]["inputs"],
                            "outputs": manifest["components"][name]["outputs"], "sha256": {"model.plan": name * 8}}
    shutil.copytree(onnx_export / "tokenizer", engines / "tokenizer")
    shutil.copytree(onnx_export / "scheduler", engines / "scheduler")
    (engines / "manifest.json").write_text(json.dumps({
        "format": "persona-tensorrt-stable-diffusion", "components": components,
        **{k: manifest[k] for k in ("latent_channels", "vae_scale_factor", "scaling_factor", "native_resolution")}}))

    repo = TritonRepository(tmp_path / "models", component_backend="tensorrt", instance_kind="KIND_GPU")
    entry = repo.add("cpt_a", engines)
    assert entry.native_resolution == 64
    unet = tmp_path / "models" / entry.components["unet"]
    config = (unet / "config.pbtxt").read_text()
    assert 'platform: "tensorrt_plan"' in config and 'name: "encoder_hidden_states"' in config
    assert (unet / "1" / "model.plan").read_bytes() == b"plan unet" and not (unet / "1" / "model.py").exists()
    with pytest.raises(FailedPrecondition, match="--format tensorrt"):
        repo.add("cpt_b", onnx_export)  # an ONNX export is not what a tensorrt repository takes
