"""customcontrast concepts through the real server (issue 21 item 4): StartTraining with `method` customcontrast and a
tiny encoder trained in the test makes a READY concept with no fine-tuning step (its token table and the encoder's
visual K'/V' stored as its weights, the encoder named on it); what does not apply without fine-tuning, an unknown
or another tenant's encoder and an encoder of another base model are refused by field with nothing stored; the
embedded engine draws the concept (not the base model's image for the same seed) while exports refuse it naming the
engines that draw it, and a Triton-engine server with ONNX components refuses it naming the torch components and the
embedded engine (test_generate_triton_customcontrast.py draws it on Triton with torch components)."""
from __future__ import annotations

import grpc
import pytest

from persona.bench.toyworld_views import write_multiview_dataset
from persona.services.generate.settings import GenerateSettings
from persona.services.models.customcontrast.concept import TOKENS_FILE, VISUAL_KV_FILE
from persona.v1 import common_pb2, generate_pb2, subjects_pb2, train_pb2

TENANT = "acme"


def _refused(call) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as caught:
        call()
    assert "Traceback" not in caught.value.details()
    return caught.value


def train_encoder(client, tmp_path, base_model: str = "tiny") -> str:
    """A tiny encoder (2 steps on 2 toy-world subjects); returns its id."""
    views = write_multiview_dataset(tmp_path / "views", subjects=2, views=2, seed=0, size=64)
    job = client.train.StartEncoderTraining(train_pb2.StartEncoderTrainingRequest(
        dataset=str(views), base_model=base_model, steps=2, learning_rate=1e-3))
    final = client.wait_for_job(job.job_id, timeout_s=300)
    assert final.state == common_pb2.JOB_STATE_SUCCEEDED, final.error
    return final.encoder_train_result.encoder_id


def make_concept(client, subject_id: str, encoder: str, **request) -> common_pb2.Job:
    job = client.train.StartTraining(train_pb2.StartTrainingRequest(
        subject_id=subject_id, method="customcontrast", encoder=encoder, **request))
    return client.wait_for_job(job.job_id, timeout_s=300)


def triton_concept(start_app, client_for, dog_photos, tmp_path, backend: str, photos: int = 1):
    """A Triton-engine server (CPU) with `backend` components, a client of it and a customcontrast concept made
    there from a tiny encoder: (app, client, concept id)."""
    app = start_app(generate_settings=GenerateSettings(engine="triton", triton_gpu=False,
                                                       triton_component_backend=backend))
    client = client_for(TENANT, app)
    subject = client.subjects.CreateSubject(subjects_pb2.CreateSubjectRequest(
        class_name="dog", images=[subjects_pb2.ImageUpload(data=d) for d in dog_photos[:photos]]))
    final = make_concept(client, subject.subject_id, train_encoder(client, tmp_path))
    assert final.state == common_pb2.JOB_STATE_SUCCEEDED, final.error
    return app, client, final.params["concept_id"]


@pytest.fixture
def subject(client, dog_photos) -> subjects_pb2.Subject:
    return client.subjects.CreateSubject(subjects_pb2.CreateSubjectRequest(
        class_name="dog", images=[subjects_pb2.ImageUpload(data=d) for d in dog_photos[:2]]))


def test_a_concept_is_made_from_an_encoder_without_fine_tuning_and_drawn_in_process(client, subject, tmp_path):
    encoder = train_encoder(client, tmp_path)
    events = []
    job = client.train.StartTraining(train_pb2.StartTrainingRequest(
        subject_id=subject.subject_id, method="customcontrast", encoder=encoder))
    assert job.kind == "train"
    final = client.wait_for_job(job.job_id, on_event=events.append, timeout_s=300)
    assert final.state == common_pb2.JOB_STATE_SUCCEEDED, final.error
    assert final.train_result.steps == 0 and not final.train_result.loss_curve
    stages = {e.details.stage for e in events if e.type == common_pb2.JOB_EVENT_TYPE_PROGRESS}
    assert stages == {"customcontrast"}

    concept = client.train.GetConcept(train_pb2.GetConceptRequest(concept_id=final.params["concept_id"]))
    assert (concept.method, concept.encoder, concept.state) == ("customcontrast", encoder,
                                                                train_pb2.CONCEPT_STATE_READY)
    assert concept.base_model == "tiny" and concept.steps_done == 0 and not concept.regularizers
    assert {f.path for f in concept.files} == {TOKENS_FILE, VISUAL_KV_FILE}
    listed = client.train.ListConcepts(train_pb2.ListConceptsRequest()).concepts
    assert [c.encoder for c in listed if c.concept_id == concept.concept_id] == [encoder]

    def draw(**request) -> bytes:
        [image] = client.generate.Generate(generate_pb2.GenerateRequest(
            prompts=["a sks dog on the beach"], seed=7, steps=3, **request))
        assert image.engine == "embedded" and image.png.startswith(b"\x89PNG")
        return image.png

    drawn = draw(concept_id=concept.concept_id)
    assert drawn == draw(concept_id=concept.concept_id)  # the same seed, the same image
    assert drawn != draw(base_model="tiny")  # the subject's tokens change what the base model draws
    # The tokens are attached for a draw only: the base model drawn after it is the base model again.
    assert draw(base_model="tiny") == draw(base_model="tiny")

    error = _refused(lambda: list(client.generate.Generate(generate_pb2.GenerateRequest(
        concept_id=concept.concept_id, prompts=["a dog on the beach"], steps=2))))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT and "`prompts`" in error.details()
    assert "identifier 'sks' 0 times" in error.details()
    error = _refused(lambda: list(client.generate.Generate(generate_pb2.GenerateRequest(
        concept_id=concept.concept_id, prompts=["a sks dog"], steps=2, p3s_injection_lambda=0.5))))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT and "`p3s_injection_lambda` is set" in error.details()

    # No export: stock diffusers, kohya tools, ONNX and TensorRT cannot load it.
    for fmt in (train_pb2.EXPORT_FORMAT_DIFFUSERS, train_pb2.EXPORT_FORMAT_LORA, train_pb2.EXPORT_FORMAT_ONNX,
                train_pb2.EXPORT_FORMAT_TENSORRT):
        error = _refused(lambda: client.train.ExportConcept(train_pb2.ExportConceptRequest(
            concept_id=concept.concept_id, format=fmt)))
        assert error.code() == grpc.StatusCode.FAILED_PRECONDITION, error.details()
        assert "made with customcontrast" in error.details() and "the embedded engine" in error.details()


def test_requests_that_do_not_apply_without_fine_tuning_are_refused_by_field(client, client_for, subject, dog_photos,
                                                                             tmp_path):
    encoder = train_encoder(client, tmp_path)
    cases = [
        (dict(method="customcontrast"), "`encoder` is empty"),
        (dict(method="lora", encoder=encoder), "`encoder` is set but `method` is lora"),
        (dict(encoder=encoder), "`encoder` is set but `method` is lora"),
        (dict(method="customcontrast", encoder="enc_nosuchencoder0"), "`encoder` 'enc_nosuchencoder0' is not one of"),
        (dict(method="customcontrast", encoder=encoder, options=train_pb2.TrainingOptions(steps=10)),
         "`steps` does not apply to method customcontrast"),
        (dict(method="customcontrast", encoder=encoder, regularizers=["prior"]),
         "`regularizers` prior does not apply"),
        (dict(method="customcontrast", encoder=encoder, parent_concept_id="cpt_x"), "`parent_concept_id` does not"),
        (dict(method="customcontrast", encoder=encoder, captions="sid"), "`captions` sid does not apply"),
    ]
    for request, message in cases:
        error = _refused(lambda: client.train.StartTraining(train_pb2.StartTrainingRequest(
            subject_id=subject.subject_id, **request)))
        assert error.code() == grpc.StatusCode.INVALID_ARGUMENT, (request, error.details())
        assert message in error.details(), (request, error.details())

    # Another tenant's encoder reads exactly as an unknown one: its existence never shows.
    other = client_for("globex")
    theirs = other.subjects.CreateSubject(subjects_pb2.CreateSubjectRequest(
        class_name="dog", images=[subjects_pb2.ImageUpload(data=dog_photos[0])]))
    errors = [_refused(lambda: other.train.StartTraining(train_pb2.StartTrainingRequest(
        subject_id=theirs.subject_id, method="customcontrast", encoder=name))) for name in (encoder, "enc_unknown1")]
    assert errors[0].code() == errors[1].code() == grpc.StatusCode.INVALID_ARGUMENT
    assert errors[0].details().replace(encoder, "X") == errors[1].details().replace("enc_unknown1", "X")

    # An encoder fits only the base model it was trained on.
    error = _refused(lambda: client.train.StartTraining(train_pb2.StartTrainingRequest(
        subject_id=subject.subject_id, method="customcontrast", encoder=encoder, base_model=str(tmp_path / "nope"))))
    assert "`base_model`" in error.details()
    # Nothing was stored by any refusal.
    assert not client.train.ListConcepts(train_pb2.ListConceptsRequest()).concepts
    assert not other.train.ListConcepts(train_pb2.ListConceptsRequest()).concepts


def test_a_triton_server_with_onnx_components_refuses_a_customcontrast_concept_naming_what_draws_it(
        start_app, client_for, dog_photos, tmp_path):
    _, client, concept_id = triton_concept(start_app, client_for, dog_photos, tmp_path, "python")
    error = _refused(lambda: list(client.generate.Generate(generate_pb2.GenerateRequest(
        concept_id=concept_id, prompts=["a sks dog"], steps=2))))
    assert error.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "made with customcontrast" in error.details() and "triton engine" in error.details()
    assert "PERSONA_TRITON_COMPONENT_BACKEND=torch" in error.details()
    assert "PERSONA_GENERATE_ENGINE=embedded" in error.details()
