"""persona-cli encoder train and list in the embedded default, on the built-in `tiny` base model and toy-world views:
the job's steps on stderr, the encoder's id and folder on stdout, the encoder listed; a dataset whose subject has a
single view refused naming the field."""
from __future__ import annotations

import shutil

from typer.testing import CliRunner

from test_cli import failed, ok, ok_json

from persona.bench.toyworld_views import write_multiview_dataset
from persona.client.cli import app


def test_encoder_train_then_list_and_a_one_view_subject_refused(tmp_path, model_cache):
    views = write_multiview_dataset(tmp_path / "views", subjects=2, views=2, seed=0, size=64)
    env = {"PERSONA_MODEL_CACHE": str(model_cache), "PERSONA_TRAIN_DEVICE": "cpu", "PERSONA_SERVER": "",
           "PERSONA_BASE_MODEL": ""}
    runner = CliRunner()

    def cli(*args):
        return runner.invoke(app, ["--data-dir", str(tmp_path / "home"), *map(str, args)], env=env)

    result = cli("encoder", "train", views, "--base-model", "tiny", "--steps", "2", "--lr", "1e-3")
    out = ok(result)
    assert "step 2/2" in result.stderr
    assert out.startswith("encoder enc_") and str(tmp_path / "home" / "encoders") in out
    encoder_id = out.split()[1].rstrip(":")
    assert (tmp_path / "home" / "encoders" / encoder_id / "mfi_encoder.safetensors").is_file()

    listed = ok_json(cli("--json", "encoder", "list"))["encoders"]
    assert [(j["encoder_train_result"]["encoder_id"], j["state"]) for j in listed] == [
        (encoder_id, "JOB_STATE_SUCCEEDED")]

    one_view = tmp_path / "one-view"
    shutil.copytree(views, one_view)
    subject = sorted(p for p in one_view.iterdir() if p.is_dir())[0]
    for view in sorted(subject.glob("*.png"))[1:]:
        view.unlink()
    line = failed(cli("encoder", "train", one_view, "--base-model", "tiny"), "INVALID_ARGUMENT")
    assert "`dataset` subject folder" in line and "has 1 view(s)" in line
