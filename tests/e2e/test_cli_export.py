"""persona-cli export to onnx and tensorrt in the embedded default, on a LoRA trained from a photo folder on the
built-in `tiny` base model: an export job with a line per component, the files written, cached on a second run,
Ctrl-C cancelling the job, and the refusals with their codes."""
from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from test_cli import failed, ok, ok_json
from test_cli_train import TINY, Cli, photo_folder
from test_cli_train import FakeClient as InterruptedClient

from persona.client import jobwatch
from persona.client.cli import app
from persona.v1 import common_pb2

onnx = pytest.importorskip("onnx")

GRAPHS = ("text_encoder/model.onnx", "unet/model.onnx", "vae_decoder/model.onnx")


@pytest.fixture(scope="module")
def trained(clean_env, dreambench, tmp_path_factory) -> tuple[Cli, str]:
    root = tmp_path_factory.mktemp("export")
    cli = Cli(root / "home")
    photos = photo_folder(dreambench, root / "bruno", count=2)
    concept_id = ok(cli("train", photos, "--class", "dog", "--method", "lora", "--reg", "none", "--captions", "class",
                        *TINY)).strip()
    return cli, concept_id


@pytest.fixture(scope="module")
def clean_env():
    from test_cli_train import CLEARED_ENV

    with pytest.MonkeyPatch.context() as mp:
        for name in CLEARED_ENV:
            mp.delenv(name, raising=False)
        yield


def test_export_onnx_writes_checked_graphs_with_a_line_per_component(trained, tmp_path):
    cli, concept_id = trained
    out = tmp_path / "bruno-onnx"
    result = cli("export", concept_id, "--format", "onnx", "--out", out)
    table = ok(result)
    for graph in GRAPHS:
        onnx.checker.check_model(str(out / graph))
        assert str(out / graph) in table
    assert (out / "unet" / "model.onnx.data").stat().st_size > 0
    assert (out / "tokenizer").is_dir() and (out / "scheduler" / "scheduler_config.json").exists()
    assert json.loads((out / "manifest.json").read_text())["fp16"] is False  # the server exports on CPU: fp32
    # Without a TTY the job's progress is one line per component.
    assert "(fp32): job job_" in result.stderr
    for line in ("text_encoder 1/3", "unet 2/3", "vae_decoder 3/3"):
        assert line in result.stderr
    assert f"of the onnx export of {concept_id} to {out}" in result.stderr


def test_export_onnx_fp16_json_is_cached_on_a_second_run(trained, tmp_path):
    cli, concept_id = trained
    first = ok_json(cli("export", concept_id, "--format", "onnx", "--fp16", "--out", tmp_path / "a", "--json"))
    assert first["export"]["fp16"] is True and first["export"]["format"] == "EXPORT_FORMAT_ONNX"
    assert {w["file"] for w in first["written"]} >= {*GRAPHS, "manifest.json"}
    assert json.loads((tmp_path / "a" / "manifest.json").read_text())["fp16"] is True

    again = cli("export", concept_id, "--format", "onnx", "--fp16", "--out", tmp_path / "b", "--json")
    assert [f["artifact_id"] for f in ok_json(again)["export"]["files"]] == \
        [f["artifact_id"] for f in first["export"]["files"]]
    assert "already cached" in again.stderr and "unet 2/3" not in again.stderr


def test_refusals_exit_1_naming_the_option(trained, tmp_path):
    cli, concept_id = trained
    assert "--fp16/--fp32" in failed(cli("export", concept_id, "--format", "lora", "--fp32", "--out", tmp_path / "x"),
                                     "INVALID_ARGUMENT")
    failed(cli("export", "cpt_missing", "--format", "onnx", "--out", tmp_path / "y"), "NOT_FOUND")
    assert not (tmp_path / "y").exists()


def test_tensorrt_without_tensorrt_says_so_and_suggests_onnx(trained, tmp_path, monkeypatch):
    try:
        from persona.services.models import tensorrt_build
    except ImportError:
        tensorrt_build = None
    if tensorrt_build is not None and tensorrt_build.tensorrt_available()[0]:  # a GPU machine with TensorRT
        monkeypatch.setattr(tensorrt_build, "tensorrt_available", lambda: (False, "tensorrt is not installed"))
    cli, concept_id = trained
    line = failed(cli("export", concept_id, "--format", "tensorrt", "--out", tmp_path / "trt"), "FAILED_PRECONDITION")
    assert "tensorrt" in line and "--format onnx" in line
    assert not (tmp_path / "trt").exists()


def test_ctrl_c_cancels_the_export_job_and_waits_for_it(capsys):
    client = InterruptedClient()
    job = jobwatch.follow_or_cancel(client, common_pb2.Job(job_id="job_1"), jobwatch.JobProgress(),
                                    "cancelling job_1: it stops after the component in progress…")
    assert client.cancelled == ["job_1"] and job.state == common_pb2.JOB_STATE_CANCELLED
    assert "cancelling job_1" in capsys.readouterr().err


def test_help_teaches_what_each_format_is_for():
    result = CliRunner().invoke(app, ["export", "--help"], env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    for words in ("onnx", "Triton", "onnxruntime", "tensorrt", "NVIDIA", "--fp16", "--fp32", "Ctrl-C"):
        assert words in result.stdout, words
