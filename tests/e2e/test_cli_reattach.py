"""`persona-cli jobs watch` against a `persona-cli serve` that is killed and restarted on the same port: the CLI
re-attaches to the job's stream after the last event it saw, and ends with the resumed job's success."""
from __future__ import annotations

import json
import subprocess

from test_cli_serve import CLI, STARTUP_LIMIT_S, add_dog_subject, clean_env, free_port, start_server

from persona.client.sdk import PersonaClient
from persona.v1 import common_pb2, train_pb2


def test_jobs_watch_reattaches_after_a_server_restart(tmp_path, dreambench):
    env = {**clean_env(), "PERSONA_MODEL_CACHE": str(tmp_path / "models"), "PERSONA_TRAIN_DEVICE": "cpu"}
    data_dir, log, port = tmp_path / "data", tmp_path / "serve.log", free_port()
    server = start_server(data_dir, log, env, port=port)
    watch = None
    try:
        client = PersonaClient.connect(server.address)
        subject = add_dog_subject(client, dreambench, 2)
        job = client.train.StartTraining(train_pb2.StartTrainingRequest(
            subject_id=subject.subject_id, base_model="tiny", method="lora", regularizers=["none"],
            options=train_pb2.TrainingOptions(steps=40, resolution=32, checkpoint_every=4)))
        watch = subprocess.Popen([*CLI, "--server", server.address, "--json", "jobs", "watch", job.job_id],
                                 stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
        for event in client.jobs.WatchJob(common_pb2.WatchJobRequest(job_id=job.job_id), timeout=STARTUP_LIMIT_S):
            if event.type == common_pb2.JOB_EVENT_TYPE_PROGRESS and event.data["step"] >= 5:
                break  # running, a checkpoint on disk, and the CLI watching
        client.close()
        server.kill()  # the CLI's stream breaks: UNAVAILABLE
        assert watch.poll() is None, watch.communicate()  # still waiting for the server to come back

        server = start_server(data_dir, log, env, port=port)
        out, err = watch.communicate(timeout=STARTUP_LIMIT_S * 3)
        assert watch.returncode == 0, err
        final = json.loads(out)
        assert final["state"] == "JOB_STATE_SUCCEEDED" and final["interrupted"] is True, final
    finally:
        if watch is not None and watch.poll() is None:
            watch.kill()
        server.stop()
