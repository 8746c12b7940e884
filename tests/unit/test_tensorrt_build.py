"""TensorRT engines from the ONNX export: profiles computed from real manifests, argument checks, the clear error
where TensorRT is missing, refit compatibility, and the TensorRT 10 calls build and refit make (recorded by a
stand-in `tensorrt` module, since TensorRT cannot be installed on these machines)."""
from __future__ import annotations

import copy
import importlib.util
import json
import shutil
import sys
import types

import pytest
import torch

pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")

import onnx  # noqa: E402

from persona.services.models.onnx_export import export_pipeline_to_onnx  # noqa: E402
from persona.services.models.tensorrt_build import (  # noqa: E402
    PLAN_FILE, build_engines, can_refit, refit_engine, tensorrt_available)
from persona.services.models.tensorrt_profiles import engine_profiles  # noqa: E402
from persona.services.runtime.errors import FailedPrecondition, InvalidArgument  # noqa: E402

TENSORRT_INSTALLED = importlib.util.find_spec("tensorrt") is not None


@pytest.fixture(scope="module")
def onnx_dir(tiny_model, tmp_path_factory):
    """A real fp32 ONNX export of the tiny model (vae_scale_factor 2, cross_attention_dim 32, text length 77)."""
    return export_pipeline_to_onnx(tiny_model, tmp_path_factory.mktemp("onnx") / "tiny").out_dir


@pytest.fixture
def onnx_manifest(onnx_dir) -> dict:
    return json.loads((onnx_dir / "manifest.json").read_text())


def sd15_manifest(**overrides) -> dict:
    """An ONNX manifest as onnx_export documents it, with SD-1.5's sizes (no files behind it)."""
    manifest = {
        "format": "persona-onnx-stable-diffusion", "version": 1, "opset": 17, "fp16": True,
        "vae_scale_factor": 8, "latent_channels": 4, "cross_attention_dim": 768, "max_text_length": 77,
        "components": {
            "text_encoder": {
                "path": "text_encoder/model.onnx",
                "inputs": [{"name": "input_ids", "dtype": "int64", "shape": ["batch", "sequence"]}],
                "outputs": [{"name": "last_hidden_state", "dtype": "float32", "shape": ["batch", "sequence", 768]},
                            {"name": "pooler_output", "dtype": "float32", "shape": ["batch", 768]}],
                "sha256": {"model.onnx": "a" * 64}},
            "unet": {
                "path": "unet/model.onnx", "external_data": "model.onnx.data",
                "inputs": [{"name": "sample", "dtype": "float32", "shape": ["batch", 4, "height", "width"]},
                           {"name": "timestep", "dtype": "float32", "shape": ["batch"]},
                           {"name": "encoder_hidden_states", "dtype": "float32",
                            "shape": ["batch", "sequence", 768]}],
                "outputs": [{"name": "out_sample", "dtype": "float32", "shape": ["batch", 4, "height", "width"]}],
                "sha256": {"model.onnx": "b" * 64, "model.onnx.data": "c" * 64}},
            "vae_decoder": {
                "path": "vae_decoder/model.onnx",
                "inputs": [{"name": "latent_sample", "dtype": "float32", "shape": ["batch", 4, "height", "width"]}],
                "outputs": [{"name": "sample", "dtype": "float32", "shape": ["batch", 3, "height", "width"]}],
                "sha256": {"model.onnx": "d" * 64}},
        },
    }
    manifest.update(overrides)
    return manifest


# --- profiles -----------------------------------------------------------------------------------------------


def test_profiles_from_the_real_tiny_export(onnx_manifest):
    # The tiny VAE downsamples by 2, so pixel sides 256/384/512 are latent sides 128/192/256.
    profiles = engine_profiles(onnx_manifest, max_batch=4, min_side=256, max_side=512, opt_side=384)
    assert profiles == {
        "text_encoder": {"input_ids": ((1, 77), (1, 77), (8, 77))},
        "unet": {"sample": ((1, 4, 128, 128), (2, 4, 192, 192), (8, 4, 256, 256)),
                 "timestep": ((1,), (2,), (8,)),
                 "encoder_hidden_states": ((1, 77, 32), (2, 77, 32), (8, 77, 32))},
        "vae_decoder": {"latent_sample": ((1, 4, 128, 128), (1, 4, 192, 192), (4, 4, 256, 256))},
    }


def test_profiles_for_sd15_sizes_with_the_defaults():
    # max_batch 8 images → 16 UNet rows (CFG); 256..1024 px → latent 32..128; opt 512 px (SD-1.5's native).
    assert engine_profiles(sd15_manifest()) == {
        "text_encoder": {"input_ids": ((1, 77), (1, 77), (16, 77))},
        "unet": {"sample": ((1, 4, 32, 32), (2, 4, 64, 64), (16, 4, 128, 128)),
                 "timestep": ((1,), (2,), (16,)),
                 "encoder_hidden_states": ((1, 77, 768), (2, 77, 768), (16, 77, 768))},
        "vae_decoder": {"latent_sample": ((1, 4, 32, 32), (1, 4, 64, 64), (8, 4, 128, 128))},
    }


@pytest.mark.parametrize("extra, opt_latent", [
    ({"resolution": 768}, 96),  # SD-2.x's native side where the manifest records it
    ({"sample_size": 96}, 96),  # or the UNet's latent side
    ({"resolution": 2048}, 128),  # moved into [min_side, max_side]
    ({"resolution": 64}, 32),
])
def test_opt_side_defaults_to_the_native_resolution(extra, opt_latent):
    sample = engine_profiles(sd15_manifest(**extra))["unet"]["sample"]
    assert sample[1] == (2, 4, opt_latent, opt_latent)
    assert engine_profiles(sd15_manifest(**extra), opt_side=640)["unet"]["sample"][1] == (2, 4, 80, 80)


def test_a_single_image_batch_keeps_opt_within_max():
    profiles = engine_profiles(sd15_manifest(), max_batch=1)
    assert profiles["unet"]["timestep"] == ((1,), (2,), (2,))
    assert profiles["vae_decoder"]["latent_sample"][2][0] == 1


@pytest.mark.parametrize("kwargs, named", [
    ({"max_batch": 0}, "`max_batch`"),
    ({"max_batch": True}, "`max_batch`"),
    ({"max_batch": 2.0}, "`max_batch`"),
    ({"min_side": 260}, "`min_side`"),
    ({"min_side": 0}, "`min_side`"),
    ({"max_side": 1020}, "`max_side`"),
    ({"max_side": "1024"}, "`max_side`"),
    ({"opt_side": 516}, "`opt_side`"),
    ({"min_side": 512, "max_side": 256}, "`min_side`"),
    ({"opt_side": 128}, "`opt_side`"),
    ({"opt_side": 2048}, "`opt_side`"),
])
def test_bad_arguments_are_named(kwargs, named):
    with pytest.raises(InvalidArgument) as raised:
        engine_profiles(sd15_manifest(), **kwargs)
    assert named in raised.value.message


def test_sides_follow_a_coarser_vae_scale():
    # A VAE that downsamples by 16 needs sides in multiples of 16 (whole latent pixels).
    with pytest.raises(InvalidArgument, match="`min_side` is 264: pass a positive multiple of 16"):
        engine_profiles(sd15_manifest(vae_scale_factor=16), min_side=264)
    assert engine_profiles(sd15_manifest(vae_scale_factor=16))["vae_decoder"]["latent_sample"][0] == (1, 4, 16, 16)


def test_manifests_that_are_not_an_onnx_export_are_refused():
    with pytest.raises(InvalidArgument, match="`manifest` has no unet"):
        engine_profiles({"components": {"text_encoder": {}, "vae_decoder": {}}})
    odd = sd15_manifest()
    odd["components"]["unet"]["inputs"][0]["shape"] = ["batch", 4, "rows", "width"]
    with pytest.raises(InvalidArgument, match="`manifest.components.unet` input sample has dimension 'rows'"):
        engine_profiles(odd)


# --- without TensorRT ---------------------------------------------------------------------------------------


@pytest.mark.skipif(TENSORRT_INSTALLED, reason="tensorrt is installed here")
def test_tensorrt_is_reported_missing_with_how_to_get_it():
    ok, reason = tensorrt_available()
    assert ok is False
    assert "tensorrt" in reason and "pip install tensorrt" in reason and "Triton image" in reason


@pytest.mark.skipif(TENSORRT_INSTALLED, reason="tensorrt is installed here")
def test_build_engines_without_tensorrt_suggests_onnx(onnx_dir, tmp_path):
    out = tmp_path / "engines"
    with pytest.raises(FailedPrecondition) as raised:
        build_engines(onnx_dir, out, fp16=True)
    assert "--format onnx" in raised.value.message and "tensorrt" in raised.value.message
    assert list(tmp_path.iterdir()) == []  # nothing staged


@pytest.mark.skipif(TENSORRT_INSTALLED, reason="tensorrt is installed here")
def test_refit_engine_without_tensorrt_suggests_onnx(tmp_path):
    plan, model = tmp_path / PLAN_FILE, tmp_path / "model.onnx"
    plan.write_bytes(b"plan")
    model.write_bytes(b"onnx")
    with pytest.raises(FailedPrecondition, match="--format onnx"):
        refit_engine(plan, model)


def test_build_engines_checks_its_arguments_first(onnx_dir, tmp_path):
    with pytest.raises(InvalidArgument, match="`onnx_dir` .* has no manifest.json"):
        build_engines(tmp_path, tmp_path / "engines", fp16=False)
    with pytest.raises(InvalidArgument, match="`out_dir` .* overlaps `onnx_dir`"):
        build_engines(onnx_dir, onnx_dir / "engines", fp16=False)
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "keep.txt").write_text("x")
    with pytest.raises(FailedPrecondition, match="overwrite=True"):
        build_engines(onnx_dir, busy, fp16=False)
    with pytest.raises(InvalidArgument, match="`workspace_gb`"):
        build_engines(onnx_dir, tmp_path / "engines", fp16=False, workspace_gb=0)
    with pytest.raises(InvalidArgument, match="`max_side`"):
        build_engines(onnx_dir, tmp_path / "engines", fp16=False, max_side=1000 + 4)
    with pytest.raises(InvalidArgument, match="`plan_path`"):
        refit_engine(tmp_path / "none.plan", tmp_path / "none.onnx")


# --- a recording stand-in for TensorRT 10's Python API ------------------------------------------------------


def fake_tensorrt(version: str = "10.9.0", *, fp16_flag: bool = True, parse_ok: bool = True, build_ok: bool = True,
                  missing_weights: tuple[str, ...] = ()) -> types.ModuleType:
    """The names build and refit use, as TensorRT 10 documents them; every call is appended to `trt.calls`.
    Plans are bytes: a JSON header saying whether the engine is refittable and which ONNX last filled it."""
    trt = types.ModuleType("tensorrt")
    trt.__version__ = version
    trt.calls = []
    record = trt.calls.append

    class Logger:
        WARNING = "WARNING"

        def __init__(self, severity):
            record(("Logger", severity))

    class BuilderFlag:
        REFIT = "REFIT"

    if fp16_flag:  # TensorRT 11 removed BuilderFlag.FP16
        BuilderFlag.FP16 = "FP16"

    class MemoryPoolType:
        WORKSPACE = "WORKSPACE"

    class Input:
        def __init__(self, name):
            self.name = name

    class Network:
        def __init__(self):
            self.inputs = []

        @property
        def num_inputs(self):
            return len(self.inputs)

        def get_input(self, index):
            return self.inputs[index]

    class OnnxParser:
        def __init__(self, network, logger):
            self.network = network
            self.num_errors = 0 if parse_ok else 1

        def parse_from_file(self, path):
            record(("parse_from_file", path))
            # The parser turns the graph's inputs into network inputs; weights are not needed for that.
            graph = onnx.load(path, load_external_data=False).graph
            self.network.inputs = [Input(value.name) for value in graph.input]
            return parse_ok

        def get_error(self, index):
            return "In node 3 (Conv): unsupported"

    class Profile:
        def set_shape(self, name, smallest, opt, largest):
            record(("set_shape", name, tuple(smallest), tuple(opt), tuple(largest)))

    class Config:
        def __init__(self):
            self.flags = []

        def set_memory_pool_limit(self, pool, size):
            record(("set_memory_pool_limit", pool, size))

        def set_flag(self, flag):
            record(("set_flag", flag))
            self.flags.append(flag)

        def add_optimization_profile(self, profile):
            record(("add_optimization_profile",))
            return 0

    class Builder:
        def __init__(self, logger):
            pass

        def create_network(self, flags):
            record(("create_network", flags))
            return Network()

        def create_builder_config(self):
            return Config()

        def create_optimization_profile(self):
            return Profile()

        def build_serialized_network(self, network, config):
            record(("build_serialized_network", [i.name for i in network.inputs]))
            if not build_ok:
                return None
            return json.dumps({"refittable": "REFIT" in config.flags, "weights_from": None}).encode()

    class Engine:
        def __init__(self, header):
            self.header = header
            self.refittable = header["refittable"]

        def serialize(self):
            record(("serialize",))
            return json.dumps(self.header).encode()

    class Runtime:
        def __init__(self, logger):
            pass

        def deserialize_cuda_engine(self, data):
            record(("deserialize_cuda_engine", len(data)))
            try:
                return Engine(json.loads(bytes(data)))
            except ValueError:
                return None

    class Refitter:
        def __init__(self, engine, logger):
            self.engine = engine
            self.supplied = None

        def get_all_weights(self):
            return ["conv_in.weight", "conv_in.bias", "to_q.weight"]

        def get_missing_weights(self):
            return [] if self.supplied is not None and not missing_weights else list(missing_weights)

        def refit_cuda_engine(self):
            record(("refit_cuda_engine",))
            self.engine.header["weights_from"] = self.supplied
            return not self.get_missing_weights()

    class OnnxParserRefitter:
        def __init__(self, refitter, logger):
            self.refitter = refitter
            self.num_errors = 0

        def refit_from_file(self, path):
            record(("refit_from_file", path))
            self.refitter.supplied = path
            return not missing_weights

        def get_error(self, index):
            return "weights missing"

    for item in (Logger, BuilderFlag, MemoryPoolType, OnnxParser, Builder, Runtime, Refitter, OnnxParserRefitter):
        setattr(trt, item.__name__, item)
    return trt


@pytest.fixture
def with_gpu(monkeypatch):
    """torch sees one CUDA GPU (tensorrt_available asks torch)."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda index=0: "Stand-in H200")
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda index=0: (9, 0))


def install(monkeypatch, trt) -> types.ModuleType:
    monkeypatch.setitem(sys.modules, "tensorrt", trt)
    return trt


def test_available_when_tensorrt_imports_and_a_gpu_is_seen(monkeypatch, with_gpu):
    install(monkeypatch, fake_tensorrt("10.9.0"))
    assert tensorrt_available() == (True, "TensorRT 10.9.0 on Stand-in H200")
    install(monkeypatch, fake_tensorrt("8.6.1"))
    ok, reason = tensorrt_available()
    assert not ok and "older than 10" in reason
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    install(monkeypatch, fake_tensorrt("10.9.0"))
    ok, reason = tensorrt_available()
    assert not ok and "no CUDA GPU" in reason


@pytest.mark.parametrize("fp16, refittable", [(True, True), (False, False)])
def test_build_makes_the_documented_calls_and_writes_the_folder(onnx_dir, onnx_manifest, tmp_path, monkeypatch,
                                                                with_gpu, fp16, refittable):
    trt = install(monkeypatch, fake_tensorrt())
    progress = []
    out = tmp_path / "engines"
    build = build_engines(onnx_dir, out, fp16=fp16, max_batch=2, min_side=128, max_side=256, workspace_gb=0.5,
                          refittable=refittable, on_progress=lambda done, total: progress.append((done, total)))
    assert progress == [(1, 3), (2, 3), (3, 3)]

    calls = trt.calls
    parsed = [c[1] for c in calls if c[0] == "parse_from_file"]
    assert parsed == [str(onnx_dir / name / "model.onnx") for name in ("text_encoder", "unet", "vae_decoder")]
    assert (onnx_dir / "unet" / "model.onnx.data").exists()  # found beside the path the parser was given
    assert [c for c in calls if c[0] == "create_network"] == [("create_network", 0)] * 3
    assert [c for c in calls if c[0] == "set_memory_pool_limit"] == [
        ("set_memory_pool_limit", "WORKSPACE", 512 * 1024 * 1024)] * 3
    flags = [c[1] for c in calls if c[0] == "set_flag"]
    assert flags.count("FP16") == (3 if fp16 else 0)
    assert flags.count("REFIT") == (3 if refittable else 0)
    # One profile per engine, a shape range for every input of its graph: exactly engine_profiles' tuples.
    expected = engine_profiles(onnx_manifest, max_batch=2, min_side=128, max_side=256)
    set_shapes = {c[1]: c[2:] for c in calls if c[0] == "set_shape"}
    assert set_shapes == {name: shape for profile in expected.values() for name, shape in profile.items()}
    # opt: the tiny model's native 64 px, raised to min_side (latent 64 at its VAE factor 2)
    assert set_shapes["sample"] == ((1, 4, 64, 64), (2, 4, 64, 64), (4, 4, 128, 128))
    assert len([c for c in calls if c[0] == "add_optimization_profile"]) == 3
    assert [c[1] for c in calls if c[0] == "build_serialized_network"] == [
        ["input_ids"], ["sample", "timestep", "encoder_hidden_states"], ["latent_sample"]]

    # The folder: one plan per component, copies of scheduler/ and tokenizer/, the manifest; no staging left.
    assert build.out_dir == out and sorted(p.name for p in tmp_path.iterdir()) == ["engines"]
    assert sorted(p.name for p in out.iterdir()) == [
        "manifest.json", "scheduler", "text_encoder", "tokenizer", "unet", "vae_decoder"]
    for name, component in build.components.items():
        assert component.path == out / name / PLAN_FILE and component.path.is_file()
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["format"] == "persona-tensorrt-stable-diffusion"
    assert manifest["tensorrt"] == "10.9.0" and manifest["device"] == "Stand-in H200"
    assert manifest["compute_capability"] == "9.0"
    assert manifest["fp16"] is fp16 and manifest["refittable"] is refittable
    sides = (manifest["min_side"], manifest["opt_side"], manifest["max_side"])
    assert manifest["max_batch"] == 2 and sides == (128, 128, 256)
    assert manifest["components"]["unet"]["profile"]["sample"] == {
        "min": [1, 4, 64, 64], "opt": [2, 4, 64, 64], "max": [4, 4, 128, 128]}
    assert manifest["source_onnx"]["sha256"] == {
        name: onnx_manifest["components"][name]["sha256"] for name in ("text_encoder", "unet", "vae_decoder")}
    for key in ("scaling_factor", "vae_scale_factor", "scheduler_config", "max_text_length", "prediction_type"):
        assert manifest[key] == onnx_manifest[key]
    assert json.loads((out / "scheduler" / "scheduler_config.json").read_text()) == onnx_manifest["scheduler_config"]


def test_build_failures_name_the_component_and_leave_nothing(onnx_dir, tmp_path, monkeypatch, with_gpu):
    install(monkeypatch, fake_tensorrt(parse_ok=False))
    with pytest.raises(FailedPrecondition, match="cannot parse the text_encoder graph .* unsupported"):
        build_engines(onnx_dir, tmp_path / "engines", fp16=False)
    install(monkeypatch, fake_tensorrt(build_ok=False))
    with pytest.raises(FailedPrecondition, match="could not build the text_encoder engine"):
        build_engines(onnx_dir, tmp_path / "engines", fp16=False)
    assert list(tmp_path.iterdir()) == []


def test_tensorrt_11_needs_an_fp16_export_for_fp16(onnx_dir, tmp_path, monkeypatch, with_gpu):
    trt = install(monkeypatch, fake_tensorrt("11.0.0", fp16_flag=False))
    with pytest.raises(FailedPrecondition, match="no BuilderFlag.FP16 .* fp32 export"):
        build_engines(onnx_dir, tmp_path / "engines", fp16=True)
    build_engines(onnx_dir, tmp_path / "engines", fp16=False)
    assert "FP16" not in [c[1] for c in trt.calls if c[0] == "set_flag"]


@pytest.fixture
def built(onnx_dir, tmp_path, monkeypatch, with_gpu):
    """Engines built through the stand-in (refittable), and the stand-in itself."""
    trt = install(monkeypatch, fake_tensorrt())
    return build_engines(onnx_dir, tmp_path / "engines", fp16=True, max_batch=1, min_side=128, max_side=128), trt


def test_refit_replaces_the_plan_atomically(built, onnx_dir, tmp_path):
    build, trt = built
    plan = build.components["unet"].path
    mode = plan.stat().st_mode
    new_unet = onnx_dir / "unet" / "model.onnx"  # the same graph; a concept's export would bring other weights
    result = refit_engine(plan, new_unet)
    assert result.plan_path == plan and result.weights == 3 and result.seconds >= 0
    assert [c for c in trt.calls if c[0] in ("refit_from_file", "refit_cuda_engine", "serialize")] == [
        ("refit_from_file", str(new_unet)), ("refit_cuda_engine",), ("serialize",)]
    assert json.loads(plan.read_bytes()) == {"refittable": True, "weights_from": str(new_unet)}
    assert plan.stat().st_mode == mode
    assert sorted(p.name for p in plan.parent.iterdir()) == [PLAN_FILE]  # no temporary file left


def test_refit_keeps_the_plan_refittable_where_tensorrt_asks(built, onnx_dir, monkeypatch):
    build, trt = built

    class SerializationFlag:
        INCLUDE_REFIT = "INCLUDE_REFIT"

    class SerializationConfig:
        def set_flag(self, flag):
            trt.calls.append(("serialization set_flag", flag))

    trt.SerializationFlag = SerializationFlag
    engine_class = type(trt.Runtime(None).deserialize_cuda_engine(b'{"refittable": true}'))
    monkeypatch.setattr(engine_class, "create_serialization_config", lambda self: SerializationConfig(), raising=False)
    monkeypatch.setattr(engine_class, "serialize_with_config",
                        lambda self, config: json.dumps(self.header).encode(), raising=False)
    refit_engine(build.components["unet"].path, onnx_dir / "unet" / "model.onnx")
    assert ("serialization set_flag", "INCLUDE_REFIT") in trt.calls
    assert ("serialize",) not in trt.calls


def test_refit_refuses_engines_built_without_refit(onnx_dir, tmp_path, monkeypatch, with_gpu):
    install(monkeypatch, fake_tensorrt())
    build = build_engines(onnx_dir, tmp_path / "engines", fp16=False, refittable=False, max_batch=1,
                          min_side=128, max_side=128)
    plan = build.components["unet"].path
    before = plan.read_bytes()
    with pytest.raises(FailedPrecondition, match="built without refit: rebuild it with refittable=True"):
        refit_engine(plan, onnx_dir / "unet" / "model.onnx")
    assert plan.read_bytes() == before


def test_refit_names_missing_weights_and_keeps_the_old_plan(built, onnx_dir, monkeypatch):
    build, _ = built
    install(monkeypatch, fake_tensorrt(missing_weights=("down_blocks.0.attentions.0.to_k.weight",)))
    plan = build.components["unet"].path
    before = plan.read_bytes()
    with pytest.raises(FailedPrecondition, match="1 weights missing \\(down_blocks.0.attentions.0.to_k.weight\\)"):
        refit_engine(plan, onnx_dir / "unet" / "model.onnx")
    assert plan.read_bytes() == before


def test_refit_reports_a_plan_tensorrt_cannot_load(built, onnx_dir, tmp_path):
    plan = tmp_path / "other.plan"
    plan.write_bytes(b"\x00not a plan")
    with pytest.raises(FailedPrecondition, match="does not load in TensorRT 10.9.0"):
        refit_engine(plan, onnx_dir / "unet" / "model.onnx")


# --- can_refit ----------------------------------------------------------------------------------------------


def test_can_refit_a_concept_of_the_same_base_model(built, onnx_manifest):
    build, _ = built
    engines = json.loads(build.manifest_path.read_text())
    ok, reason = can_refit(engines, onnx_manifest)
    assert ok and "same graph" in reason and reason.endswith("text_encoder, unet, vae_decoder unchanged")
    concept = copy.deepcopy(onnx_manifest)  # a LoRA fused into the UNet: other weights, same graph
    concept["components"]["unet"]["sha256"] = {"model.onnx": "e" * 64, "model.onnx.data": "f" * 64}
    concept["source_model"] = "/concepts/sks-dog"
    ok, reason = can_refit(engines, concept)
    assert ok and reason.endswith("; text_encoder, vae_decoder unchanged")


def test_can_refit_refuses_another_base_model_or_graph(built, onnx_manifest):
    build, _ = built
    engines = json.loads(build.manifest_path.read_text())

    wider = copy.deepcopy(onnx_manifest)  # e.g. SD-1.5 engines, an SD-2.1 concept: 768 → 1024 text features
    wider["cross_attention_dim"] = 1024
    wider["components"]["unet"]["inputs"][2]["shape"][2] = 1024
    ok, reason = can_refit(engines, wider)
    assert not ok and "cross_attention_dim differs" in reason and "different base model" in reason

    inpainting = copy.deepcopy(onnx_manifest)  # same sizes elsewhere, a 9-channel UNet input
    inpainting["components"]["unet"]["inputs"][0]["shape"][1] = 9
    ok, reason = can_refit(engines, inpainting)
    assert not ok and "unet inputs differ" in reason and "sample float32 ['batch', 9" in reason

    half = copy.deepcopy(onnx_manifest)
    half["fp16"] = not onnx_manifest["fp16"]
    ok, reason = can_refit(engines, half)
    assert not ok and "fp16 differs" in reason

    ok, reason = can_refit(engines, {"format": "something else"})
    assert not ok and "persona-onnx-stable-diffusion" in reason
    ok, reason = can_refit(onnx_manifest, onnx_manifest)  # an ONNX manifest is no engines' manifest
    assert not ok and "persona-tensorrt-stable-diffusion" in reason


def test_can_refit_needs_refittable_engines(built, onnx_manifest):
    build, _ = built
    engines = json.loads(build.manifest_path.read_text())
    engines["refittable"] = False
    ok, reason = can_refit(engines, onnx_manifest)
    assert not ok and "refittable=True" in reason


def test_a_concept_of_the_same_base_gets_engines_by_refitting_only_what_changed(built, onnx_dir, tmp_path):
    """A LoRA concept's export differs from the base's in the UNet alone: its engines are the base's with the
    UNet refitted, no build."""
    from persona.services.models.tensorrt_build import refit_engines

    build, trt = built
    concept = tmp_path / "concept-onnx"
    shutil.copytree(onnx_dir, concept)
    manifest = json.loads((concept / "manifest.json").read_text())
    manifest["components"]["unet"]["sha256"] = {"model.onnx": "0" * 64, "model.onnx.data": "1" * 64}
    (concept / "manifest.json").write_text(json.dumps(manifest))
    builds_before = len([c for c in trt.calls if c[0] == "build_serialized_network"])

    refitted = refit_engines(build.out_dir, concept, tmp_path / "concept-engines")
    assert refitted == ["unet"]
    assert len([c for c in trt.calls if c[0] == "build_serialized_network"]) == builds_before  # nothing built
    assert [c for c in trt.calls if c[0] == "refit_from_file"][-1] == ("refit_from_file",
                                                                       str(concept / "unet" / "model.onnx"))
    written = json.loads((tmp_path / "concept-engines" / "manifest.json").read_text())
    assert written["refitted"] == ["unet"] and written["source_onnx"]["sha256"]["unet"]["model.onnx"] == "0" * 64
    assert (tmp_path / "concept-engines" / "text_encoder" / PLAN_FILE).read_bytes() == (
        build.out_dir / "text_encoder" / PLAN_FILE).read_bytes()

    other_base = json.loads((concept / "manifest.json").read_text())
    other_base["cross_attention_dim"] = 768
    (concept / "manifest.json").write_text(json.dumps(other_base))
    with pytest.raises(FailedPrecondition, match="cannot take"):
        refit_engines(build.out_dir, concept, tmp_path / "other-engines")


def test_the_engines_folder_is_what_the_triton_repository_takes(built, tmp_path):
    from persona.services.generate.triton_repository import TritonRepository

    build, _ = built
    entry = TritonRepository(tmp_path / "models", component_backend="tensorrt",
                             instance_kind="KIND_GPU").add("cpt_a", build.out_dir)
    assert entry.native_resolution == 64  # the tiny model's, carried from the ONNX manifest
    for name, model in entry.components.items():
        assert (tmp_path / "models" / model / "1" / PLAN_FILE).read_bytes() == (
            build.out_dir / name / PLAN_FILE).read_bytes()
