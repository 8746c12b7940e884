"""`build_app(services=…)` / `persona-cli serve --services`: a real server serving some of the services (one pod per
service in the Helm chart's split topology), and the client's per-service addresses reaching a split deployment."""
from __future__ import annotations

import subprocess
import sys

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from persona.client.commands.session import Session, service_addresses_from_env
from persona.client.output import CliError
from persona.client.sdk import SERVICE_ADDRESS_ENV, PersonaClient
from persona.services.app import SERVICES, parse_services
from persona.services.runtime.errors import InvalidArgument
from persona.v1 import caption_pb2, common_pb2, generate_pb2, subjects_pb2, train_pb2

SERVING = health_pb2.HealthCheckResponse.SERVING


def health_of(address: str, service: str) -> int:
    """grpc.health.v1 status of `service` ("" = the server), as Kubernetes' gRPC probe asks it; NOT_FOUND raises."""
    with grpc.insecure_channel(address) as channel:
        return health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=service),
                                                          timeout=5).status


def reflected_services(address: str) -> set[str]:
    with grpc.insecure_channel(address) as channel:
        stub = reflection_pb2_grpc.ServerReflectionStub(channel)
        [response] = stub.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")]))
        return {s.name for s in response.list_services_response.service}


def rpc_code(call, request) -> grpc.StatusCode:
    with pytest.raises(grpc.RpcError) as info:
        call(request, timeout=10)
    return info.value.code()


def test_a_caption_only_server_serves_caption_subjects_jobs_and_health_but_not_train(start_app, client_for,
                                                                                      dog_photos):
    app = start_app(services={"caption"})
    client = client_for("acme", app)
    assert app.services == {"caption"}

    # Caption works end to end, including its job (the runner runs caption jobs here) and the always-on services.
    subject = client.subjects.CreateSubject(subjects_pb2.CreateSubjectRequest(
        class_name="dog", images=[subjects_pb2.ImageUpload(data=p, filename=f"{i:02}.jpg")
                                  for i, p in enumerate(dog_photos)]))
    job = client.captions.StartCaptioning(caption_pb2.StartCaptioningRequest(
        subject_id=subject.subject_id, case=caption_pb2.DESCRIPTION_CASE_1))
    done = client.wait_for_job(job.job_id, timeout_s=60)
    assert done.state == common_pb2.JOB_STATE_SUCCEEDED, done.error
    captions = client.captions.ListCaptions(caption_pb2.ListCaptionsRequest(subject_id=subject.subject_id)).captions
    assert len(captions) == len(dog_photos)

    # The services this pod does not serve are not on its port at all.
    assert rpc_code(client.train.ListConcepts, train_pb2.ListConceptsRequest()) == grpc.StatusCode.UNIMPLEMENTED
    assert rpc_code(client.train.StartTraining, train_pb2.StartTrainingRequest(
        subject_id=subject.subject_id)) == grpc.StatusCode.UNIMPLEMENTED
    assert rpc_code(client.generate.ListLoadedConcepts,
                    generate_pb2.ListLoadedConceptsRequest()) == grpc.StatusCode.UNIMPLEMENTED

    # Its job runner runs caption jobs only (train/export jobs belong to the train pod).
    assert app.runner.runs("caption")
    assert not app.runner.runs("train") and not app.runner.runs("export") and not app.runner.runs("evaluate")

    # Health: the server ("" — what the chart's probes ask) and each service served; unserved ones are unknown.
    for service in ("", "persona.v1.CaptionService", "persona.v1.SubjectService", "persona.v1.JobService"):
        assert health_of(app.address, service) == SERVING, service
    with pytest.raises(grpc.RpcError) as info:
        health_of(app.address, "persona.v1.TrainService")
    assert info.value.code() == grpc.StatusCode.NOT_FOUND

    listed = reflected_services(app.address)
    assert {"persona.v1.CaptionService", "persona.v1.SubjectService", "persona.v1.JobService",
            "grpc.health.v1.Health"} <= listed
    assert not {"persona.v1.TrainService", "persona.v1.GenerateService", "persona.v1.MaskService",
                "persona.v1.EvaluateService"} & listed


def test_without_services_every_service_and_job_kind_is_served(app):
    assert app.services == set(SERVICES)
    assert all(app.runner.runs(kind) for kind in ("caption", "train", "export", "evaluate"))
    for name in ("Caption", "Mask", "Train", "Generate", "Evaluate"):
        assert health_of(app.address, f"persona.v1.{name}Service") == SERVING


def test_service_names_are_checked(start_app, tmp_path):
    assert parse_services(None) is None and parse_services("") is None and parse_services(" , ") is None
    assert parse_services("caption, Train") == {"caption", "train"}
    assert parse_services(["generate", "subjects", "jobs"]) == {"generate"}  # always served: accepted, ignored
    assert parse_services("subjects") == frozenset()
    with pytest.raises(InvalidArgument) as info:
        start_app(services="caption,trian")
    message = str(info.value)
    assert "trian" in message and "caption, mask, train, generate, evaluate" in message
    # Rejected before the data dir is taken: the next start on it works.
    assert start_app(services="train").services == {"train"}


def test_client_sends_each_service_to_its_own_address(start_app, tmp_path, dog_photos):
    """Two pods of a split deployment (here two data dirs; in the chart they share Postgres): caption on one,
    train on the other; the client reaches train through its per-service address."""
    caption_pod = start_app(data_dir=tmp_path / "caption-pod", auth="none", services={"caption"})
    train_pod = start_app(data_dir=tmp_path / "train-pod", auth="none", services={"train"})

    alone = PersonaClient.connect(caption_pod.address)
    try:
        assert rpc_code(alone.train.ListConcepts, train_pb2.ListConceptsRequest()) == grpc.StatusCode.UNIMPLEMENTED
    finally:
        alone.close()

    client = PersonaClient.connect(caption_pod.address, service_addresses={"train": train_pod.address,
                                                                            "caption": caption_pod.address})
    try:
        assert client.channel_for("train") is not client.channel
        assert client.channel_for("caption") is client.channel and client.channel_for("generate") is client.channel
        assert list(client.train.ListConcepts(train_pb2.ListConceptsRequest(), timeout=10).concepts) == []
        # Caption calls still reach the caption pod (NOT_FOUND from CaptionService, not UNIMPLEMENTED from train's).
        assert rpc_code(client.captions.ListCaptions,
                        caption_pb2.ListCaptionsRequest(subject_id="subj_missing")) == grpc.StatusCode.NOT_FOUND
        # Subjects go to the default address: the subject lands in the caption pod's store only.
        subject = client.subjects.CreateSubject(subjects_pb2.CreateSubjectRequest(
            class_name="dog", images=[subjects_pb2.ImageUpload(data=dog_photos[0], filename="00.jpg")]), timeout=10)
        assert [s.subject_id for s in client.all_subjects()] == [subject.subject_id]
        direct = PersonaClient.connect(train_pod.address)
        assert list(direct.all_subjects()) == []
        direct.close()
    finally:
        client.close()

    with pytest.raises(ValueError, match="subjects"):
        PersonaClient(grpc.insecure_channel(caption_pod.address), {"subjects": grpc.insecure_channel("x:1")})


def test_cli_session_reads_per_service_addresses_from_the_environment(start_app, tmp_path, monkeypatch):
    for var in SERVICE_ADDRESS_ENV.values():
        monkeypatch.delenv(var, raising=False)
    caption_pod = start_app(data_dir=tmp_path / "caption-pod", auth="none", services={"caption"})
    train_pod = start_app(data_dir=tmp_path / "train-pod", auth="none", services={"train"})
    monkeypatch.setenv("PERSONA_TRAIN_SERVER", train_pod.address)
    monkeypatch.setenv("PERSONA_GENERATE_SERVER", "")  # empty: falls back to --server
    assert service_addresses_from_env() == {"train": train_pod.address}

    session = Session(server=caption_pod.address)
    try:
        client = session.client()
        assert list(client.train.ListConcepts(train_pb2.ListConceptsRequest(), timeout=10).concepts) == []
        assert client.channel_for("generate") is client.channel
    finally:
        session.close()

    # Per-service addresses without --server would mix a remote service with an in-process one: refused.
    with pytest.raises(CliError) as info:
        Session(server=None, data_dir=tmp_path / "embedded").client()
    assert info.value.code == "INVALID_ARGUMENT" and "PERSONA_TRAIN_SERVER" in info.value.message


def test_serve_rejects_an_unknown_service_name(tmp_path):
    env = {"PATH": "/usr/bin:/bin", "HOME": str(tmp_path)}
    result = subprocess.run([sys.executable, "-m", "persona.client.cli", "serve", "--port", "0", "--data-dir",
                             str(tmp_path / "data"), "--services", "caption,painting"],
                            capture_output=True, text=True, timeout=120, env=env)
    assert result.returncode == 1, result.stderr
    assert "Traceback" not in result.stderr
    assert result.stderr.strip().startswith("INVALID_ARGUMENT: ") and "painting" in result.stderr
    assert "caption, mask, train, generate, evaluate" in result.stderr
