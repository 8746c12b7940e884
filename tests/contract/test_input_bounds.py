"""Ids and names are bounded on input, and error messages quote at most a short prefix of what a caller sent: an
over-long id is INVALID_ARGUMENT (not a NOT_FOUND too large for gRPC's trailer, which the client saw as
RESOURCE_EXHAUSTED), and an over-long model name never reaches the file system (no `File name too long` INTERNAL)."""
from __future__ import annotations

import grpc
import pytest

from persona.v1 import common_pb2, generate_pb2, mask_pb2, subjects_pb2, train_pb2

MIB = 1024 * 1024


def _refused(call) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as caught:
        call()
    return caught.value


@pytest.mark.parametrize("length", [20_000, MIB])
def test_an_over_long_id_is_invalid_argument_with_a_short_message(client, length):
    error = _refused(lambda: client.jobs.GetJob(common_pb2.GetJobRequest(job_id="A" * length)))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "`job_id`" in error.details() and len(error.details()) < 300
    # Ids inside nested and streaming requests too.
    error = _refused(lambda: list(client.jobs.WatchJob(common_pb2.WatchJobRequest(job_id="A" * length))))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT and len(error.details()) < 300
    error = _refused(lambda: list(client.generate.Generate(generate_pb2.GenerateRequest(
        concept_id="c" * length, prompts=["a dog"]))))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT and "`concept_id`" in error.details()


def test_an_id_of_a_plausible_length_is_still_not_found(client):
    error = _refused(lambda: client.jobs.GetJob(common_pb2.GetJobRequest(job_id="job_" + "0" * 60)))
    assert error.code() == grpc.StatusCode.NOT_FOUND


def test_messages_quote_a_short_prefix_of_a_long_value(client, dog_photos):
    subject = client.subjects.CreateSubject(subjects_pb2.CreateSubjectRequest(
        class_name="dog", images=[subjects_pb2.ImageUpload(data=dog_photos[0])]))
    error = _refused(lambda: client.train.StartTraining(train_pb2.StartTrainingRequest(
        subject_id=subject.subject_id, base_model="tiny", method="m" * MIB)))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT and "`method`" in error.details()
    assert len(error.details()) <= 2001


@pytest.fixture
def subject_with_image(client, dog_photos):
    return client.subjects.CreateSubject(subjects_pb2.CreateSubjectRequest(
        class_name="dog", images=[subjects_pb2.ImageUpload(data=dog_photos[0])]))


def test_over_long_model_names_never_reach_the_file_system(client, subject_with_image):
    image_id = subject_with_image.images[0].image_id
    error = _refused(lambda: client.masks.MaskFromPoints(mask_pb2.MaskFromPointsRequest(
        subject_id=subject_with_image.subject_id, image_id=image_id, positive=[mask_pb2.Point(x=1, y=1)],
        model="x" * 1001)))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT and "model`" in error.details()  # `clip_model`
    assert len(error.details()) < 400

    for base_model in ("b" * 256, "dir/" + "b" * 300, "b" * 5000):
        error = _refused(lambda: client.train.StartTraining(train_pb2.StartTrainingRequest(
            subject_id=subject_with_image.subject_id, base_model=base_model, method="lora")))
        assert error.code() == grpc.StatusCode.INVALID_ARGUMENT and "`base_model`" in error.details()
        assert len(error.details()) < 400
        error = _refused(lambda: list(client.generate.Generate(generate_pb2.GenerateRequest(
            base_model=base_model, prompts=["a dog"]))))
        assert error.code() == grpc.StatusCode.INVALID_ARGUMENT and "`base_model`" in error.details()
