"""Concept export to ONNX and TensorRT through a real gRPC server on the tiny base model: StartExport jobs that
report each component and can be cancelled between them, cached ExportConcept files that pass onnx.checker, the
parity check failing a job, TensorRT refused where it is missing, and bad input with its code and field."""
from __future__ import annotations

import json
import shutil
import sys
import threading
import types
from pathlib import Path

import grpc
import numpy as np
import pytest

from persona.v1 import common_pb2, subjects_pb2, train_pb2

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")

ONNX_GRAPHS = ("text_encoder/model.onnx", "unet/model.onnx", "vae_decoder/model.onnx")
FP32 = dict(format=train_pb2.EXPORT_FORMAT_ONNX, fp16=False)


@pytest.fixture
def subject(client, dog_photos):
    return client.subjects.CreateSubject(subjects_pb2.CreateSubjectRequest(
        class_name="dog", images=[subjects_pb2.ImageUpload(data=d) for d in dog_photos[:2]]))


def trained(client, subject, method: str) -> train_pb2.Concept:
    """A concept of `method` trained for 3 steps at 32 px on the tiny base model."""
    job = client.train.StartTraining(train_pb2.StartTrainingRequest(
        subject_id=subject.subject_id, base_model="tiny", method=method,
        regularizers=["none"] if method != "ti" else [],
        options=train_pb2.TrainingOptions(steps=3, learning_rate=1e-2, resolution=32, checkpoint_every=0)))
    final = client.wait_for_job(job.job_id, timeout_s=600)
    assert final.state == common_pb2.JOB_STATE_SUCCEEDED, final.error
    return client.train.GetConcept(train_pb2.GetConceptRequest(concept_id=job.params["concept_id"]))


@pytest.fixture
def lora(client, subject) -> train_pb2.Concept:
    return trained(client, subject, "lora")


def run_export(client, concept_id: str, **request) -> tuple[common_pb2.Job, list[common_pb2.JobEvent]]:
    job = client.train.StartExport(train_pb2.ExportConceptRequest(concept_id=concept_id, **request))
    assert job.kind == "export" and job.params["concept_id"] == concept_id
    events: list = []
    return client.wait_for_job(job.job_id, on_event=events.append, timeout_s=600), events


def progress(events) -> list[tuple[str, common_pb2.JobProgress]]:
    return [(e.message, e.details) for e in events if e.type == common_pb2.JOB_EVENT_TYPE_PROGRESS]


def download(client, export: train_pb2.ConceptExport, folder: Path) -> Path:
    for file in export.files:
        client.read_concept_file(export.concept_id, file.artifact_id, folder / file.path)
    return folder


def _error(call) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as caught:
        call()
    return caught.value


def test_start_export_onnx_reports_each_component_and_caches_checked_graphs(app, client, lora, tmp_path):
    final, events = run_export(client, lora.concept_id, format=train_pb2.EXPORT_FORMAT_ONNX)
    assert final.state == common_pb2.JOB_STATE_SUCCEEDED, final.error
    assert final.params["format"] == "onnx" and final.params["fp16"] is False  # a CPU server defaults to fp32
    components = [(message, details.component) for message, details in progress(events) if details.component]
    assert components == [("text_encoder 1/3", "text_encoder"), ("unet 2/3", "unet"),
                          ("vae_decoder 3/3", "vae_decoder")]
    fractions = [e.progress for e in events if e.type == common_pb2.JOB_EVENT_TYPE_PROGRESS]
    assert fractions == sorted(fractions) and fractions[-1] == 1.0

    # ExportConcept of the same format and precision returns the job's files, at once and again the same.
    result = {f.path: f.artifact_id for f in final.export_result.files}
    exported = client.train.ExportConcept(train_pb2.ExportConceptRequest(concept_id=lora.concept_id, **FP32))
    assert {f.path: f.artifact_id for f in exported.files} == result and exported.fp16 is False
    assert {*ONNX_GRAPHS, "unet/model.onnx.data", "manifest.json", "scheduler/scheduler_config.json"} <= set(result)
    unset = client.train.ExportConcept(train_pb2.ExportConceptRequest(
        concept_id=lora.concept_id, format=train_pb2.EXPORT_FORMAT_ONNX))
    assert [f.artifact_id for f in unset.files] == [f.artifact_id for f in exported.files]

    folder = download(client, exported, tmp_path / "onnx")
    for graph in ONNX_GRAPHS:
        onnx.checker.check_model(str(folder / graph))
    manifest = json.loads((folder / "manifest.json").read_text())
    assert manifest["fp16"] is False
    # The graphs run in onnxruntime from the downloaded folder (the UNet finds its external weights).
    unet = ort.InferenceSession(str(folder / "unet" / "model.onnx"), providers=["CPUExecutionProvider"])
    out = unet.run(None, {"sample": np.zeros((1, 4, 4, 4), np.float32), "timestep": np.full(1, 10, np.float32),
                          "encoder_hidden_states": np.zeros((1, 8, manifest["cross_attention_dim"]), np.float32)})[0]
    assert out.shape == (1, 4, 4, 4) and np.isfinite(out).all()

    # fp16 is another export, cached under its own role; the fp32 one stays.
    half = client.train.ExportConcept(train_pb2.ExportConceptRequest(
        concept_id=lora.concept_id, format=train_pb2.EXPORT_FORMAT_ONNX, fp16=True))
    assert half.fp16 is True and {f.path for f in half.files} == set(result)
    # (vae_encoder/ is the diffusers layout's, fp32 in both: the same file.)
    assert {f.artifact_id for f in half.files if f.path.endswith(".onnx") and not f.path.startswith("vae_encoder/")
            }.isdisjoint(result.values())
    roles = {r["role"] for r in app.db.query("SELECT DISTINCT role FROM concept_files WHERE concept_id = :c",
                                             {"c": lora.concept_id})}
    assert {"export:onnx-fp32", "export:onnx-fp16", "export:diffusers"} <= roles

    # The Triton engine's view: the cached export copied into a folder once, reused after.
    target = app.models.exports.onnx_folder("acme", lora.concept_id, tmp_path / "repo" / lora.concept_id, fp16=False)
    assert (target / "manifest.json").read_bytes() == (folder / "manifest.json").read_bytes()
    stamp = (target / "unet" / "model.onnx").stat().st_mtime_ns
    assert app.models.exports.onnx_folder("acme", lora.concept_id, target, fp16=False) == target
    assert (target / "unet" / "model.onnx").stat().st_mtime_ns == stamp


def test_onnx_export_of_a_textual_inversion_concept_knows_its_token(client, subject, tmp_path):
    from transformers import CLIPTokenizer

    ti = trained(client, subject, "ti")
    final, events = run_export(client, ti.concept_id, **FP32)
    assert final.state == common_pb2.JOB_STATE_SUCCEEDED, final.error
    assert [m for m, _ in progress(events)] == ["converting to onnx fp32", "converting to diffusers",
                                                "text_encoder 1/3", "unet 2/3", "vae_decoder 3/3"]
    exported = client.train.ExportConcept(train_pb2.ExportConceptRequest(concept_id=ti.concept_id, **FP32))
    assert [f.artifact_id for f in exported.files] == [f.artifact_id for f in final.export_result.files]
    folder = download(client, exported, tmp_path / "ti")
    onnx.checker.check_model(str(folder / "text_encoder" / "model.onnx"))

    # The learned token was added to the tokenizer and its embedding to the text encoder graph before export.
    tokenizer = CLIPTokenizer.from_pretrained(folder / "tokenizer")
    token_id = tokenizer.convert_tokens_to_ids("sks")
    assert token_id >= tokenizer.vocab_size  # an added token, past the base vocabulary
    ids = tokenizer("a sks dog", padding="max_length", max_length=8, truncation=True, return_tensors="np").input_ids
    assert token_id in ids
    # persona's graph (int64 ids, the manifest's path) and diffusers' (int32 ids) give the same embedding.
    manifest = json.loads((folder / "manifest.json").read_text())
    persona = ort.InferenceSession(str(folder / manifest["components"]["text_encoder"]["path"]),
                                   providers=["CPUExecutionProvider"])
    hidden = persona.run(None, {"input_ids": ids.astype(np.int64)})[0]
    diffusers_graph = ort.InferenceSession(str(folder / "text_encoder" / "model.onnx"),
                                           providers=["CPUExecutionProvider"])
    assert np.isfinite(hidden).all()
    assert np.array_equal(diffusers_graph.run(None, {"input_ids": ids.astype(np.int32)})[0], hidden)


def test_onnx_export_is_a_folder_diffusers_onnx_pipeline_loads(client, lora, tmp_path):
    """OnnxStableDiffusionPipeline.from_pretrained(folder) — what `persona-cli export --format onnx --help`
    says loads it — loads the downloaded export and draws with it."""
    from diffusers import OnnxStableDiffusionPipeline

    final, _ = run_export(client, lora.concept_id, **FP32)
    assert final.state == common_pb2.JOB_STATE_SUCCEEDED, final.error
    folder = download(client, client.train.ExportConcept(train_pb2.ExportConceptRequest(
        concept_id=lora.concept_id, **FP32)), tmp_path / "onnx")
    manifest = json.loads((folder / "manifest.json").read_text())
    assert manifest["components"]["text_encoder"]["path"] == "text_encoder_int64/model.onnx"
    assert json.loads((folder / "model_index.json").read_text())["_class_name"] == "OnnxStableDiffusionPipeline"

    from persona.client.commands.export import ONNX_LOADING
    from test_train_methods import _export_format_help
    assert ONNX_LOADING in _export_format_help()
    namespace = {"OnnxStableDiffusionPipeline": OnnxStableDiffusionPipeline, "OUT": folder}
    exec(f"pipe = {ONNX_LOADING}", namespace)  # exactly what `persona-cli export --help` says
    pipe = namespace["pipe"]
    images = pipe("a sks dog", num_inference_steps=2, height=32, width=32, output_type="np",
                  generator=np.random.RandomState(0)).images
    side = 32 // 8 * manifest["vae_scale_factor"]  # the pipeline assumes SD's VAE factor 8; tiny's is smaller
    assert images.shape == (1, side, side, 3) and np.isfinite(images).all() and images.std() > 0


def test_cancel_stops_between_components_and_caches_nothing(app, client, lora, monkeypatch):
    from persona.services.models import onnx_export

    real = onnx_export.export_pipeline_to_onnx
    cancel_sent = threading.Event()

    def paused_after_the_first_component(model_dir, out_dir, *, on_progress=None, **kwargs):
        def report(done, total):
            on_progress(done, total)
            if done == 1:
                assert cancel_sent.wait(60)
        return real(model_dir, out_dir, on_progress=report, **kwargs)

    monkeypatch.setattr(onnx_export, "export_pipeline_to_onnx", paused_after_the_first_component)
    job = client.train.StartExport(train_pb2.ExportConceptRequest(concept_id=lora.concept_id, **FP32))
    for event in client.jobs.WatchJob(common_pb2.WatchJobRequest(job_id=job.job_id), timeout=300):
        if event.type == common_pb2.JOB_EVENT_TYPE_PROGRESS and event.message == "text_encoder 1/3":
            break
    client.jobs.CancelJob(common_pb2.CancelJobRequest(job_id=job.job_id))
    cancel_sent.set()
    final = client.wait_for_job(job.job_id, timeout_s=300)
    assert final.state == common_pb2.JOB_STATE_CANCELLED
    stored = app.db.query("SELECT role FROM concept_files WHERE concept_id = :c AND role LIKE 'export:onnx%'",
                          {"c": lora.concept_id})
    assert stored == []
    assert not any((app.settings.data_dir / "exports" / ".scratch").iterdir())  # staging and scratch removed


def test_a_parity_failure_fails_the_job_with_its_diffs(app, client, lora, monkeypatch):
    from persona.services.models import onnx_export

    monkeypatch.setattr(onnx_export, "DEFAULT_TOLERANCE", {False: 0.0, True: 0.0})
    final, _ = run_export(client, lora.concept_id, **FP32)
    assert final.state == common_pb2.JOB_STATE_FAILED and final.error.code == "FAILED_PRECONDITION"
    assert "max abs diff" in final.error.message and "unet" in final.error.message
    assert not app.db.query("SELECT role FROM concept_files WHERE role LIKE 'export:onnx%'")


def _pretend_tensorrt_is_missing(monkeypatch) -> None:
    """On a machine that can build engines, make it one that cannot; elsewhere the real refusal is tested."""
    try:
        from persona.services.models import tensorrt_build
    except ImportError:
        return
    if tensorrt_build.tensorrt_available()[0]:
        monkeypatch.setattr(tensorrt_build, "tensorrt_available", lambda: (False, "tensorrt is not installed"))


def test_tensorrt_without_tensorrt_is_failed_precondition_suggesting_onnx(app, client, lora, monkeypatch):
    _pretend_tensorrt_is_missing(monkeypatch)
    request = train_pb2.ExportConceptRequest(concept_id=lora.concept_id, format=train_pb2.EXPORT_FORMAT_TENSORRT)
    for call in (client.train.StartExport, client.train.ExportConcept):
        error = _error(lambda: call(request))
        assert error.code() == grpc.StatusCode.FAILED_PRECONDITION, error.details()
        assert "tensorrt" in error.details() and "onnx" in error.details()
    assert app.db.query_one("SELECT COUNT(*) AS n FROM jobs WHERE kind = 'export'")["n"] == 0


def test_tensorrt_builds_engines_from_the_onnx_export_of_its_precision(app, client, lora, monkeypatch):
    """With a stand-in builder (the real one needs TensorRT and a GPU): the onnx export comes first, the engines
    after it, each step reported, the engines cached per precision."""
    import persona.services.models as models_package

    calls = []

    def build_engines(onnx_dir: Path, out_dir: Path, *, fp16: bool, max_batch: int = 8, on_progress=None):
        calls.append((json.loads((onnx_dir / "manifest.json").read_text())["fp16"], fp16))
        for done, name in enumerate(("text_encoder", "unet", "vae_decoder"), 1):
            assert (onnx_dir / name / "model.onnx").exists()
            (out_dir / name).mkdir(parents=True)
            (out_dir / name / "model.plan").write_bytes(f"engine {name} fp16={fp16}".encode())
            on_progress(done, 3)
        (out_dir / "manifest.json").write_text(json.dumps({"refittable": True}))
        return out_dir

    fake = types.ModuleType("persona.services.models.tensorrt_build")
    fake.tensorrt_available = lambda: (True, "")
    fake.build_engines = build_engines
    monkeypatch.setitem(sys.modules, fake.__name__, fake)
    monkeypatch.setattr(models_package, "tensorrt_build", fake, raising=False)

    final, events = run_export(client, lora.concept_id, format=train_pb2.EXPORT_FORMAT_TENSORRT, fp16=True)
    assert final.state == common_pb2.JOB_STATE_SUCCEEDED, final.error
    assert calls == [(True, True)]  # fp16 graphs for fp16 engines
    messages = [m for m, _ in progress(events)]
    assert messages == ["converting to tensorrt fp16", "converting to onnx fp16", "converting to diffusers",
                        "text_encoder 1/3", "unet 2/3", "vae_decoder 3/3", "tensorrt text_encoder 1/3",
                        "tensorrt unet 2/3", "tensorrt vae_decoder 3/3"]
    assert sorted(f.path for f in final.export_result.files) == [
        "manifest.json", "text_encoder/model.plan", "unet/model.plan", "vae_decoder/model.plan"]
    again = client.train.ExportConcept(train_pb2.ExportConceptRequest(
        concept_id=lora.concept_id, format=train_pb2.EXPORT_FORMAT_TENSORRT, fp16=True))
    assert [f.artifact_id for f in again.files] == [f.artifact_id for f in final.export_result.files]
    assert calls == [(True, True)]  # cached: not built again
    roles = {r["role"] for r in app.db.query("SELECT DISTINCT role FROM concept_files WHERE concept_id = :c",
                                             {"c": lora.concept_id})}
    assert {"export:tensorrt-fp16", "export:onnx-fp16"} <= roles  # the onnx export on the way is kept too

    # A second concept on the same base: its engines are the first's with the changed weights refitted, no build.
    refits = []

    def refit_engines(donor: Path, onnx_dir: Path, out_dir: Path, *, on_progress=None):
        refits.append(sorted(p.name for p in donor.iterdir()))
        shutil.copytree(donor, out_dir)
        on_progress(1, 1)
        return ["unet"]

    fake.can_refit = lambda old, new: (old.get("refittable") is True, "")
    fake.refit_engines = refit_engines
    second = trained(client, client.subjects.GetSubject(subjects_pb2.GetSubjectRequest(subject_id=lora.subject_id)),
                     "lora")
    final, events = run_export(client, second.concept_id, format=train_pb2.EXPORT_FORMAT_TENSORRT, fp16=True)
    assert final.state == common_pb2.JOB_STATE_SUCCEEDED, final.error
    assert calls == [(True, True)] and refits == [["manifest.json", "text_encoder", "unet", "vae_decoder"]]
    assert "tensorrt refit 1/1" in [m for m, _ in progress(events)]


BAD_REQUESTS = [
    # (what, request fields ({lora} is the trained concept), code, words the message must contain)
    ("unknown concept", dict(concept_id="cpt_nope", format=train_pb2.EXPORT_FORMAT_ONNX), "NOT_FOUND", ["cpt_nope"]),
    ("empty concept id", dict(format=train_pb2.EXPORT_FORMAT_ONNX), "INVALID_ARGUMENT", ["`concept_id`"]),
    ("format unspecified", dict(concept_id="{lora}"), "INVALID_ARGUMENT", ["`format`", "ONNX"]),
    ("format out of range", dict(concept_id="{lora}", format=99), "INVALID_ARGUMENT", ["`format`"]),
    ("fp16 for lora", dict(concept_id="{lora}", format=train_pb2.EXPORT_FORMAT_LORA, fp16=True), "INVALID_ARGUMENT",
     ["`fp16`", "onnx"]),
    ("ti of a lora concept", dict(concept_id="{lora}", format=train_pb2.EXPORT_FORMAT_TI), "FAILED_PRECONDITION",
     ["`format`", "onnx"]),
]


@pytest.mark.parametrize("what, fields, code, words", BAD_REQUESTS, ids=[b[0] for b in BAD_REQUESTS])
def test_bad_requests_name_the_field_and_queue_nothing(app, client, lora, what, fields, code, words):
    fields = {k: (lora.concept_id if v == "{lora}" else v) for k, v in fields.items()}
    for call in (client.train.StartExport, client.train.ExportConcept):
        error = _error(lambda: call(train_pb2.ExportConceptRequest(**fields)))
        assert error.code().name == code, error.details()
        for word in words:
            assert word in error.details(), error.details()
    assert app.db.query_one("SELECT COUNT(*) AS n FROM jobs WHERE kind = 'export'")["n"] == 0


def test_another_tenants_concept_is_not_found_and_no_weights_is_failed_precondition(app, client, client_for, lora):
    other = client_for("globex")
    hidden = _error(lambda: other.train.StartExport(train_pb2.ExportConceptRequest(
        concept_id=lora.concept_id, format=train_pb2.EXPORT_FORMAT_ONNX)))
    assert hidden.code() == grpc.StatusCode.NOT_FOUND
    app.db.execute("DELETE FROM concept_files WHERE concept_id = :c", {"c": lora.concept_id})
    empty = _error(lambda: client.train.StartExport(train_pb2.ExportConceptRequest(
        concept_id=lora.concept_id, format=train_pb2.EXPORT_FORMAT_ONNX)))
    assert empty.code() == grpc.StatusCode.FAILED_PRECONDITION and "no weights" in empty.details()
