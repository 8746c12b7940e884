"""Models loading while others train and draw, through a real gRPC server on the tiny base: concurrent
load/unload/train/generate for a bounded number of rounds, then every RPC still works and health says SERVING.

diffusers and accelerate load weights by patching process-wide state for the duration of a load
(`nn.Module.register_parameter` to the meta device, `torch.nn.init` to no-ops, the default dtype); two loads at once
used to leave the patches installed, and every later load failed with `Cannot copy out of meta tensor`.
"""
from __future__ import annotations

import threading

import grpc
import pytest
import torch
from grpc_health.v1 import health_pb2, health_pb2_grpc

from persona.services.runtime import models
from persona.v1 import common_pb2, generate_pb2, subjects_pb2, train_pb2

# Rounds per worker: together well under a minute on two CPU cores (about 15 s here).
ROUNDS = 4
SMALL = train_pb2.TrainingOptions(steps=2, resolution=32, checkpoint_every=0)


@pytest.fixture
def subject(client, dog_photos):
    return client.subjects.CreateSubject(subjects_pb2.CreateSubjectRequest(
        class_name="dog", images=[subjects_pb2.ImageUpload(data=d) for d in dog_photos[:2]]))


def _train(client, subject_id: str, method: str = "lora") -> common_pb2.Job:
    job = client.train.StartTraining(train_pb2.StartTrainingRequest(
        subject_id=subject_id, base_model="tiny", method=method, regularizers=["none"], options=SMALL))
    return client.wait_for_job(job.job_id, timeout_s=600)


def _draw(client, concept_id: str) -> None:
    (image,) = client.generate.Generate(generate_pb2.GenerateRequest(
        concept_id=concept_id, prompts=["a sks dog"], steps=2, width=32, height=32))
    assert image.png


def _serving(app) -> int:
    with grpc.insecure_channel(app.address) as channel:
        return health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest()).status


def test_concurrent_load_unload_train_and_generate_leave_every_rpc_working(app, client, subject):
    first = _train(client, subject.subject_id)
    assert first.state == common_pb2.JOB_STATE_SUCCEEDED, first.error
    concept_id = first.params["concept_id"]
    failures: list[str] = []

    def worker(body):
        def run():
            for _ in range(ROUNDS):
                try:
                    body()
                except Exception as e:  # collected and asserted below: a thread's exception is otherwise lost
                    failures.append(f"{body.__name__}: {e}")
        return threading.Thread(target=run)

    def unload_and_load():
        try:
            client.generate.UnloadConcept(generate_pb2.UnloadConceptRequest(concept_id=concept_id))
        except grpc.RpcError as e:
            assert e.code() == grpc.StatusCode.NOT_FOUND  # another worker unloaded it first
        client.generate.LoadConcept(generate_pb2.LoadConceptRequest(concept_id=concept_id))

    def train():
        job = _train(client, subject.subject_id, "dreambooth")
        assert job.state == common_pb2.JOB_STATE_SUCCEEDED, job.error.message

    def generate():
        _draw(client, concept_id)

    def base_model():
        (image,) = client.generate.Generate(generate_pb2.GenerateRequest(
            base_model="tiny", prompts=["a dog"], steps=1, width=32, height=32))
        assert image.png

    threads = [worker(f) for f in (unload_and_load, train, generate, generate, base_model)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not failures, failures

    # Afterwards every RPC still works, and the process says it serves.
    assert _serving(app) == health_pb2.HealthCheckResponse.SERVING
    again = _train(client, subject.subject_id)
    assert again.state == common_pb2.JOB_STATE_SUCCEEDED, again.error
    client.generate.UnloadConcept(generate_pb2.UnloadConceptRequest(concept_id=concept_id))
    client.generate.LoadConcept(generate_pb2.LoadConceptRequest(concept_id=concept_id))
    _draw(client, again.params["concept_id"])
    assert client.generate.ListLoadedConcepts(generate_pb2.ListLoadedConceptsRequest()).concepts
