"""The Triton repository writer with torch components, on the tiny base model's diffusers folder: component models
named by content with their weights hard-linked, config.pbtxt speaking the ONNX graphs' inputs and outputs,
pipeline.json geometry from the diffusers configs, nothing rewritten when nothing changed; and `TorchComponent`
run in-process over a stand-in of `triton_python_backend_utils`."""
from __future__ import annotations

import json
import re
import shutil
import sys
import types
from pathlib import Path

import numpy as np
import pytest
import torch

from persona.services.generate.settings import GenerateSettings
from persona.services.generate.triton_engine import triton_engine_from_settings
from persona.services.generate.triton_models import PIPELINE_FILE, PIPELINE_MODEL, CudaGraphs, TorchComponent
from persona.services.generate.triton_repository import TritonRepository
from persona.services.runtime.errors import FailedPrecondition
from persona.services.models.builders import tiny_base_model


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    return tiny_base_model(tmp_path_factory.mktemp("models"))


def _tensors(config: str, kind: str) -> dict[str, tuple[str, list[int]]]:
    """name → (data type, dims) of the inputs or outputs of a config.pbtxt."""
    block = re.search(rf"^{kind} \[\n(.*?)^\]", config, re.S | re.M).group(1)
    found = re.findall(r'name: "([^"]+)"\s+data_type: TYPE_(\w+)\s+dims: \[ ([^\]]*) \]', block)
    return {name: (dtype, [int(d) for d in dims.split(",")]) for name, dtype, dims in found}


def _tree(root: Path) -> dict[str, tuple[int, int]]:
    return {str(p.relative_to(root)): (p.stat().st_ino, p.stat().st_mtime_ns) for p in sorted(root.rglob("*"))}


def test_torch_components_from_a_diffusers_folder(tiny, tmp_path):
    model = tmp_path / "tiny"
    shutil.copytree(tiny, model)
    repository = TritonRepository(tmp_path / "repository", component_backend="torch")
    entry = repository.add("concept-1", model)
    assert entry.version == 1 and set(entry.components) == {"text_encoder", "unet", "vae_decoder"}

    # Each component: its diffusers subfolder hard-linked under 1/, the torch adapter, the ONNX graph's IO.
    subfolders = {"text_encoder": "text_encoder", "unet": "unet", "vae_decoder": "vae"}
    for component, name in entry.components.items():
        assert re.fullmatch(rf"{component}_[0-9a-f]{{16}}", name)
        folder = repository.root / name
        for source in (model / subfolders[component]).iterdir():
            linked = folder / "1" / subfolders[component] / source.name
            assert linked.stat().st_ino == source.stat().st_ino, linked
        assert "TorchComponent as TritonPythonModel" in (folder / "1" / "model.py").read_text()
        assert not list(folder.rglob("*.onnx"))

    configs = {c: (repository.root / n / "config.pbtxt").read_text() for c, n in entry.components.items()}
    assert _tensors(configs["text_encoder"], "input") == {"input_ids": ("INT64", [-1, -1])}
    assert _tensors(configs["text_encoder"], "output") == {"last_hidden_state": ("FP32", [-1, -1, 32]),
                                                           "pooler_output": ("FP32", [-1, 32])}
    assert _tensors(configs["unet"], "input") == {"sample": ("FP32", [-1, 4, -1, -1]), "timestep": ("FP32", [-1]),
                                                  "encoder_hidden_states": ("FP32", [-1, -1, 32])}
    assert _tensors(configs["unet"], "output") == {"out_sample": ("FP32", [-1, 4, -1, -1])}
    assert _tensors(configs["vae_decoder"], "input") == {"latent_sample": ("FP32", [-1, 4, -1, -1])}
    assert _tensors(configs["vae_decoder"], "output") == {"sample": ("FP32", [-1, 3, -1, -1])}
    for component, config in configs.items():
        assert 'backend: "python"' in config and "kind: KIND_CPU" in config
        assert f'key: "component" value {{ string_value: "{component}" }}' in config
        assert "FORCE_CPU_ONLY_INPUT_TENSORS" not in config  # CPU instances: inputs are on the host anyway
    assert 'key: "cuda_graphs" value { string_value: "1" }' in configs["unet"]

    # Geometry from the tiny model's configs: 2 VAE blocks → latents 2× smaller; UNet sample_size 32 → 64 px.
    version = repository.root / PIPELINE_MODEL / "concepts" / "concept-1" / "1"
    pipeline = json.loads((version / PIPELINE_FILE).read_text())
    unet = json.loads((model / "unet" / "config.json").read_text())
    vae = json.loads((model / "vae" / "config.json").read_text())
    assert pipeline["models"] == entry.components
    assert pipeline["latent_channels"] == unet["in_channels"] == 4
    assert pipeline["vae_scale_factor"] == 2 ** (len(vae["block_out_channels"]) - 1) == 2
    assert pipeline["scaling_factor"] == vae["scaling_factor"]
    assert pipeline["native_resolution"] == entry.native_resolution == unet["sample_size"] * 2 == 64
    assert (version / "tokenizer" / "vocab.json").is_file()
    assert (version / "scheduler" / "scheduler_config.json").is_file()

    # The same folder again (and a fresh writer, which hashes again): same entry, nothing written.
    before = _tree(repository.root)
    assert repository.add("concept-1", model) == entry
    assert TritonRepository(repository.root, component_backend="torch").add("concept-1", model) == entry
    assert _tree(repository.root) == before

    # A changed tokenizer: version 2 of the concept, the same component models.
    config = model / "tokenizer" / "tokenizer_config.json"
    config.write_text(config.read_text().replace("}", ', "persona_test": 1}', 1))
    second = repository.add("concept-1", model)
    assert second.version == 2 and second.components == entry.components
    assert sorted(p.name for p in (repository.root / PIPELINE_MODEL / "concepts" / "concept-1").iterdir()) == ["2"]

    # Another UNet (a LoRA concept on the same base): a new unet model, the text encoder and VAE shared.
    weights = model / "unet" / "diffusion_pytorch_model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 1
    weights.unlink()  # the repository holds a link to the old file: write a new one, never through the link
    weights.write_bytes(bytes(data))
    third = repository.add("concept-2", model)
    assert third.components["unet"] != entry.components["unet"]
    assert {c: third.components[c] for c in ("text_encoder", "vae_decoder")} == \
        {c: entry.components[c] for c in ("text_encoder", "vae_decoder")}


def test_gpu_instances_get_their_inputs_on_the_gpu(tiny, tmp_path):
    repository = TritonRepository(tmp_path / "repository", component_backend="torch", instance_kind="KIND_GPU")
    entry = repository.add("c", tiny)
    config = (repository.root / entry.components["unet"] / "config.pbtxt").read_text()
    assert "kind: KIND_GPU" in config
    assert 'key: "FORCE_CPU_ONLY_INPUT_TENSORS" value { string_value: "no" }' in config


def test_a_folder_that_is_not_diffusers_is_refused_with_the_fix(tiny, tmp_path):
    model = tmp_path / "tiny"
    shutil.copytree(tiny, model)
    shutil.rmtree(model / "vae")
    with pytest.raises(FailedPrecondition, match=r"missing vae/config\.json.*--format diffusers"):
        TritonRepository(tmp_path / "repository", component_backend="torch").add("c", model)


def test_component_backend_choice(tmp_path):
    def backend(**settings) -> tuple[str, str]:
        engine = triton_engine_from_settings(GenerateSettings(
            engine="triton", triton_url="127.0.0.1:1", triton_repository=tmp_path / "r", **settings), tmp_path)
        return engine.repository.component_backend, engine.model_format

    # An external server counts as having no native onnxruntime backend.
    assert backend(triton_gpu=True) == ("torch", "diffusers")
    assert backend(triton_gpu=False) == ("python", "onnx")
    assert backend(triton_gpu=False, triton_component_backend="torch") == ("torch", "diffusers")
    assert backend(triton_gpu=True, triton_component_backend="onnxruntime") == ("onnxruntime", "onnx")


# --- TorchComponent in-process, over a stand-in of the python backend's utilities ---------------------------


class _Tensor:
    """DLPack only, as persona uses the python backend's tensors (no as_numpy: its numpy bridge breaks on numpy 2)."""

    def __init__(self, name, value):
        self.name, self.value = name, np.asarray(value)

    def to_dlpack(self):
        return torch.utils.dlpack.to_dlpack(torch.from_numpy(self.value))

    @classmethod
    def from_dlpack(cls, name, capsule):
        return cls(name, torch.from_dlpack(capsule).numpy())


class _Request:
    def __init__(self, inputs: dict, outputs=()):
        self.inputs, self.outputs = inputs, list(outputs)

    def requested_output_names(self):
        return self.outputs


class _Response:
    def __init__(self, output_tensors, error=None):
        self.output_tensors, self.error = output_tensors, error


@pytest.fixture
def pb_utils(monkeypatch):
    module = types.ModuleType("triton_python_backend_utils")
    module.Tensor = _Tensor
    module.InferenceResponse = _Response
    module.TritonError = lambda message: message
    module.get_input_tensor_by_name = lambda request, name: (
        _Tensor(name, request.inputs[name]) if name in request.inputs else None)
    monkeypatch.setitem(sys.modules, "triton_python_backend_utils", module)
    return module


def _component(repository: TritonRepository, model_name: str) -> TorchComponent:
    config = (repository.root / model_name / "config.pbtxt").read_text()
    parameters = dict(re.findall(r'key: "([^"]+)" value \{ string_value: "([^"]*)" \}', config))
    component = TorchComponent()
    component.initialize({
        "model_repository": str(repository.root / model_name), "model_version": "1", "model_name": model_name,
        "model_instance_kind": "CPU", "model_instance_device_id": "0",
        "model_config": json.dumps({"parameters": {k: {"string_value": v} for k, v in parameters.items()}}),
    })
    return component


def test_torch_component_speaks_the_onnx_graphs_io(tiny, tmp_path, pb_utils):
    from diffusers import UNet2DConditionModel

    repository = TritonRepository(tmp_path / "repository", component_backend="torch")
    entry = repository.add("c", tiny)
    unet = _component(repository, entry.components["unet"])
    generator = torch.Generator().manual_seed(0)
    sample = torch.randn(2, 4, 8, 12, generator=generator)
    hidden = torch.randn(2, 7, 32, generator=generator)
    timestep = np.array([981.0, 1.0], dtype=np.float32)
    [good, missing, unknown] = unet.execute([
        _Request({"sample": sample.numpy(), "timestep": timestep, "encoder_hidden_states": hidden.numpy()},
                 ["out_sample"]),
        _Request({"sample": sample.numpy(), "timestep": timestep}),
        _Request({"sample": sample.numpy(), "timestep": timestep, "encoder_hidden_states": hidden.numpy()},
                 ["nope"]),
    ])
    assert good.error is None and [t.name for t in good.output_tensors] == ["out_sample"]
    out = good.output_tensors[0].value
    assert out.dtype == np.float32 and out.shape == (2, 4, 8, 12)
    reference = UNet2DConditionModel.from_pretrained(tiny, subfolder="unet").eval()
    with torch.no_grad():
        expected = reference(sample, torch.from_numpy(timestep), hidden).sample.numpy()
    np.testing.assert_allclose(out, expected, atol=1e-5)
    assert missing.output_tensors == [] and "encoder_hidden_states is missing" in missing.error
    assert "no output nope" in unknown.error

    text = _component(repository, entry.components["text_encoder"])
    [response] = text.execute([_Request({"input_ids": np.array([[49406, 320, 49407]], dtype=np.int64)})])
    assert [(t.name, t.value.dtype, t.value.shape) for t in response.output_tensors] == [
        ("last_hidden_state", np.float32, (1, 3, 32)), ("pooler_output", np.float32, (1, 32))]

    vae = _component(repository, entry.components["vae_decoder"])
    [response] = vae.execute([_Request({"latent_sample": np.zeros((1, 4, 8, 8), np.float32)})])
    assert [(t.name, t.value.shape) for t in response.output_tensors] == [("sample", (1, 3, 16, 16))]
    for component in (unet, text, vae):
        component.finalize()


def test_cuda_graphs_fall_back_to_eager_when_capture_fails():
    """The capture path itself needs a GPU (not tested here); a capture that fails — here because this torch has
    no CUDA — leaves the model answering eagerly, with capture off from then on."""
    calls = []

    def forward(x):
        calls.append(x.shape)
        return (x * 2,)

    graphs = CudaGraphs(forward, torch.device("cpu"))
    x = torch.arange(6.0).reshape(2, 3)
    [out] = graphs(x)
    assert torch.equal(out, x * 2) and not graphs.enabled and graphs.graphs == {}
    calls.clear()
    [out] = graphs(x + 1)
    assert torch.equal(out, (x + 1) * 2) and calls == [(2, 3)]  # eager, no capture attempt
