"""TrainService through a real gRPC server on the tiny base model: training, captions, prior cache, exports that
load in plain diffusers, cancel, isolation, out-of-memory, and every bad input with its code and field."""
from __future__ import annotations

import time
from pathlib import Path

import grpc
import numpy as np
import pytest
import torch
from PIL import Image

from persona.v1 import caption_pb2, common_pb2, subjects_pb2, train_pb2, train_pb2_grpc
from persona.services.train import domain as train_domain

# 32 px keeps a step near 0.2 s on two CPU cores; learning rates at which a few steps visibly move the output.
SMALL = dict(resolution=32, checkpoint_every=0, class_image_steps=2)
PROMPT = "a photo of sks dog"


def _stub(client) -> train_pb2_grpc.TrainServiceStub:
    return train_pb2_grpc.TrainServiceStub(client.channel)


@pytest.fixture
def subject(client, dog_photos):
    return client.subjects.CreateSubject(subjects_pb2.CreateSubjectRequest(
        class_name="dog", images=[subjects_pb2.ImageUpload(data=d, filename=f"{i}.jpg")
                                  for i, d in enumerate(dog_photos)]))


def start(client, subject_id: str, method: str = "lora", regularizers=("none",), captions: str = "",
          **options) -> common_pb2.Job:
    return _stub(client).StartTraining(train_pb2.StartTrainingRequest(
        subject_id=subject_id, base_model="tiny", method=method, regularizers=list(regularizers), captions=captions,
        options=train_pb2.TrainingOptions(**{**SMALL, **options})))


def finish(client, job: common_pb2.Job, events: list | None = None) -> tuple[common_pb2.Job, train_pb2.Concept]:
    final = client.wait_for_job(job.job_id, on_event=(events.append if events is not None else lambda e: None),
                                timeout_s=600)
    concept = _stub(client).GetConcept(train_pb2.GetConceptRequest(concept_id=job.params["concept_id"]))
    return final, concept


def download(client, concept_id: str, files, folder: Path) -> Path:
    for file in files:
        target = folder / file.path
        target.parent.mkdir(parents=True, exist_ok=True)
        chunks = _stub(client).ReadConceptFile(train_pb2.ReadConceptFileRequest(
            concept_id=concept_id, artifact_id=file.artifact_id))
        target.write_bytes(b"".join(c.data for c in chunks))
        assert target.stat().st_size == file.size_bytes
    return folder


def export(client, concept_id: str, fmt: int, folder: Path) -> Path:
    exported = _stub(client).ExportConcept(train_pb2.ExportConceptRequest(concept_id=concept_id, format=fmt))
    assert exported.files
    return download(client, concept_id, exported.files, folder)


def _pipe(path):
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(path, safety_checker=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _sample(pipe, prompt: str = PROMPT) -> np.ndarray:
    return pipe(prompt, height=64, width=64, num_inference_steps=2, generator=torch.Generator().manual_seed(0),
                output_type="np").images


def _error(call) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as caught:
        call()
    return caught.value


def test_lora_trains_on_sid_captions_and_every_export_loads_in_plain_diffusers(app, client, subject, tmp_path):
    from persona.services.models.builders import tiny_base_model

    first = subject.images[0].image_id
    sid = "a photo of a sks dog lying on a green fluffy blanket next to a black leather purse"
    client.captions.SetCaption(caption_pb2.SetCaptionRequest(
        image=common_pb2.ImageRef(subject_id=subject.subject_id, image_id=first), text=sid))
    events: list = []
    job = start(client, subject.subject_id, steps=6, learning_rate=1e-2, validation_every=3)
    assert job.kind == "train" and job.subject_id == subject.subject_id and job.params["concept_id"]
    final, concept = finish(client, job, events)

    assert final.state == common_pb2.JOB_STATE_SUCCEEDED, final.error
    assert concept.state == train_pb2.CONCEPT_STATE_READY and concept.steps_done == 6
    assert concept.method == "lora" and concept.base_model == "tiny" and len(concept.base_model_sha256) == 64
    assert concept.resolution == 32 and concept.options.steps == 6 and concept.options.lora_rank == 4
    # The stored SID caption trains its image; images without one get the class template, and say so.
    captions = {c.image.image_id: (c.text, c.source) for c in concept.training_captions}
    assert captions[first] == (sid, "user")
    assert {captions[i.image_id] for i in subject.images[1:]} == {("a photo of a sks dog", "class")}
    # Progress events carry step, loss terms, speed and ETA in typed fields (and, for older clients, in `data`);
    # validation images are files of the concept.
    steps = [e.details for e in events if e.type == common_pb2.JOB_EVENT_TYPE_PROGRESS and e.details.stage == "train"]
    assert steps[-1].step == 6 and steps[-1].steps == 6 and isinstance(steps[-1].step, int)
    assert {"loss", "instance"} <= set(steps[-1].losses) and steps[-1].it_per_s > 0 and steps[-1].eta_s == 0
    last = next(e for e in reversed(events) if e.details.stage == "train")
    assert last.data["step"] == 6 and last.data["loss"] == pytest.approx(steps[-1].losses["loss"])
    assert [v.step for v in concept.validation_images] == [3, 6]
    png = download(client, concept.concept_id, [train_pb2.ConceptFile(
        path="v.png", artifact_id=concept.validation_images[0].artifact_id,
        size_bytes=app.artifacts.path_of(concept.validation_images[0].artifact_id).stat().st_size)], tmp_path / "v")
    assert Image.open(png / "v.png").size == (32, 32)
    assert [list(e.details.validation_image_ids) for e in events if e.details.stage == "validation"] == [
        [concept.validation_images[0].artifact_id], [concept.validation_images[1].artifact_id]]
    # The job's typed result.
    assert final.train_result.concept_id == concept.concept_id and final.train_result.steps == 6
    assert set(final.train_result.stage_seconds) >= {"preparing", "training", "saving"}

    # Exports: the diffusers/peft LoRA, the same LoRA in kohya layout, and a fused diffusers folder all draw
    # the same images in plain diffusers — and not the base model's.
    base = tiny_base_model(app.train.settings.base_model_cache_dir)
    lora_dir = export(client, concept.concept_id, train_pb2.EXPORT_FORMAT_LORA, tmp_path / "lora")
    kohya_dir = export(client, concept.concept_id, train_pb2.EXPORT_FORMAT_KOHYA, tmp_path / "kohya")
    fused_dir = export(client, concept.concept_id, train_pb2.EXPORT_FORMAT_DIFFUSERS, tmp_path / "fused")
    kohya_file = next(kohya_dir.glob("*.safetensors"))
    from safetensors import safe_open
    from safetensors.torch import load_file
    assert all(k.startswith("lora_unet_") for k in load_file(kohya_file))
    with safe_open(str(kohya_file), framework="pt") as f:
        header = f.metadata()
    # `tiny` labelled at the size it trained at, with the base model UIs show and the hash they index by.
    assert (header["ss_resolution"], header["modelspec.resolution"]) == ("(32, 32)", "32x32")
    assert (header["ss_sd_model_name"], header["ss_base_model_version"]) == ("tiny", "sd_v1")
    assert header["persona_base_model_sha256"] == concept.base_model_sha256
    data = kohya_file.read_bytes()
    import hashlib
    assert header["sshs_model_hash"] == hashlib.sha256(data[8 + int.from_bytes(data[:8], "little"):]).hexdigest()

    pipe = _pipe(base)
    plain = _sample(pipe)
    pipe.load_lora_weights(lora_dir, weight_name="pytorch_lora_weights.safetensors")
    with_lora = _sample(pipe)
    pipe.unload_lora_weights()
    pipe.load_lora_weights(str(kohya_file))
    with_kohya = _sample(pipe)
    fused = _sample(_pipe(fused_dir))
    assert np.abs(with_lora - plain).max() > 1e-3
    assert np.abs(with_kohya - with_lora).max() < 1e-4
    assert np.abs(fused - with_lora).max() < 1e-4
    # A second export is the same stored files, not a new conversion.
    again = _stub(client).ExportConcept(train_pb2.ExportConceptRequest(
        concept_id=concept.concept_id, format=train_pb2.EXPORT_FORMAT_KOHYA))
    assert [f.artifact_id for f in again.files] == [f.artifact_id for f in _stub(client).ExportConcept(
        train_pb2.ExportConceptRequest(concept_id=concept.concept_id, format=train_pb2.EXPORT_FORMAT_KOHYA)).files]
    assert _stub(client).ListConcepts(train_pb2.ListConceptsRequest()).concepts[0].concept_id == concept.concept_id


def test_dreambooth_and_textual_inversion_export_what_diffusers_loads(app, client, subject, tmp_path):
    from persona.services.models.builders import tiny_base_model

    base = _pipe(tiny_base_model(app.train.settings.base_model_cache_dir))
    plain = _sample(base)
    db_job = start(client, subject.subject_id, method="dreambooth", steps=3, learning_rate=5e-4)
    ti_job = start(client, subject.subject_id, method="ti", regularizers=(), steps=3, learning_rate=1e-1)
    _, dreambooth = finish(client, db_job)
    _, ti = finish(client, ti_job)
    assert dreambooth.state == ti.state == train_pb2.CONCEPT_STATE_READY
    assert "unet/diffusion_pytorch_model.safetensors" in {f.path for f in dreambooth.files}
    assert ti.regularizers == []  # prior preservation is not on by default for textual inversion

    folder = export(client, dreambooth.concept_id, train_pb2.EXPORT_FORMAT_DIFFUSERS, tmp_path / "db")
    assert np.abs(_sample(_pipe(folder)) - plain).max() > 1e-3

    ti_dir = export(client, ti.concept_id, train_pb2.EXPORT_FORMAT_TI, tmp_path / "ti")
    base.load_textual_inversion(str(ti_dir / "learned_embeds.safetensors"), token="sks")
    assert np.abs(_sample(base) - plain).max() > 1e-4

    wrong = _error(lambda: _stub(client).ExportConcept(train_pb2.ExportConceptRequest(
        concept_id=ti.concept_id, format=train_pb2.EXPORT_FORMAT_KOHYA)))
    assert wrong.code() == grpc.StatusCode.FAILED_PRECONDITION and "lora" in wrong.details()


@pytest.mark.parametrize("method, learning_rate", [("dreambooth", 5e-4), ("lora", 1e-2)])
def test_loss_goes_down_over_30_steps_on_4_photos(client, subject, method, learning_rate):
    final, concept = finish(client, start(client, subject.subject_id, method=method, steps=30,
                                          learning_rate=learning_rate))
    curve = list(final.train_result.loss_curve)
    assert len(curve) == 30 and final.train_result.loss_curve_every == 1
    assert np.mean(curve[-5:]) < 0.9 * np.mean(curve[:5]), curve
    assert concept.final_loss == pytest.approx(curve[-1], abs=1e-5)


def test_prior_class_images_are_generated_once_and_reused(client, subject):
    first, concept = finish(client, start(client, subject.subject_id, regularizers=("prior",), steps=2,
                                          num_class_images=2))
    assert first.state == common_pb2.JOB_STATE_SUCCEEDED, first.error
    assert concept.regularizers == ["prior"] and concept.options.class_prompt == "a photo of a dog"
    assert first.train_result.class_images_generated == 2 and first.train_result.class_images_reused == 0
    second, _ = finish(client, start(client, subject.subject_id, regularizers=(), steps=2,  # prior by default
                                     num_class_images=2))
    assert second.train_result.class_images_generated == 0 and second.train_result.class_images_reused == 2


def test_captions_class_uses_the_case_1_template_for_every_image(client, subject):
    image = subject.images[0].image_id
    client.captions.SetCaption(caption_pb2.SetCaptionRequest(
        image=common_pb2.ImageRef(subject_id=subject.subject_id, image_id=image), text="a sks dog on a red sofa"))
    _, concept = finish(client, start(client, subject.subject_id, captions="class", steps=1))
    assert concept.captions == "class"
    assert {(c.text, c.source) for c in concept.training_captions} == {("a photo of a sks dog", "class")}


def test_cancel_stops_within_a_step_and_keeps_usable_weights(client, subject, tmp_path):
    job = start(client, subject.subject_id, steps=5000)
    for event in client.jobs.WatchJob(common_pb2.WatchJobRequest(job_id=job.job_id), timeout=300):
        if event.type == common_pb2.JOB_EVENT_TYPE_PROGRESS and event.details.step >= 2:
            break
    client.jobs.CancelJob(common_pb2.CancelJobRequest(job_id=job.job_id))
    final, concept = finish(client, job)
    assert final.state == common_pb2.JOB_STATE_CANCELLED
    assert concept.state == train_pb2.CONCEPT_STATE_CANCELLED and 2 <= concept.steps_done < 5000
    exported = export(client, concept.concept_id, train_pb2.EXPORT_FORMAT_LORA, tmp_path / "lora")
    assert (exported / "pytorch_lora_weights.safetensors").stat().st_size > 0


def test_cancel_stops_a_long_step_in_the_middle(client, subject):
    """At 192 px the tiny UNet attends over 9 216 latent pixels: a step takes seconds on a CPU, and a cancel
    asked during one ends the job without finishing it (the loop asks between the UNet's attentions and resnets)."""
    job = start(client, subject.subject_id, steps=50, resolution=192)
    for event in client.jobs.WatchJob(common_pb2.WatchJobRequest(job_id=job.job_id), timeout=600):
        if event.type == common_pb2.JOB_EVENT_TYPE_PROGRESS and event.details.step >= 1:
            break
    asked = time.monotonic()
    client.jobs.CancelJob(common_pb2.CancelJobRequest(job_id=job.job_id))
    final, concept = finish(client, job)
    print(f"cancelled {time.monotonic() - asked:.1f} s after CancelJob, at step {concept.steps_done} of 50")
    assert final.state == common_pb2.JOB_STATE_CANCELLED and concept.state == train_pb2.CONCEPT_STATE_CANCELLED
    assert 1 <= concept.steps_done < 50


def test_two_jobs_for_one_subject_run_apart(app, client, subject):
    jobs = [start(client, subject.subject_id, steps=3, seed=seed, learning_rate=1e-2) for seed in (1, 2)]
    concepts = [finish(client, job)[1] for job in jobs]
    assert all(c.state == train_pb2.CONCEPT_STATE_READY for c in concepts)
    assert concepts[0].concept_id != concepts[1].concept_id
    assert concepts[0].files[0].artifact_id != concepts[1].files[0].artifact_id  # seeds differ, so weights do
    assert not any((app.settings.data_dir / "train" / c.concept_id).exists() for c in concepts)  # work dirs cleaned


def test_out_of_memory_is_resource_exhausted_with_advice(client, subject, monkeypatch):
    def out_of_memory(*args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
    monkeypatch.setattr(train_domain, "train", out_of_memory)
    final, concept = finish(client, start(client, subject.subject_id, steps=2))
    assert final.state == common_pb2.JOB_STATE_FAILED and final.error.code == "RESOURCE_EXHAUSTED"
    assert "gradient_checkpointing" in final.error.message and "Traceback" not in final.error.message
    assert concept.state == train_pb2.CONCEPT_STATE_FAILED


def test_concepts_are_private_and_deletable(client_for, client, subject):
    job = start(client, subject.subject_id, steps=200)
    concept_id = job.params["concept_id"]
    busy = _error(lambda: _stub(client).DeleteConcept(train_pb2.DeleteConceptRequest(concept_id=concept_id)))
    assert busy.code() == grpc.StatusCode.FAILED_PRECONDITION and job.job_id in busy.details()
    client.jobs.CancelJob(common_pb2.CancelJobRequest(job_id=job.job_id))
    finish(client, job)
    other = client_for("globex")
    hidden = _error(lambda: _stub(other).GetConcept(train_pb2.GetConceptRequest(concept_id=concept_id)))
    assert hidden.code() == grpc.StatusCode.NOT_FOUND
    assert not _stub(other).ListConcepts(train_pb2.ListConceptsRequest()).concepts
    _stub(client).DeleteConcept(train_pb2.DeleteConceptRequest(concept_id=concept_id))
    gone = _error(lambda: _stub(client).GetConcept(train_pb2.GetConceptRequest(concept_id=concept_id)))
    assert gone.code() == grpc.StatusCode.NOT_FOUND


BAD_REQUESTS = [
    # (what, request changes, code, words the message must contain)
    ("unknown subject", dict(subject_id="subj_nope"), "NOT_FOUND", ["subj_nope"]),
    ("unknown method", dict(method="hypernetwork"), "INVALID_ARGUMENT", ["`method`", "lora"]),
    ("p3s without click masks", dict(method="p3s"), "FAILED_PRECONDITION",
     ["`method` p3s", "persona-cli mask subj_", "--point X,Y"]),
    ("p3s unknown fill", dict(method="p3s", options=dict(p3s_fill="noise")), "INVALID_ARGUMENT",
     ["`p3s_fill`", "colour, blur, inpaint"]),
    ("steps 0", dict(options=dict(steps=0)), "INVALID_ARGUMENT", ["`steps`", "0"]),
    ("steps 1e9", dict(options=dict(steps=10**9)), "INVALID_ARGUMENT", ["`steps`", "1000000000"]),
    ("lr 0", dict(options=dict(learning_rate=0.0)), "INVALID_ARGUMENT", ["`learning_rate`"]),
    ("lr < 0", dict(options=dict(learning_rate=-1e-4)), "INVALID_ARGUMENT", ["`learning_rate`"]),
    ("rank 0", dict(options=dict(lora_rank=0)), "INVALID_ARGUMENT", ["`lora_rank`"]),
    ("prior with ti", dict(method="ti", regularizers=["prior"]), "INVALID_ARGUMENT", ["`regularizers`", "`method`"]),
    ("unknown regulariser", dict(regularizers=["core2"]), "INVALID_ARGUMENT", ["`regularizers`", "core2"]),
    ("unknown captions", dict(captions="case9"), "INVALID_ARGUMENT", ["`captions`"]),
    ("text encoder with ti", dict(method="ti", regularizers=[], options=dict(train_text_encoder=True)),
     "INVALID_ARGUMENT", ["`train_text_encoder`", "`method`"]),
    ("base model not offline", dict(base_model="someone/not-downloaded"), "FAILED_PRECONDITION",
     ["someone/not-downloaded", "hf download"]),
    ("base model path missing parts", dict(base_model="{tmp}"), "INVALID_ARGUMENT", ["`base_model`", "missing"]),
    ("class images 0", dict(regularizers=["prior"], options=dict(num_class_images=0)), "INVALID_ARGUMENT",
     ["`num_class_images`"]),
]


@pytest.mark.parametrize("what, changes, code, words", BAD_REQUESTS, ids=[b[0] for b in BAD_REQUESTS])
def test_bad_requests_name_the_field_and_store_nothing(app, client, subject, tmp_path, monkeypatch,
                                                       what, changes, code, words):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    fields = dict(subject_id=subject.subject_id, base_model="tiny", method="lora", regularizers=["none"])
    options = {**SMALL, "steps": 2, **changes.pop("options", {})} if "options" in changes else {**SMALL, "steps": 2}
    fields.update({k: (str(tmp_path) if v == "{tmp}" else v) for k, v in changes.items()})
    error = _error(lambda: _stub(client).StartTraining(train_pb2.StartTrainingRequest(
        **fields, options=train_pb2.TrainingOptions(**options))))
    assert error.code().name == code, error.details()
    for word in words:
        assert word in error.details(), error.details()
    assert "Traceback" not in error.details()
    # Nothing stored, nothing queued, and the subject is intact.
    assert app.db.query_one("SELECT COUNT(*) AS n FROM concepts")["n"] == 0
    assert app.db.query_one("SELECT COUNT(*) AS n FROM jobs WHERE kind = 'train'")["n"] == 0
    assert len(client.subjects.GetSubject(subjects_pb2.GetSubjectRequest(subject_id=subject.subject_id)).images) == 4


def test_a_subject_without_images_is_failed_precondition(app, client, subject):
    app.db.execute("DELETE FROM subject_images WHERE subject_id = :s", {"s": subject.subject_id})
    error = _error(lambda: start(client, subject.subject_id, steps=2))
    assert error.code() == grpc.StatusCode.FAILED_PRECONDITION and "no images" in error.details()


def test_epochs_set_the_steps_from_the_number_of_photos(client, subject):
    job = start(client, subject.subject_id, epochs=2, batch_size=2)
    concept = _stub(client).GetConcept(train_pb2.GetConceptRequest(concept_id=job.params["concept_id"]))
    assert concept.options.steps == 4 and concept.options.epochs == 2  # 4 photos, 2 per step, twice
    client.jobs.CancelJob(common_pb2.CancelJobRequest(job_id=job.job_id))
    finish(client, job)
    both = _error(lambda: start(client, subject.subject_id, epochs=2, steps=10))
    assert both.code() == grpc.StatusCode.INVALID_ARGUMENT and "`epochs`" in both.details()


def test_default_batch_is_every_photo_up_to_4_except_on_the_builtin_tiny_model(client, subject, tiny_model):
    """The toy-world benchmark's finding (notes/quality-18.md §7, §10): SID captions keep the photos' background off
    the token only with several photos per step. The built-in `tiny` (random weights) keeps 1 photo and 10-step
    class images for speed; a trained tiny-shaped folder (as the toy world's base) gets the real defaults."""
    def recorded(base_model: str) -> train_pb2.TrainingOptions:
        job = _stub(client).StartTraining(train_pb2.StartTrainingRequest(
            subject_id=subject.subject_id, base_model=base_model, method="lora", regularizers=["prior"],
            options=train_pb2.TrainingOptions(resolution=32, checkpoint_every=0, steps=1, num_class_images=1)))
        client.jobs.CancelJob(common_pb2.CancelJobRequest(job_id=job.job_id))
        finish(client, job)
        return _stub(client).GetConcept(train_pb2.GetConceptRequest(concept_id=job.params["concept_id"])).options

    builtin, folder = recorded("tiny"), recorded(str(tiny_model))
    assert (builtin.batch_size, builtin.class_image_steps) == (1, 10)
    assert (folder.batch_size, folder.class_image_steps) == (4, 30)  # the subject has 4 photos
