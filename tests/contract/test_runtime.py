"""What every persona server shares, through a real server: health, reflection, auth, request ids,
error mapping, message limits, jobs over gRPC, and restarts on the same data dir."""
import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from persona.client.sdk import PersonaClient
from persona.services.runtime import errors
from persona.v1 import caption_pb2, common_pb2, subjects_pb2


def test_health_is_serving_for_every_service(app):
    stub = health_pb2_grpc.HealthStub(grpc.insecure_channel(app.address))
    for service in ("", "persona.v1.SubjectService", "persona.v1.CaptionService", "persona.v1.JobService"):
        assert stub.Check(health_pb2.HealthCheckRequest(service=service)).status == health_pb2.HealthCheckResponse.SERVING
    app.server.set_serving(False)  # what a stopping server reports
    assert stub.Check(health_pb2.HealthCheckRequest()).status == health_pb2.HealthCheckResponse.NOT_SERVING


def test_reflection_lists_the_services_without_a_key(app):
    stub = reflection_pb2_grpc.ServerReflectionStub(grpc.insecure_channel(app.address))
    responses = stub.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")]))
    names = {s.name for r in responses for s in r.list_services_response.service}
    assert {"persona.v1.SubjectService", "persona.v1.CaptionService", "persona.v1.JobService",
            "grpc.health.v1.Health"} <= names


@pytest.mark.parametrize("key", [None, "pk_wrong", "not-bearer"])
def test_calls_without_a_valid_key_are_unauthenticated(app, key):
    if key == "not-bearer":
        channel = grpc.insecure_channel(app.address)
        call = lambda: PersonaClient(channel).subjects.ListSubjects(subjects_pb2.ListSubjectsRequest(),
                                                                     metadata=(("authorization", "Basic abc"),))
    else:
        call = lambda: PersonaClient.connect(app.address, key).subjects.ListSubjects(subjects_pb2.ListSubjectsRequest())
    with pytest.raises(grpc.RpcError) as info:
        call()
    assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED
    assert "persona-cli keys create" in info.value.details() or "Bearer" in info.value.details()


def test_keys_are_stored_hashed(app):
    _, key = app.authenticator.create_key("acme")
    stored = app.db.query("SELECT * FROM api_keys")
    assert stored and all(key not in str(row.values()) for row in stored)


def test_request_id_is_echoed_and_unexpected_errors_are_internal_without_a_trace(client, app, monkeypatch, caplog):
    def explode(*args):
        raise ZeroDivisionError("secret detail")

    monkeypatch.setattr(app.subjects, "get", explode)
    call = client.subjects.GetSubject.with_call
    with pytest.raises(grpc.RpcError) as info:
        call(subjects_pb2.GetSubjectRequest(subject_id="subj_x"), metadata=(("x-request-id", "req-42"),))
    error = info.value
    assert error.code() == grpc.StatusCode.INTERNAL
    assert "request_id=req-42" in error.details()
    assert "secret detail" not in error.details() and "Traceback" not in error.details()
    # In the trailers: an early header would commit the call and stop the client's retry policy.
    assert ("x-request-id", "req-42") in error.trailing_metadata()
    assert "ZeroDivisionError" in caplog.text  # the stack goes to the server log


@pytest.mark.parametrize("error, code", [
    (errors.InvalidArgument, grpc.StatusCode.INVALID_ARGUMENT),
    (errors.NotFound, grpc.StatusCode.NOT_FOUND),
    (errors.FailedPrecondition, grpc.StatusCode.FAILED_PRECONDITION),
    (errors.ResourceExhausted, grpc.StatusCode.RESOURCE_EXHAUSTED),
    (errors.Unavailable, grpc.StatusCode.UNAVAILABLE),
    (errors.Unauthenticated, grpc.StatusCode.UNAUTHENTICATED),
])
def test_domain_errors_map_to_their_status(client, app, monkeypatch, error, code):
    def fail(*args):
        raise error("`field` is wrong: fix it like so")

    monkeypatch.setattr(app.subjects, "get", fail)
    with pytest.raises(grpc.RpcError) as info:
        client.subjects.GetSubject(subjects_pb2.GetSubjectRequest(subject_id="subj_x"))
    assert (info.value.code(), info.value.details()) == (code, "`field` is wrong: fix it like so")


def test_messages_over_the_limit_are_refused(start_app, client_for, dog_photos):
    app = start_app(max_message_bytes=2 * 1024 * 1024)
    client = client_for("acme", app)
    with pytest.raises(grpc.RpcError) as info:
        client.subjects.CreateSubject(subjects_pb2.CreateSubjectRequest(
            class_name="dog", images=[subjects_pb2.ImageUpload(data=b"\0" * (3 * 1024 * 1024))]))
    assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED


def test_jobs_over_grpc_watch_get_list_cancel(client, app):
    # A job kind of this test only: the JobService is generic over kinds.
    app.runner.register("echo", lambda ctx: (ctx.progress(0.5, "half", step=1), {"echo": ctx.job.params["word"]})[1],
                        resumable=True)
    job = app.runner.submit("acme", "echo", {"word": "hi"}, subject_id="subj_echo")
    events = list(client.jobs.WatchJob(common_pb2.WatchJobRequest(job_id=job.job_id)))
    assert [e.sequence for e in events] == list(range(1, len(events) + 1))
    assert events[-1].state == common_pb2.JOB_STATE_SUCCEEDED
    # A kind with no typed result still fills the typed progress fields it shares with JobProgress.
    assert any(e.type == common_pb2.JOB_EVENT_TYPE_PROGRESS and e.data["step"] == 1 and e.details.step == 1
               for e in events)
    got = client.jobs.GetJob(common_pb2.GetJobRequest(job_id=job.job_id))
    assert (got.state, got.result["echo"], got.kind, got.attempts) == (common_pb2.JOB_STATE_SUCCEEDED, "hi", "echo", 1)
    listed = client.jobs.ListJobs(common_pb2.ListJobsRequest(subject_id="subj_echo"))
    assert [j.job_id for j in listed.jobs] == [job.job_id]
    with pytest.raises(grpc.RpcError) as info:
        client.jobs.CancelJob(common_pb2.CancelJobRequest(job_id=job.job_id))
    assert info.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    with pytest.raises(grpc.RpcError) as info:
        client.jobs.GetJob(common_pb2.GetJobRequest(job_id="job_nope"))
    assert info.value.code() == grpc.StatusCode.NOT_FOUND and "`job_id`" in info.value.details()


def test_a_restarted_server_serves_the_same_subjects_captions_and_jobs(start_app, tmp_path, dog_photos):
    first = start_app(data_dir=tmp_path / "home")
    _, key = first.authenticator.create_key("acme")
    client = PersonaClient.connect(first.address, key)
    subject = client.subjects.CreateSubject(subjects_pb2.CreateSubjectRequest(
        class_name="dog", images=[subjects_pb2.ImageUpload(data=d) for d in dog_photos]))
    job = client.captions.StartCaptioning(caption_pb2.StartCaptioningRequest(
        subject_id=subject.subject_id, case=caption_pb2.DESCRIPTION_CASE_1))
    assert client.wait_for_job(job.job_id).state == common_pb2.JOB_STATE_SUCCEEDED
    client.captions.SetCaption(caption_pb2.SetCaptionRequest(
        image=common_pb2.ImageRef(subject_id=subject.subject_id, image_id=subject.images[0].image_id),
        text="a photo of a sks dog on a red sofa"))
    captions = client.captions.ListCaptions(caption_pb2.ListCaptionsRequest(subject_id=subject.subject_id))
    first.stop(0)

    second = start_app(data_dir=tmp_path / "home")
    again = PersonaClient.connect(second.address, key)  # keys survive too
    assert again.subjects.GetSubject(subjects_pb2.GetSubjectRequest(subject_id=subject.subject_id)) == subject
    image = again.subjects.GetSubjectImage(subjects_pb2.GetSubjectImageRequest(
        image=common_pb2.ImageRef(subject_id=subject.subject_id, image_id=subject.images[2].image_id)))
    assert image.data == dog_photos[2]
    assert again.captions.ListCaptions(caption_pb2.ListCaptionsRequest(subject_id=subject.subject_id)) == captions
    assert captions.captions[0].text == "a photo of a sks dog on a red sofa" and len(captions.captions) == len(dog_photos)
    assert again.jobs.GetJob(common_pb2.GetJobRequest(job_id=job.job_id)).state == common_pb2.JOB_STATE_SUCCEEDED


def test_one_process_per_data_dir(start_app, tmp_path):
    from persona.services.runtime.errors import FailedPrecondition, Unavailable

    first = start_app(data_dir=tmp_path / "home")
    with pytest.raises(FailedPrecondition, match=r"in use by another persona process .*--server"):
        start_app(data_dir=tmp_path / "home")
    first.stop(0)
    second = start_app(data_dir=tmp_path / "home")  # released on stop
    with pytest.raises(Unavailable, match="cannot listen on"):
        from persona.services.app import build_app
        from persona.services.runtime.settings import RuntimeSettings
        build_app(RuntimeSettings(data_dir=tmp_path / "other"), second.address)
    start_app(data_dir=tmp_path / "other")  # the failed start above released its data dir
