"""One of each: the device choice, the yes/no setting parser, the bad-setting error; benchmarks outside the services,
reached by the CLI only through persona.bench."""
import ast
import re
from pathlib import Path

import pytest
import torch

import persona.client
import persona.services

from persona.services.generate.settings import GenerateSettings
from persona.services.runtime import devices
from persona.services.runtime.errors import FailedPrecondition, InvalidArgument, InvalidSetting
from persona.services.runtime.settings import RuntimeSettings, env_flag, env_int, parse_flag
from persona.services.train.settings import TrainSettings


def test_device_name_is_cuda_when_torch_sees_a_gpu_else_cpu(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert devices.device_name() == "cuda" and devices.device_name("  ") == "cuda"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert devices.device_name(None) == "cpu"
    # A device the user names is kept as named.
    assert devices.device_name("cuda:1") == "cuda:1" and devices.device_name(" cpu ") == "cpu"


@pytest.mark.parametrize("bad", ["gpu", "cuda:x", "mps", "cuda1"])
def test_device_name_rejects_what_is_not_cpu_or_cuda(bad):
    with pytest.raises(InvalidArgument, match=f"`device` is '{bad}': use cpu, cuda or cuda:N"):
        devices.device_name(bad)


def test_torch_device_refuses_cuda_where_torch_sees_none(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert devices.torch_device() == torch.device("cpu")
    with pytest.raises(FailedPrecondition, match="`device` is 'cuda:0' but torch sees no CUDA GPU: use device cpu"):
        devices.torch_device("cuda:0")
    assert devices.describe_device(torch.device("cpu")) == f"cpu ({torch.get_num_threads()} threads)"


@pytest.mark.parametrize("text, value", [("1", True), ("TRUE", True), (" yes ", True), ("on", True), ("0", False),
                                         ("false", False), ("No", False), ("off", False), ("", None), ("auto", None),
                                         (None, None)])
def test_parse_flag_reads_the_usual_spellings(text, value):
    assert parse_flag(text, "PERSONA_X") is value


def test_a_bad_flag_names_the_setting_and_the_value(monkeypatch):
    monkeypatch.setenv("PERSONA_GENERATE_COMPILE", "sometimes")
    with pytest.raises(InvalidSetting, match="`PERSONA_GENERATE_COMPILE` is 'sometimes': use 1 or 0"):
        env_flag("PERSONA_GENERATE_COMPILE")
    # Every service's settings read flags through the same parser.
    with pytest.raises(InvalidSetting, match="PERSONA_GENERATE_COMPILE"):
        GenerateSettings.from_env()
    monkeypatch.setenv("PERSONA_TRAIN_DOWNLOAD_BASE_MODELS", "maybe")
    with pytest.raises(InvalidSetting, match="`PERSONA_TRAIN_DOWNLOAD_BASE_MODELS` is 'maybe'"):
        TrainSettings.from_env()
    monkeypatch.setenv("PERSONA_RESUME_JOBS", "nope")
    with pytest.raises(InvalidSetting, match="`PERSONA_RESUME_JOBS` is 'nope'"):
        RuntimeSettings.from_env()
    monkeypatch.setenv("PERSONA_RESUME_JOBS", "off")
    assert RuntimeSettings.from_env().resume_interrupted_jobs is False


def test_every_bad_setting_is_one_error_class_a_failed_precondition(monkeypatch):
    monkeypatch.setenv("PERSONA_JOB_WORKERS", "two")
    with pytest.raises(InvalidSetting, match="`PERSONA_JOB_WORKERS` is 'two', not an integer") as caught:
        env_int("PERSONA_JOB_WORKERS", 2)
    assert caught.value.code == "FAILED_PRECONDITION"
    with pytest.raises(InvalidSetting, match="`auth` is 'open'"):
        RuntimeSettings(auth="open")
    with pytest.raises(InvalidSetting, match="`PERSONA_GENERATE_ENGINE` is 'onnx'"):
        GenerateSettings(engine="onnx")
    monkeypatch.setenv("PERSONA_TRAIN_DISPATCHER", "slurm")
    with pytest.raises(InvalidSetting, match="PERSONA_TRAIN_DISPATCHER is 'slurm'"):
        TrainSettings.from_env()


def test_text_and_list_settings_drop_spaces_and_fall_back_when_blank(monkeypatch):
    from persona.services.mask.settings import MaskSettings
    from persona.services.runtime.settings import env_list, env_text

    monkeypatch.setenv("PERSONA_MASK_DEVICE", "  ")
    monkeypatch.setenv("PERSONA_MASK_CLIP_MODEL", " /models/clip ")
    assert env_text("PERSONA_MASK_DEVICE") is None and env_text("PERSONA_MASK_DEVICE", "cpu") == "cpu"
    assert MaskSettings.from_env().clip_model == "/models/clip" and MaskSettings.from_env().device is None
    monkeypatch.setenv("PERSONA_ALLOWED_MODELS", " a/b, ,c ")
    assert env_list("PERSONA_ALLOWED_MODELS") == ("a/b", "c") == RuntimeSettings.from_env().allowed_models


def test_only_runtime_devices_asks_torch_for_a_gpu_to_choose_a_device():
    """`cuda` when available is decided in one place; elsewhere only the TensorRT check asks (it needs the GPU)."""
    services = Path(persona.services.__file__).resolve().parent
    askers = sorted(str(p.relative_to(services)) for p in services.rglob("*.py")
                    if re.search(r"torch\.cuda\.is_available\(\)", p.read_text()))
    assert askers == ["models/tensorrt_build.py", "runtime/devices.py"]


def test_the_cli_bench_commands_import_no_service_internals():
    source = (Path(persona.client.__file__).resolve().parent / "commands" / "bench.py").read_text()
    modules = [node.module or "" for node in ast.walk(ast.parse(source)) if isinstance(node, ast.ImportFrom)]
    modules += [alias.name for node in ast.walk(ast.parse(source)) if isinstance(node, ast.Import)
                for alias in node.names]
    assert not [m for m in modules if m.startswith("persona.services")], modules
    assert any(m.startswith("persona.bench") for m in modules)
