"""Requests the server refuses before any work, through a real server: NaN/infinite floats anywhere in a request,
out-of-range numbers, and bodies that are not messages at all (fuzzed over every RPC)."""
from __future__ import annotations

import math
import random

import grpc
import pytest
from google.protobuf import descriptor_pool
from google.protobuf.descriptor import FieldDescriptor
from google.protobuf.message_factory import GetMessageClass

from persona.v1 import common_pb2, train_pb2

PERSONA_SERVICES = ("persona.v1.SubjectService", "persona.v1.CaptionService", "persona.v1.MaskService",
                    "persona.v1.TrainService", "persona.v1.GenerateService", "persona.v1.EvaluateService",
                    "persona.v1.JobService")


def _methods():
    """(path, method descriptor) of every persona RPC, and the health check."""
    pool = descriptor_pool.Default()
    found = []
    for name in (*PERSONA_SERVICES, "grpc.health.v1.Health"):
        service = pool.FindServiceByName(name)
        found += [(f"/{name}/{m.name}", m) for m in service.methods
                  if not (name == "grpc.health.v1.Health" and m.name in ("Watch", "List"))]
    return found


def _float_paths(message_type, prefix=()):
    """Paths (tuples of field names) to every float/double field of a message type, nested messages included."""
    for field in message_type.fields:
        if field.cpp_type in (FieldDescriptor.CPPTYPE_FLOAT, FieldDescriptor.CPPTYPE_DOUBLE):
            yield (*prefix, field.name)
        elif field.cpp_type == FieldDescriptor.CPPTYPE_MESSAGE and not field.is_repeated \
                and field.message_type.full_name.startswith("persona."):
            yield from _float_paths(field.message_type, (*prefix, field.name))


def _call(channel, method, body: bytes, metadata=()):
    """Sends raw `body` to `method` and returns the status code (OK when it answered)."""
    kind = channel.unary_stream if method.server_streaming else channel.unary_unary
    try:
        response = kind(method_path(method))(body, timeout=60, metadata=metadata)
        if method.server_streaming:
            list(response)
        return grpc.StatusCode.OK, ""
    except grpc.RpcError as e:
        return e.code(), e.details()


def method_path(method) -> str:
    return f"/{method.containing_service.full_name}/{method.name}"


FLOAT_CASES = [(path, m, fields) for path, m in _methods() for fields in _float_paths(m.input_type)]


def test_every_request_float_is_covered():
    # The requests that carry floats today: training options, sampling and evaluation guidance.
    assert {".".join(f) for _, _, f in FLOAT_CASES} >= {"options.lora_alpha", "options.learning_rate",
                                                        "options.prior_loss_weight", "guidance_scale"}


@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf], ids=["nan", "inf", "-inf"])
@pytest.mark.parametrize("path, method, fields", FLOAT_CASES, ids=[f"{p}:{'.'.join(f)}" for p, _, f in FLOAT_CASES])
def test_non_finite_floats_are_invalid_argument_naming_the_field(client, path, method, fields, value):
    request = GetMessageClass(method.input_type)()
    target = request
    for name in fields[:-1]:
        target = getattr(target, name)
    setattr(target, fields[-1], value)
    code, details = _call(client.channel, method, request.SerializeToString())
    assert code == grpc.StatusCode.INVALID_ARGUMENT, (code, details)
    assert f"`{'.'.join(fields)}`" in details and "finite" in details


def test_nan_training_options_queue_nothing(client, dog_photos):
    from persona.v1 import subjects_pb2

    subject = client.subjects.CreateSubject(subjects_pb2.CreateSubjectRequest(
        class_name="dog", images=[subjects_pb2.ImageUpload(data=d, filename=f"{i}.jpg")
                                  for i, d in enumerate(dog_photos)]))
    for name in ("lora_alpha", "learning_rate", "prior_loss_weight"):
        with pytest.raises(grpc.RpcError) as info:
            client.train.StartTraining(train_pb2.StartTrainingRequest(
                subject_id=subject.subject_id, base_model="tiny", options=train_pb2.TrainingOptions(**{name: math.nan})))
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT and f"`options.{name}`" in info.value.details()
    assert not client.jobs.ListJobs(common_pb2.ListJobsRequest()).jobs
    assert not client.train.ListConcepts(train_pb2.ListConceptsRequest()).concepts


@pytest.mark.parametrize("name, value", [("learning_rate", 10.0), ("lora_alpha", 1e9), ("prior_loss_weight", -1.0),
                                         ("unmasked_weight", 2.0), ("max_grad_norm", -0.5)])
def test_out_of_range_training_floats_name_the_field(client, dog_photos, name, value):
    from persona.v1 import subjects_pb2

    subject = client.subjects.CreateSubject(subjects_pb2.CreateSubjectRequest(
        class_name="dog", images=[subjects_pb2.ImageUpload(data=d, filename=f"{i}.jpg")
                                  for i, d in enumerate(dog_photos)]))
    with pytest.raises(grpc.RpcError) as info:
        client.train.StartTraining(train_pb2.StartTrainingRequest(
            subject_id=subject.subject_id, base_model="tiny", options=train_pb2.TrainingOptions(**{name: value})))
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT and f"`{name}`" in info.value.details()
    assert not client.jobs.ListJobs(common_pb2.ListJobsRequest()).jobs


# Bodies that are not the request message: truncated varints and length prefixes, wrong wire types, bad UTF-8.
HANDMADE_GARBAGE = [b"\x0a\xff\xff\xff\xff\x0f", b"\x0a\x05ab", b"\x08", b"\xff" * 16, b"\x0a\x02\xc3\x28",
                    b"\x12\x03\xff\xfe\xfd", b"\x0f\x0f\x0f"]
FUZZ_BODIES = 12  # random bodies per RPC, besides the handmade ones


def _garbage(method_name: str) -> list[bytes]:
    rng = random.Random(method_name)  # the same bodies every run
    return HANDMADE_GARBAGE + [rng.randbytes(rng.randint(1, 64)) for _ in range(FUZZ_BODIES)]


@pytest.mark.parametrize("path, method", _methods(), ids=[p for p, _ in _methods()])
def test_garbage_bodies_never_get_internal(app, client, path, method):
    keyless = grpc.insecure_channel(app.address)
    public = method.containing_service.full_name.startswith("grpc.")
    undecodable = 0
    for body in _garbage(path):
        code, details = _call(client.channel, method, body)
        assert code not in (grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN), (body, code, details)
        assert "Traceback" not in details
        if code == grpc.StatusCode.INVALID_ARGUMENT and "not a valid message" in details:
            undecodable += 1
        if not public:  # without a key, authentication answers before the body is even looked at
            assert _call(keyless, method, body)[0] == grpc.StatusCode.UNAUTHENTICATED
    assert undecodable >= 3  # the handmade bodies that cannot parse, at least


def test_garbage_in_the_reflection_stream_is_invalid_argument(app):
    call = grpc.insecure_channel(app.address).stream_stream(
        "/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo")
    for body in HANDMADE_GARBAGE:
        try:
            list(call(iter([body]), timeout=60))
            code = grpc.StatusCode.OK
        except grpc.RpcError as e:
            code = e.code()
        assert code not in (grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN), (body, code)
    with pytest.raises(grpc.RpcError) as info:
        list(call(iter([HANDMADE_GARBAGE[0]]), timeout=60))
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "not a valid message" in info.value.details()
