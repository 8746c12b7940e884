"""A `persona-cli serve` process killed with SIGKILL mid-training resumes the job from its last checkpoint on
restart, and ends with the weights an uninterrupted run with the same seed produces."""
from __future__ import annotations

import torch

from test_cli_serve import STARTUP_LIMIT_S, add_dog_subject, clean_env, start_server

from persona.client.sdk import PersonaClient
from persona.v1 import common_pb2, train_pb2, train_pb2_grpc

OPTIONS = dict(steps=24, resolution=32, learning_rate=1e-2, checkpoint_every=4, seed=7)


def _train(client: PersonaClient, subject_id: str) -> common_pb2.Job:
    return train_pb2_grpc.TrainServiceStub(client.channel).StartTraining(train_pb2.StartTrainingRequest(
        subject_id=subject_id, base_model="tiny", method="lora", regularizers=["none"],
        options=train_pb2.TrainingOptions(**OPTIONS)))


def _weights(client: PersonaClient, concept_id: str) -> dict:
    stub = train_pb2_grpc.TrainServiceStub(client.channel)
    concept = stub.GetConcept(train_pb2.GetConceptRequest(concept_id=concept_id))
    assert concept.state == train_pb2.CONCEPT_STATE_READY and concept.steps_done == OPTIONS["steps"]
    (file,) = concept.files
    data = b"".join(c.data for c in stub.ReadConceptFile(train_pb2.ReadConceptFileRequest(
        concept_id=concept_id, artifact_id=file.artifact_id)))
    from safetensors.torch import load
    return load(data)


def test_training_killed_with_sigkill_resumes_to_the_same_weights(tmp_path, dreambench):
    env = {**clean_env(), "PERSONA_MODEL_CACHE": str(tmp_path / "models"), "PERSONA_TRAIN_DEVICE": "cpu"}
    data_dir, log = tmp_path / "data", tmp_path / "serve.log"
    server = start_server(data_dir, log, env)
    try:
        client = PersonaClient.connect(server.address)
        subject = add_dog_subject(client, dreambench, 3)
        job = _train(client, subject.subject_id)
        for event in client.jobs.WatchJob(common_pb2.WatchJobRequest(job_id=job.job_id), timeout=STARTUP_LIMIT_S):
            if event.type == common_pb2.JOB_EVENT_TYPE_PROGRESS and event.details.step >= 10:
                break  # at least the step-8 checkpoint is on disk
        server.kill()
        client.close()
        checkpoint = data_dir / "train" / job.params["concept_id"] / "checkpoint" / "checkpoint.pt"
        assert checkpoint.exists()

        server = start_server(data_dir, log, env)
        client = PersonaClient.connect(server.address)
        final = client.wait_for_job(job.job_id, timeout_s=STARTUP_LIMIT_S * 3)
        assert final.state == common_pb2.JOB_STATE_SUCCEEDED, final.error
        assert final.interrupted and final.attempts == 2
        assert 8 <= final.train_result.resumed_from_step < OPTIONS["steps"]

        straight = client.wait_for_job(_train(client, subject.subject_id).job_id, timeout_s=STARTUP_LIMIT_S * 3)
        assert straight.result["resumed_from_step"] == 0
        resumed, expected = _weights(client, job.params["concept_id"]), _weights(client, straight.params["concept_id"])
        assert resumed.keys() == expected.keys()
        for key in expected:
            torch.testing.assert_close(resumed[key], expected[key], atol=1e-6, rtol=0)
        client.close()
    finally:
        server.stop()

