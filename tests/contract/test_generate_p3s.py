"""A p3s concept drawn through the real Generate RPC on the tiny model: trained for a few steps (the subject's photos
clicked with the real mask service), drawn in-process with its condition attached, the weight schedule, λ and the
reference photo set per request; p3s settings for another model and exports of a p3s concept refused by name."""
from __future__ import annotations

import grpc
import pytest

from test_train_p3s import _click, _start

from persona.v1 import common_pb2, generate_pb2, subjects_pb2, train_pb2


@pytest.fixture
def subject(client, dog_photos) -> subjects_pb2.Subject:
    return client.subjects.CreateSubject(subjects_pb2.CreateSubjectRequest(
        class_name="dog", images=[subjects_pb2.ImageUpload(data=d) for d in dog_photos[:2]]))


def _refused(call) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as caught:
        call()
    assert "Traceback" not in caught.value.details()
    return caught.value


def test_a_p3s_concept_draws_in_process_with_the_schedule_and_photo_each_request_sets(client, subject):
    for image in subject.images:
        _click(client, subject, image)
    # lr 1e-3: the zero convs leave zero within a few steps, so the copy's features change the drawing.
    job = _start(client, subject.subject_id, learning_rate=1e-3, p3s_consistency_weight=0.0)
    final = client.wait_for_job(job.job_id, timeout_s=600)
    assert final.state == common_pb2.JOB_STATE_SUCCEEDED, final.error
    concept_id = final.params["concept_id"]

    def draw(**settings) -> bytes:
        [image] = client.generate.Generate(generate_pb2.GenerateRequest(
            concept_id=concept_id, prompts=["a dog"], seed=7, steps=3, **settings))
        assert (image.width, image.height, image.engine) == (32, 32, "embedded")
        return image.png

    drawn = draw()
    assert drawn.startswith(b"\x89PNG")
    # Unset, the schedule is the one the concept trained with (the paper's decreasing, α 0.5, β 0.2, k 2).
    assert draw(p3s_weight_schedule="decreasing", p3s_weight_alpha=0.5, p3s_weight_k=2.0) == drawn
    assert draw(p3s_weight_schedule="constant") != drawn
    assert draw(p3s_weight_alpha=-3.0) != drawn
    # λ of Eq. 7: unset, the concept's (0.2, the paper's); another λ, another image with the same seed.
    assert draw(p3s_injection_lambda=0.2) == drawn
    assert draw(p3s_injection_lambda=5.0) != drawn
    # Another photo conditions another image; with ε_t = 1 − 0·(t/T)^k − 1 = 0 the copy's features vanish, so which
    # photo conditions it no longer matters (the images are equal to the bit).
    assert draw(p3s_reference=1) != drawn
    off = dict(p3s_weight_alpha=0.0, p3s_weight_beta=-1.0)
    assert draw(p3s_reference=0, **off) == draw(p3s_reference=1, **off)

    error = _refused(lambda: draw(p3s_reference=2))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT and "`p3s_reference` is 2" in error.details()
    error = _refused(lambda: draw(p3s_injection_lambda=11.0))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT and "`p3s_injection_lambda`" in error.details()
    error = _refused(lambda: list(client.generate.Generate(generate_pb2.GenerateRequest(
        base_model="tiny", prompts=["a dog"], steps=1, p3s_injection_lambda=0.5))))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT and "`p3s_injection_lambda` is set" in error.details()
    error = _refused(lambda: list(client.generate.Generate(generate_pb2.GenerateRequest(
        base_model="tiny", prompts=["a dog"], steps=1, p3s_weight_k=3.0))))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT and "`p3s_weight_k` is set" in error.details()

    # No export: stock diffusers, kohya tools, ONNX and TensorRT cannot load the condition branch.
    for fmt in (train_pb2.EXPORT_FORMAT_DIFFUSERS, train_pb2.EXPORT_FORMAT_KOHYA, train_pb2.EXPORT_FORMAT_ONNX):
        error = _refused(lambda: client.train.ExportConcept(train_pb2.ExportConceptRequest(
            concept_id=concept_id, format=fmt)))
        assert error.code() == grpc.StatusCode.FAILED_PRECONDITION, error.details()
        assert "drawn only by persona's generate service" in error.details() and "stock diffusers" in error.details()
