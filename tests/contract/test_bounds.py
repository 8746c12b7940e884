"""What one request may cost, through a real server: generate pixels, images and steps × size; training resolution
and batch; upload pixels; and the bounded queues (Generate slots, photo decoding) answering RESOURCE_EXHAUSTED with
a time to retry after, which the SDK's retry policy honours."""
from __future__ import annotations

import io
import threading

import grpc
import pytest
from PIL import Image

from persona.services.generate.settings import GenerateSettings
from persona.services.subjects.settings import SubjectSettings
from persona.v1 import common_pb2, generate_pb2, subjects_pb2, train_pb2


def _error(call) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as caught:
        result = call()
        if hasattr(result, "__next__"):
            list(result)
    return caught.value


@pytest.mark.parametrize("fields, words", [
    (dict(width=2048, height=1024), ["`width` × `height`", "PERSONA_GENERATE_MAX_PIXELS"]),
    (dict(width=1024, height=1024, steps=500), ["`steps`", "megapixel-steps", "PERSONA_GENERATE_MAX_MEGAPIXEL_STEPS"]),
    (dict(prompts=["a dog"] * 17), ["17 images", "PERSONA_GENERATE_MAX_IMAGES"]),
])
def test_generate_over_its_bounds_is_refused_before_drawing(client, fields, words):
    request = dict(base_model="tiny", prompts=["a dog"], steps=2) | fields
    error = _error(lambda: client.generate.Generate(generate_pb2.GenerateRequest(**request)))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT, error.details()
    assert all(w in error.details() for w in words), error.details()


@pytest.mark.parametrize("options, field", [(dict(resolution=8192), "resolution"),
                                            (dict(batch_size=2**31 - 1), "batch_size")])
def test_training_over_its_bounds_is_refused_before_queueing(client, dog_photos, options, field):
    subject = client.subjects.CreateSubject(subjects_pb2.CreateSubjectRequest(
        class_name="dog", images=[subjects_pb2.ImageUpload(data=d) for d in dog_photos[:2]]))
    error = _error(lambda: client.train.StartTraining(train_pb2.StartTrainingRequest(
        subject_id=subject.subject_id, base_model="tiny", options=train_pb2.TrainingOptions(**options))))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT and f"`{field}`" in error.details(), error.details()
    assert not client.jobs.ListJobs(common_pb2.ListJobsRequest()).jobs


def test_an_upload_of_many_huge_photos_is_refused_from_the_headers(client):
    buffer = io.BytesIO()
    Image.new("L", (8000, 8000)).save(buffer, "PNG")  # 64 MP of zeros: ~60 KB sent, 64 MB once decoded
    bomb = buffer.getvalue()
    error = _error(lambda: client.subjects.CreateSubject(subjects_pb2.CreateSubjectRequest(
        class_name="dog", images=[subjects_pb2.ImageUpload(data=bomb) for _ in range(5)])))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "`images`" in error.details() and "PERSONA_MAX_UPLOAD_PIXELS" in error.details()


def _pushback_ms(error: grpc.RpcError) -> int:
    return int(dict(error.trailing_metadata())["grpc-retry-pushback-ms"])


def test_a_full_generate_queue_is_resource_exhausted_with_retry_advice(start_app):
    app = start_app(generate_settings=GenerateSettings(device="cpu", concurrency=1, queue=0))
    request = generate_pb2.GenerateRequest(base_model="tiny", prompts=["a dog"], steps=1, width=32, height=32)
    plain = grpc.insecure_channel(app.address)  # no retry policy: the server's own answer
    with app.generate.admission.hold():  # the one slot is taken
        error = _error(lambda: generate_pb2_grpc_stub(plain).Generate(request, metadata=_auth(app)))
    assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "retry in" in error.details() and "PERSONA_GENERATE_QUEUE" in error.details()
    assert _pushback_ms(error) >= 1000


def test_the_sdk_retries_a_busy_server_after_its_pushback(start_app, client_for):
    app = start_app(generate_settings=GenerateSettings(device="cpu", concurrency=1, queue=0))
    client = client_for("acme", app)
    request = generate_pb2.GenerateRequest(base_model="tiny", prompts=["a dog"], steps=1, width=32, height=32)
    list(client.generate.Generate(request))  # the model loaded, so the retried call is quick
    slot = app.generate.admission.hold()
    slot.__enter__()
    threading.Timer(0.5, slot.__exit__, (None, None, None)).start()  # frees the slot before the first retry
    images = list(client.generate.Generate(request))
    assert len(images) == 1 and images[0].png


def test_uploads_wait_for_the_decode_budget_then_are_turned_away(start_app, client_for, dog_photos):
    settings = SubjectSettings(decode_budget_pixels=1_000_000, max_image_pixels=1_000_000, decode_wait_s=0.2)
    app = start_app(subject_settings=settings)
    client = client_for("acme", app)
    photo = dog_photos[0]
    with Image.open(io.BytesIO(photo)) as image:
        assert image.width * image.height <= 1_000_000
    upload = subjects_pb2.CreateSubjectRequest(class_name="dog", images=[subjects_pb2.ImageUpload(data=photo)])
    with app.subjects.decoding.hold(1_000_000):  # another upload is decoding the whole budget
        error = _error(lambda: subjects_pb2_grpc_stub(grpc.insecure_channel(app.address)).CreateSubject(
            upload, metadata=_auth(app)))
    assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and "PERSONA_DECODE_BUDGET_PIXELS" in error.details()
    assert client.subjects.CreateSubject(upload).images  # once the budget is free, the same upload goes through


def _auth(app):
    return (("authorization", f"Bearer {app.authenticator.create_key('acme')[1]}"),)


def generate_pb2_grpc_stub(channel):
    from persona.v1 import generate_pb2_grpc

    return generate_pb2_grpc.GenerateServiceStub(channel)


def subjects_pb2_grpc_stub(channel):
    from persona.v1 import subjects_pb2_grpc

    return subjects_pb2_grpc.SubjectServiceStub(channel)
