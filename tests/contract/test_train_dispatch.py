"""Training through the subprocess dispatcher, for real: the server hands each train job to a `persona-cli run-job`
child process on the same data dir and metadata store, follows it, and notices a worker that dies."""
from __future__ import annotations

import os
import signal

import pytest

from persona.client.sdk import PersonaClient
from persona.services.train.settings import TrainSettings
from persona.v1 import common_pb2, generate_pb2, subjects_pb2, train_pb2, train_pb2_grpc

OPTIONS = dict(resolution=32, checkpoint_every=0, learning_rate=1e-2)


@pytest.fixture
def dispatched(start_app, model_cache, dog_photos):
    app = start_app(auth="none", train_settings=TrainSettings(base_model_cache_dir=model_cache, device="cpu",
                                                              dispatcher="subprocess"))
    client = PersonaClient.connect(app.address)
    subject = client.subjects.CreateSubject(subjects_pb2.CreateSubjectRequest(
        class_name="dog", images=[subjects_pb2.ImageUpload(data=d, filename=f"{i}.jpg")
                                  for i, d in enumerate(dog_photos[:3])]))
    yield app, client, subject
    client.close()


def train(client, subject, steps: int) -> common_pb2.Job:
    return train_pb2_grpc.TrainServiceStub(client.channel).StartTraining(train_pb2.StartTrainingRequest(
        subject_id=subject.subject_id, base_model="tiny", method="lora", regularizers=["none"], captions="class",
        options=train_pb2.TrainingOptions(steps=steps, **OPTIONS)))


def test_a_train_job_runs_in_a_worker_process_and_its_concept_draws(dispatched):
    app, client, subject = dispatched
    job = train(client, subject, steps=4)
    events = []
    final = client.wait_for_job(job.job_id, on_event=events.append, timeout_s=300)
    assert final.state == common_pb2.JOB_STATE_SUCCEEDED, final.error
    handoff = [e.message for e in events if e.message.startswith("handed to a subprocess worker")]
    assert handoff, [e.message for e in events]
    assert any(e.type == common_pb2.JOB_EVENT_TYPE_PROGRESS for e in events)  # written by the worker, seen here

    record = app.runner.store.get(job.job_id)
    worker_pid = int(record.dispatch_handle.split(":")[1])
    assert worker_pid != os.getpid() and record.owner.split(":")[1] == str(worker_pid)  # ran in the child
    log = (app.settings.data_dir / "logs" / "jobs" / f"{job.job_id}.log").read_text()
    assert f"job {job.job_id} (train) SUCCEEDED" in log

    concept = train_pb2_grpc.TrainServiceStub(client.channel).GetConcept(
        train_pb2.GetConceptRequest(concept_id=job.params["concept_id"]))
    assert concept.state == train_pb2.CONCEPT_STATE_READY and concept.steps_done == 4
    drawn = list(client.generate.Generate(generate_pb2.GenerateRequest(
        concept_id=concept.concept_id, prompts=["a photo of sks dog"], steps=2, width=64, height=64, seed=1)))
    assert len(drawn) == 1 and drawn[0].png.startswith(b"\x89PNG")


def test_a_worker_killed_mid_training_fails_its_job_saying_so(dispatched):
    app, client, subject = dispatched
    app.runner.heartbeat_s = 0.2  # follow the worker closely (the default looks every 10 s)
    job = train(client, subject, steps=2000)
    for event in client.jobs.WatchJob(common_pb2.WatchJobRequest(job_id=job.job_id), timeout=300):
        if event.type == common_pb2.JOB_EVENT_TYPE_PROGRESS:
            break  # the worker is training
    handle = app.runner.store.get(job.job_id).dispatch_handle
    os.kill(int(handle.split(":")[1]), signal.SIGKILL)  # as the out-of-memory killer would
    final = client.wait_for_job(job.job_id, timeout_s=60)
    assert final.state == common_pb2.JOB_STATE_FAILED
    assert final.error.code == "ABORTED" and f"the subprocess worker of job {job.job_id}" in final.error.message \
        and "failed; its logs tell why" in final.error.message


def test_the_kubernetes_dispatcher_refuses_a_sqlite_store_saying_what_to_set(start_app, model_cache, tmp_path):
    from persona.services.runtime.errors import FailedPrecondition
    from persona.services.train.settings import KubernetesJobSettings

    settings = TrainSettings(base_model_cache_dir=model_cache, device="cpu", dispatcher="kubernetes",
                             kubernetes=KubernetesJobSettings(image="registry.example.com/persona:0.1.0"))
    with pytest.raises(FailedPrecondition, match="cannot share this server's SQLite file: set PERSONA_DATABASE_URL"):
        start_app(data_dir=tmp_path / "k8s", train_settings=settings)
    start_app(data_dir=tmp_path / "k8s")  # nothing was left open or locked


def test_over_postgres_the_worker_shares_the_store_as_a_kubernetes_worker_pod_would(start_app, model_cache, dog_photos,
                                                                                     postgres_dsn, tmp_path):
    """The cluster's shape on one machine: metadata in Postgres (no data-dir lock, jobs owned by heartbeat), the
    worker a separate process reaching the store through PERSONA_DATABASE_URL, exactly as a `persona-cli run-job`
    pod does."""
    app = start_app(data_dir=tmp_path / "pg", auth="none", database_url=postgres_dsn, train_settings=TrainSettings(
        base_model_cache_dir=model_cache, device="cpu", dispatcher="subprocess"))
    assert app.lock is None and not app.runner.exclusive
    client = PersonaClient.connect(app.address)
    subject = client.subjects.CreateSubject(subjects_pb2.CreateSubjectRequest(
        class_name="dog", images=[subjects_pb2.ImageUpload(data=d, filename=f"{i}.jpg")
                                  for i, d in enumerate(dog_photos[:2])]))
    job = train(client, subject, steps=2)
    final = client.wait_for_job(job.job_id, timeout_s=300)
    assert final.state == common_pb2.JOB_STATE_SUCCEEDED, final.error
    [row] = app.db.query("SELECT owner, dispatch_handle, state FROM jobs WHERE job_id = :id", {"id": job.job_id})
    worker_pid = row["dispatch_handle"].split(":")[1]
    assert row["state"] == "SUCCEEDED" and row["owner"].split(":")[1] == worker_pid != str(os.getpid())
    assert not (tmp_path / "pg" / "metadata.sqlite3").exists()
    client.close()
