"""persona-cli train, concepts and export in the embedded default, on the built-in `tiny` base model with
a few steps at 32 px (seconds on CPU): a photo folder → subject → Case 1 captions → LoRA → exports."""
from __future__ import annotations

import io
import json
import shutil
from pathlib import Path

import pytest
import typer
from safetensors import safe_open
from typer.testing import CliRunner

from test_cli import failed, ok, ok_json

from persona.client.cli import app
from persona.client.commands import train as train_command
from persona.client.commands.session import Session
from persona.v1 import common_pb2

CLEARED_ENV = ("PERSONA_SERVER", "PERSONA_API_KEY", "PERSONA_HOME", "PERSONA_AUTH", "PERSONA_VLM_BASE_URL",
               "PERSONA_VLM_MODEL", "PERSONA_VLM_API_KEY", "PERSONA_BASE_MODEL")
TINY = ("--base-model", "tiny", "--steps", "4", "--resolution", "32")
COMPLIANT = "a photo of a sks dog lying on a green lawn next to a red rubber ball"


class Cli:
    """`persona-cli --data-dir <data_dir> …` run in-process through CliRunner."""

    def __init__(self, data_dir: Path):
        self.data_dir = data_dir
        self.runner = CliRunner()

    def __call__(self, *args, env: dict | None = None):
        return self.runner.invoke(app, ["--data-dir", str(self.data_dir), *map(str, args)], env=env)


def photo_folder(dreambench: Path, folder: Path, count: int = 3) -> Path:
    folder.mkdir(parents=True)
    for photo in sorted((dreambench / "dog").glob("*.jpg"))[:count]:
        (folder / photo.name).write_bytes(photo.read_bytes())
    return folder


@pytest.fixture(scope="module")
def clean_env():
    with pytest.MonkeyPatch.context() as mp:
        for name in CLEARED_ENV:
            mp.delenv(name, raising=False)
        yield


@pytest.fixture(scope="module")
def trained(clean_env, dreambench, tmp_path_factory):
    """One LoRA trained from a photo folder (no VLM: Case 1 captions), shared by the tests that read it."""
    root = tmp_path_factory.mktemp("train")
    cli = Cli(root / "home")
    photos = photo_folder(dreambench, root / "bruno")
    result = cli("train", photos, "--class", "dog", "--method", "lora", "--reg", "none", *TINY)
    return cli, photos, result


@pytest.fixture
def concept_id(trained) -> str:
    _, _, result = trained
    return ok(result).strip()


def test_train_from_a_photo_folder_captions_with_case_1_and_prints_the_concept(trained, concept_id):
    _, _, result = trained
    assert concept_id.startswith("cpt_") and result.stdout.strip() == concept_id  # stdout is only the id
    assert "Case 1" in result.stderr and "PERSONA_VLM_BASE_URL" in result.stderr  # the note about captions
    assert "created subject subj_" in result.stderr
    assert "step 4/4" in result.stderr  # progress lines without a TTY
    assert f"persona-cli export {concept_id}" in result.stderr


def test_concepts_list_and_show_the_concept_with_its_training_captions(trained, concept_id):
    cli, photos, _ = trained
    listed = ok_json(cli("concepts", "list", "--json"))["concepts"]
    assert [c["concept_id"] for c in listed] == [concept_id]
    table = ok(cli("concepts", "list"))
    assert concept_id in table and "READY" in table and "lora" in table and "4/4" in table

    concept = ok_json(cli("concepts", "show", concept_id, "--json"))
    assert concept["state"] == "CONCEPT_STATE_READY"
    assert (concept["method"], concept["base_model"], concept["steps_done"]) == ("lora", "tiny", 4)
    assert concept["regularizers"] in ([], ["none"])
    assert concept["options"]["steps"] == 4 and concept["options"]["resolution"] == 32
    captions = concept["training_captions"]
    assert len(captions) == len(list(photos.iterdir()))
    assert {c["text"] for c in captions} == {"a photo of a sks dog"}
    assert {c["source"] for c in captions} == {"template"}
    assert concept["files"] and all(int(f["size_bytes"]) > 0 for f in concept["files"])
    subject_id = concept["subject_id"]
    assert [c["concept_id"] for c in ok_json(cli("concepts", "list", "--subject", subject_id, "--json"))["concepts"]] \
        == [concept_id]
    assert ok_json(cli("concepts", "list", "--subject", "subj_none", "--json")) == {"concepts": []}

    human = ok(cli("concepts", "show", concept_id))
    assert "training captions" in human and "a photo of a sks dog" in human and "files" in human


def _tensors(path: Path) -> list[str]:
    with safe_open(str(path), framework="pt") as handle:
        return list(handle.keys())


def test_export_lora_and_kohya_write_safetensors(trained, concept_id, tmp_path):
    cli, _, _ = trained
    named = tmp_path / "bruno-lora.safetensors"
    written = ok_json(cli("export", concept_id, "--format", "lora", "--out", named, "--json"))["written"]
    assert [w["path"] for w in written] == [str(named)]
    assert named.stat().st_size == written[0]["size_bytes"] > 0 and _tensors(named)

    folder = tmp_path / "kohya"
    result = cli("export", concept_id, "--format", "kohya", "--out", folder)
    files = list(folder.glob("*.safetensors"))
    assert len(files) == 1 and files[0].stat().st_size > 0 and str(files[0]) in ok(result)
    assert any(key.startswith("lora_unet_") for key in _tensors(files[0]))  # kohya key layout
    assert not list(folder.glob(".*.part"))  # downloads are renamed into place


def test_export_diffusers_writes_a_model_folder(trained, concept_id, tmp_path):
    cli, _, _ = trained
    out = tmp_path / "model"
    ok(cli("export", concept_id, "--format", "diffusers", "--out", out))
    assert json.loads((out / "model_index.json").read_text())
    assert (out / "unet" / "diffusion_pytorch_model.safetensors").stat().st_size > 0


def test_bad_options_exit_1_with_one_line_naming_the_field(trained, concept_id):
    cli, _, _ = trained
    subject_id = ok_json(cli("concepts", "show", concept_id, "--json"))["subject_id"]
    assert "`steps`" in failed(cli("train", subject_id, "--base-model", "tiny", "--steps", "0"), "INVALID_ARGUMENT")
    assert "`method`" in failed(cli("train", subject_id, "--method", "nope"), "INVALID_ARGUMENT")
    assert "`resolution`" in failed(cli("train", subject_id, *TINY[:2], "--resolution", "33"), "INVALID_ARGUMENT")
    assert "--server" in failed(cli("train", subject_id, "--detach"), "FAILED_PRECONDITION")
    failed(cli("train", "subj_missing", "--base-model", "tiny"), "NOT_FOUND")
    failed(cli("export", "cpt_missing", "--format", "lora", "--out", "x.safetensors"), "NOT_FOUND")
    assert ok_json(cli("concepts", "list", "--json"))["concepts"][0]["concept_id"] == concept_id  # nothing started


def test_train_from_a_folder_needs_a_class(clean_env, dreambench, tmp_path):
    cli = Cli(tmp_path / "home")
    photos = photo_folder(dreambench, tmp_path / "photos")
    assert "--class" in failed(cli("train", photos, *TINY), "INVALID_ARGUMENT")
    assert ok_json(cli("subjects", "list", "--json")) == {"subjects": []}  # checked before any upload


def test_prior_preservation_run_with_json_and_class_captions(clean_env, dreambench, tmp_path, monkeypatch):
    monkeypatch.setattr(train_command, "LONG_RUN_S", 0.0)  # every run is "long": it says where the time went
    cli = Cli(tmp_path / "home")
    photos = photo_folder(dreambench, tmp_path / "photos", count=2)
    result = cli("train", photos, "--class", "dog", "--reg", "prior", "--num-class-images", "2", "--class-image-steps", "2",
                 "--captions", "class", "--rank", "2", "--seed", "7", *TINY, "--json")
    concept = ok_json(result)
    assert concept["state"] == "CONCEPT_STATE_READY" and concept["regularizers"] == ["prior"]
    assert concept["captions"] == "class" and concept["steps_done"] == 4
    assert (concept["options"]["num_class_images"], concept["options"]["lora_rank"]) == (2, 2)
    assert int(concept["options"]["seed"]) == 7
    assert {c["source"] for c in concept["training_captions"]} == {"class"}
    assert "Case 1" not in result.stderr  # --captions class: nothing is captioned
    spent = result.stderr.strip().splitlines()[-1]
    assert spent.startswith("took ") and "class images " in spent and "training " in spent
    assert "(2 drawn once and kept: the next concept of this class on this base model skips them)" in spent

    ok(cli("concepts", "rm", concept["concept_id"]))
    failed(cli("concepts", "show", concept["concept_id"]), "NOT_FOUND")


def test_train_through_a_vlm_uses_sid_captions(clean_env, dreambench, tmp_path, fake_vlm):
    fake_vlm.script(COMPLIANT)
    env = {"PERSONA_VLM_BASE_URL": fake_vlm.base_url, "PERSONA_VLM_MODEL": "fake-vlm", "PERSONA_VLM_API_KEY": "x",
           "PERSONA_VLM_RETRIES": "0"}
    cli = Cli(tmp_path / "home")
    photos = photo_folder(dreambench, tmp_path / "photos", count=2)
    result = cli("train", photos, "--class", "dog", "--reg", "none", *TINY, "--json", env=env)
    concept = ok_json(result)
    assert "Case 1" not in result.stderr
    assert [c["text"] for c in concept["training_captions"]] == [COMPLIANT] * 2
    assert {c["source"] for c in concept["training_captions"]} == {"vlm"}


@pytest.mark.parametrize("command", [["train"], ["concepts", "list"], ["concepts", "show"], ["concepts", "rm"],
                                     ["export"]])
def test_help_teaches_with_an_example(command):
    result = CliRunner().invoke(app, [*command, "--help"])
    assert result.exit_code == 0, result.output
    assert "Example" in result.stdout and "persona-cli" in result.stdout


# --- following a training job, without a server: events → progress lines, Ctrl-C → cancel or detach ---

def event(kind, message="", state=0, progress=0.0, **details) -> common_pb2.JobEvent:
    return common_pb2.JobEvent(job_id="job_1", type=kind, state=state, progress=progress, message=message,
                               details=common_pb2.JobProgress(**details) if details else None)


def test_progress_shows_stages_steps_losses_and_warnings(capsys):
    progress = train_command.TrainingProgress(total_steps=None)
    with progress:
        for e in [
            event(common_pb2.JOB_EVENT_TYPE_STATE, "attempt 1 started", state=common_pb2.JOB_STATE_RUNNING),
            event(common_pb2.JOB_EVENT_TYPE_PROGRESS, "class images 1/2", done=1, total=2),
            event(common_pb2.JOB_EVENT_TYPE_WARNING, "fp16 is not supported on cpu: training in fp32"),
            event(common_pb2.JOB_EVENT_TYPE_PROGRESS, "step 1", step=1, steps=2,
                  losses={"loss": 0.5, "instance": 0.3, "prior": 0.2}, it_per_s=2.0, eta_s=65),
            event(common_pb2.JOB_EVENT_TYPE_PROGRESS, "step 2", step=2, steps=2, losses={"loss": 0.25}, it_per_s=2.0,
                  eta_s=0, validation_image_ids=["val_1"]),
        ]:
            progress(e)
    err = capsys.readouterr().err
    assert "attempt 1 started" in err and "class images 1/2" in err
    assert "warning: fp16 is not supported on cpu" in err
    assert "step 1/2  loss 0.5000  (instance 0.3000, prior 0.2000)  2.00 it/s  ETA 1:05" in err
    assert "step 2/2" in err and "val_1" in err


class FakeClient:
    """Stands in for PersonaClient: the first wait is interrupted by Ctrl-C, the next one ends the job."""

    def __init__(self):
        self.cancelled = []
        self.waits = 0
        outer = self

        class Jobs:
            def CancelJob(self, request):
                outer.cancelled.append(request.job_id)
                return common_pb2.Job(job_id=request.job_id, state=common_pb2.JOB_STATE_RUNNING)

        self.jobs = Jobs()

    def wait_for_job(self, job_id, on_event=lambda e: None):
        self.waits += 1
        if self.waits == 1:
            raise KeyboardInterrupt
        return common_pb2.Job(job_id=job_id, state=common_pb2.JOB_STATE_CANCELLED)


def test_ctrl_c_then_yes_cancels_the_job_and_waits_for_it(monkeypatch, capsys):
    monkeypatch.setattr(train_command, "ask_to_cancel", lambda: True)
    client = FakeClient()
    job = train_command.follow_training(Session(server="gpu1:50051"), client, common_pb2.Job(job_id="job_1"),
                                        "cpt_1", 4)
    assert client.cancelled == ["job_1"] and job.state == common_pb2.JOB_STATE_CANCELLED
    assert "cancelling job_1" in capsys.readouterr().err


def test_ctrl_c_without_a_terminal_detaches_from_a_server(monkeypatch, capsys):
    monkeypatch.setattr(train_command.sys, "stdin", io.StringIO())  # not a TTY: no question asked
    client = FakeClient()
    with pytest.raises(typer.Exit) as exit_:
        train_command.follow_training(Session(server="gpu1:50051"), client, common_pb2.Job(job_id="job_1"),
                                      "cpt_1", 4)
    assert exit_.value.exit_code == 130 and client.cancelled == []
    assert "persona-cli jobs watch job_1" in capsys.readouterr().err


def test_generate_draws_the_trained_concept_into_png_files(trained, concept_id, tmp_path):
    from PIL import Image

    cli, _, _ = trained
    out = tmp_path / "shots"
    images = ok_json(cli("generate", concept_id, "a sks dog on the beach", "a sks dog in the snow", "-n", "2",
                         "--steps", "2", "--seed", "10", "--scheduler", "ddim", "--out", out, "--json"))
    assert [(i["prompt_index"], i["image_index"], int(i["seed"])) for i in images] == [
        (0, 0, 10), (0, 1, 11), (1, 0, 12), (1, 1, 13)]
    for image in images:
        assert Image.open(image["path"]).size == (32, 32)  # the concept's training resolution
        assert image["concept_id"] == concept_id and image["scheduler"] == "SCHEDULER_DDIM"
    failed(cli("generate", concept_id, "a sks dog", "--width", "30", "--out", out), "INVALID_ARGUMENT")


def corrupt_base_model(folder: Path) -> Path:
    """The tiny base with its UNet weights overwritten: it resolves, and the training job fails loading it."""
    from persona.services.models.builders import tiny_base_model

    shutil.copytree(tiny_base_model(folder.parent / "model-cache"), folder)
    (folder / "unet" / "diffusion_pytorch_model.safetensors").write_bytes(b"not a safetensors file")
    return folder


def test_a_failed_embedded_job_shows_its_cause_and_where_its_trace_is(clean_env, dreambench, tmp_path):
    cli = Cli(tmp_path / "home")
    photos = photo_folder(dreambench, tmp_path / "photos", count=1)
    base = corrupt_base_model(tmp_path / "broken-base")
    line = failed(cli("train", photos, "--class", "dog", "--reg", "none", "--base-model", base, "--steps", "1"),
                  "INTERNAL")
    # The error's class and message, not "see the server log" (there is none in the embedded default).
    cause = line.removeprefix("INTERNAL: ").split(" (internal error in train job ")[0]
    assert cause.startswith("OSError: ") and "diffusion_pytorch_model.safetensors" in cause
    trace_file = tmp_path / "home" / "logs" / "errors.log"
    assert line.endswith(f"trace in {trace_file}")
    trace = trace_file.read_text()
    assert "Traceback" in trace and "job_" in trace


def test_generate_without_a_terminal_prints_a_line_per_image(trained, concept_id, tmp_path):
    cli, _, _ = trained
    out = tmp_path / "shots"
    result = cli("generate", concept_id, "a sks dog on the beach", "-n", "2", "--steps", "2", "--out", out)
    ok(result)  # CliRunner's stderr is no terminal: no progress bar, plain lines
    lines = result.stderr.splitlines()
    assert lines[0] == "loading the model and drawing 2 images…"
    assert [line.split(" (")[0] for line in lines[1:3]] == ["image 1/2", "image 2/2"]
    assert lines[2].endswith(str(out / "a-sks-dog-on-the-beach-1.png"))


def test_declared_options_reach_the_server_and_a_bad_choice_fails_before_any_upload(clean_env, dreambench, tmp_path):
    """The train options persona-cli makes from the declarations (train/options.py): a flag added that way
    (--lora-target, --lr-warmup-steps) reaches the concept's options; a value outside a declared choice fails
    here, naming the option, before the photos are uploaded."""
    cli = Cli(tmp_path / "home")
    photos = photo_folder(dreambench, tmp_path / "photos", count=1)
    line = failed(cli("train", photos, "--class", "dog", "--mixed-precision", "fp64", *TINY), "INVALID_ARGUMENT")
    assert "`mixed_precision`" in line and "no, fp16, bf16" in line
    assert ok_json(cli("subjects", "list", "--json")) == {"subjects": []}
    concept = ok_json(cli("train", photos, "--class", "dog", "--reg", "none", "--captions", "class", "--lora-target",
                          "to_q", "--lora-target", "to_v", "--lr-warmup-steps", "2", "--lr-scheduler", "LINEAR",
                          *TINY, "--json"))
    assert concept["options"]["lora_targets"] == ["to_q", "to_v"] and concept["options"]["lr_warmup_steps"] == 2
    assert concept["options"]["lr_scheduler"] == "linear" and concept["options"]["steps"] == 4
