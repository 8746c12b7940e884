"""P3S-Diffusion through the real server on the tiny model: the subject's photos clicked with the real mask service
(tiny CLIP), `method` p3s trained for 30 steps with the paper's hyper-parameters as request options, the concept
READY with its condition branch stored; and a photo without a mask refused before anything is stored."""
from __future__ import annotations

import math

import grpc
import pytest

from persona.services.models.p3s.condition import WEIGHT_NAME
from persona.v1 import common_pb2, mask_pb2, subjects_pb2, train_pb2


@pytest.fixture
def subject(client, dog_photos) -> subjects_pb2.Subject:
    return client.subjects.CreateSubject(subjects_pb2.CreateSubjectRequest(
        class_name="dog", images=[subjects_pb2.ImageUpload(data=d) for d in dog_photos[:2]]))


def _click(client, subject, image) -> None:
    client.masks.MaskFromPoints(mask_pb2.MaskFromPointsRequest(
        subject_id=subject.subject_id, image_id=image.image_id,
        positive=[mask_pb2.Point(x=image.width // 2, y=image.height // 2)], negative=[mask_pb2.Point(x=2, y=2)]))


def _start(client, subject_id: str, steps: int = 30, **options):
    return client.train.StartTraining(train_pb2.StartTrainingRequest(
        subject_id=subject_id, base_model="tiny", method="p3s", captions="class",
        options=train_pb2.TrainingOptions(steps=steps, resolution=32, checkpoint_every=0, **options)))


def test_p3s_trains_on_the_subjects_click_masks_and_stores_its_condition(client, subject):
    for image in subject.images:
        _click(client, subject, image)
    events = []
    job = _start(client, subject.subject_id, learning_rate=1e-3, p3s_weight_schedule="increasing",
                 p3s_consistency_layers="all", p3s_fill="blur")
    final = client.wait_for_job(job.job_id, on_event=events.append, timeout_s=600)
    assert final.state == common_pb2.JOB_STATE_SUCCEEDED, final.error
    concept = client.train.GetConcept(train_pb2.GetConceptRequest(concept_id=final.params["concept_id"]))
    assert concept.state == train_pb2.CONCEPT_STATE_READY and concept.method == "p3s" and concept.steps_done == 30
    # The paper's defaults recorded beside what the request set.
    o = concept.options
    assert (o.p3s_injection_lambda, o.p3s_weight_alpha, o.p3s_weight_beta, o.p3s_weight_k,
            o.p3s_consistency_weight) == pytest.approx((0.2, 0.5, 0.2, 2.0, 0.1))
    assert (o.p3s_weight_schedule, o.p3s_consistency_layers, o.p3s_fill) == ("increasing", "all", "blur")
    [condition] = [f for f in concept.files if f.path == WEIGHT_NAME]
    assert condition.size_bytes > 0
    steps = [dict(e.details.losses) for e in events if e.type == common_pb2.JOB_EVENT_TYPE_PROGRESS
             and e.details.stage == "train"]
    # γ·L_ac is reported beside the denoising loss, every step.
    assert steps and all(math.isfinite(s["loss"]) and "attention_consistency" in s for s in steps)


def test_a_photo_without_a_click_mask_is_refused_naming_persona_cli_mask(app, client, subject):
    _click(client, subject, subject.images[0])
    with pytest.raises(grpc.RpcError) as caught:
        _start(client, subject.subject_id)
    error = caught.value
    assert error.code() == grpc.StatusCode.FAILED_PRECONDITION, error.details()
    assert f"persona-cli mask {subject.subject_id} --image 1 --point X,Y" in error.details()
    assert "1 of 2" in error.details() and "Traceback" not in error.details()
    assert app.db.query_one("SELECT COUNT(*) AS n FROM concepts")["n"] == 0


def test_p3s_region_negative_clicks_fills_the_negative_clicks_segment(client, subject):
    for image in subject.images:
        _click(client, subject, image)  # a negative click at (2, 2) on each
    job = _start(client, subject.subject_id, steps=2, p3s_region="negative_clicks")
    final = client.wait_for_job(job.job_id, timeout_s=600)
    assert final.state == common_pb2.JOB_STATE_SUCCEEDED, final.error
    concept = client.train.GetConcept(train_pb2.GetConceptRequest(concept_id=final.params["concept_id"]))
    assert concept.options.p3s_region == "negative_clicks"


def test_p3s_region_negative_clicks_without_any_negative_click_is_refused(app, client, subject):
    for image in subject.images:
        client.masks.MaskFromPoints(mask_pb2.MaskFromPointsRequest(
            subject_id=subject.subject_id, image_id=image.image_id,
            positive=[mask_pb2.Point(x=image.width // 2, y=image.height // 2)]))
    with pytest.raises(grpc.RpcError) as caught:
        _start(client, subject.subject_id, p3s_region="negative_clicks")
    error = caught.value
    assert error.code() == grpc.StatusCode.FAILED_PRECONDITION, error.details()
    assert "`p3s_region` is negative_clicks" in error.details() and "--negative X,Y" in error.details()
    assert app.db.query_one("SELECT COUNT(*) AS n FROM concepts")["n"] == 0
