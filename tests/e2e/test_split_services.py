"""The chart's split topology on one machine: five `persona-cli serve --services NAME` processes over one Postgres
database and one shared data dir (the ReadWriteMany volume), and persona-cli driving subject → caption → train →
generate through PERSONA_<SERVICE>_SERVER, each call reaching the process that serves it. Killing one process
leaves the others serving."""
from __future__ import annotations

import subprocess

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from test_cli_serve import CLI, STARTUP_LIMIT_S, clean_env, free_port, wait_until_serving

SERVICES = ("caption", "mask", "train", "generate", "evaluate")


@pytest.fixture
def split(tmp_path, postgres_dsn, model_cache):
    env = {**clean_env(), "PERSONA_DATABASE_URL": postgres_dsn, "PERSONA_MODEL_CACHE": str(model_cache),
           "PERSONA_TRAIN_DEVICE": "cpu", "PERSONA_GENERATE_DEVICE": "cpu", "HF_HUB_OFFLINE": "1"}
    data_dir = tmp_path / "data"  # one data dir for all: the shared volume of a cluster
    processes = {}
    try:
        for name in SERVICES:  # started together, as pods are: they migrate the database once between them
            port, log = free_port(), tmp_path / f"{name}.log"
            with log.open("w") as stderr:
                process = subprocess.Popen([*CLI, "serve", "--services", name, "--port", str(port), "--data-dir",
                                            str(data_dir), "--auth", "none"], stdout=subprocess.DEVNULL,
                                           stderr=stderr, env=env)
            processes[name] = (process, f"127.0.0.1:{port}", log)
        for process, address, log in processes.values():
            wait_until_serving(process, address, log)
        yield processes, env, data_dir
    finally:
        for process, _, _ in processes.values():
            if process.poll() is None:
                process.terminate()
        for process, _, _ in processes.values():
            try:
                process.wait(30)
            except subprocess.TimeoutExpired:
                process.kill()


def cli(env: dict, *args: str) -> str:
    result = subprocess.run([*CLI, *args], capture_output=True, text=True, env=env, timeout=STARTUP_LIMIT_S * 3)
    assert result.returncode == 0, f"persona-cli {' '.join(args)}: exit {result.returncode}\n{result.stderr}"
    return result.stdout


def health(address: str, service: str = "") -> int:
    with grpc.insecure_channel(address) as channel:
        return health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=service),
                                                         timeout=5).status


def test_five_processes_over_postgres_serve_the_flow_each_call_where_it_belongs(split, dreambench, tmp_path):
    import json

    processes, env, data_dir = split
    address = {name: served[1] for name, served in processes.items()}
    client_env = {**env, "PERSONA_SERVER": address["caption"],  # any pod serves subjects and jobs
                  **{f"PERSONA_{name.upper()}_SERVER": address[name] for name in SERVICES}}
    client_env.pop("PERSONA_DATABASE_URL")  # a client knows addresses, not the database

    photos = sorted((dreambench / "dog").glob("*.jpg"))[:2]
    subject = json.loads(cli(client_env, "--json", "subjects", "add", *map(str, photos), "--class", "dog"))
    subject_id = subject["subject_id"]
    cli(client_env, "caption", subject_id, "--case", "1")
    trained = json.loads(cli(client_env, "--json", "train", subject_id, "--method", "lora", "--base-model", "tiny",
                             "--steps", "2", "--resolution", "32", "--reg", "none"))
    concept_id = trained["concept_id"]
    out = tmp_path / "shots"
    cli(client_env, "generate", concept_id, "a photo of sks dog", "-n", "1", "--steps", "2", "--width", "64",
        "--height", "64", "--out", str(out))
    assert [p.suffix for p in out.iterdir()] == [".png"]

    # Each job ran in the process serving its kind; the rows are in Postgres, nothing in a SQLite file.
    import psycopg

    with psycopg.connect(env["PERSONA_DATABASE_URL"]) as db:
        owners = dict(db.execute("SELECT kind, owner FROM jobs WHERE state = 'SUCCEEDED'").fetchall())
    assert owners["caption"].split(":")[1] == str(processes["caption"][0].pid)
    assert owners["train"].split(":")[1] == str(processes["train"][0].pid)
    assert not (data_dir / "metadata.sqlite3").exists()

    # One pod down: the rest keep serving (and say which service they serve).
    processes["train"][0].kill()
    processes["train"][0].wait(10)
    assert health(address["generate"]) == health(address["caption"]) == health_pb2.HealthCheckResponse.SERVING
    assert health(address["generate"], "persona.v1.GenerateService") == health_pb2.HealthCheckResponse.SERVING
    assert subject_id in cli(client_env, "subjects", "list")  # every pod serves subjects
    cli(client_env, "generate", concept_id, "a photo of sks dog in the snow", "-n", "1", "--steps", "2", "--width",
        "64", "--height", "64", "--out", str(out))  # drawing needs no train pod
    assert len(list(out.iterdir())) == 2
    failed = subprocess.run([*CLI, "concepts", "list"], capture_output=True, text=True, env=client_env, timeout=60)
    assert failed.returncode != 0 and "UNAVAILABLE" in failed.stderr  # the train service's own calls wait for it
