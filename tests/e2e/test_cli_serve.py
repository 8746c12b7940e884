"""`persona-cli serve` as a real process, driven by `persona-cli --server` processes with API keys:
health, reflection, access logs, auth errors and a graceful stop on SIGTERM."""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import threading
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

CLI = [sys.executable, "-m", "persona.client.cli"]
# How long a test waits for a server that never comes up before failing (not a performance bound).
STARTUP_LIMIT_S = 120
# Longer than the server's 10 s grace period: waiting past it means the stop hung.
STOP_LIMIT_S = 60


def clean_env() -> dict[str, str]:
    """The environment without persona settings a developer's shell may carry."""
    return {k: v for k, v in os.environ.items() if not k.startswith("PERSONA_")}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def persona_cli(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    """Runs `persona-cli *args` as a separate process."""
    result = subprocess.run([*CLI, *map(str, args)], capture_output=True, text=True, env=clean_env(),
                            timeout=STARTUP_LIMIT_S)
    if check:
        assert result.returncode == 0, f"exit {result.returncode}\nstdout: {result.stdout}\nstderr: {result.stderr}"
    return result


@dataclass
class Served:
    process: subprocess.Popen
    address: str
    data_dir: Path
    log: Path

    def kill(self) -> None:
        """SIGKILL, as a crash: no handler runs, nothing is cleaned up."""
        self.process.kill()
        self.process.wait()

    def stop(self) -> None:
        """Kills the server if it still runs (the tests' servers hold nothing worth a graceful stop)."""
        if self.process.poll() is None:
            self.kill()

    def remote(self, key: str | None, *args: str, check: bool = True) -> subprocess.CompletedProcess:
        """`persona-cli --server ADDRESS [--api-key KEY] *args`."""
        auth = ("--api-key", key) if key else ()
        return persona_cli("--server", self.address, *auth, *args, check=check)


def wait_until_serving(process: subprocess.Popen, address: str, log: Path) -> None:
    """Polls grpc.health.v1 until the server reports SERVING (or the process dies, or the limit passes)."""
    deadline = time.monotonic() + STARTUP_LIMIT_S
    with grpc.insecure_channel(address) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        while True:
            assert process.poll() is None, f"server exited with {process.returncode}:\n{log.read_text()}"
            assert time.monotonic() < deadline, f"server not SERVING after {STARTUP_LIMIT_S}s:\n{log.read_text()}"
            try:
                status = health.Check(health_pb2.HealthCheckRequest(), timeout=1, wait_for_ready=True).status
            except grpc.RpcError:
                continue  # not listening yet: wait_for_ready waited up to the 1 s timeout
            if status == health_pb2.HealthCheckResponse.SERVING:
                return


def add_dog_subject(client, dreambench: Path, count: int):
    """A subject of the first `count` DreamBench dog photos, uploaded through `client` (a PersonaClient)."""
    from persona.v1 import subjects_pb2

    photos = sorted((dreambench / "dog").glob("*.jpg"))[:count]
    return client.subjects.CreateSubject(subjects_pb2.CreateSubjectRequest(
        class_name="dog", images=[subjects_pb2.ImageUpload(data=p.read_bytes()) for p in photos]))


def start_server(data_dir: Path, log: Path, env: dict[str, str], *, port: int | None = None,
                 auth: str = "none") -> Served:
    """`persona-cli serve` on 127.0.0.1:`port` (a free one when None), its stderr appended to `log`, once SERVING;
    killed if it never gets there."""
    port = port or free_port()
    with log.open("a") as stderr:
        process = subprocess.Popen([*CLI, "serve", "--port", str(port), "--data-dir", str(data_dir), "--auth", auth],
                                   stdout=subprocess.DEVNULL, stderr=stderr, env=env)
    server = Served(process, f"127.0.0.1:{port}", data_dir, log)
    try:
        wait_until_serving(process, server.address, log)
    except BaseException:
        server.stop()
        raise
    return server


@pytest.fixture
def served(tmp_path):
    server = start_server(tmp_path / "data", tmp_path / "serve.log", clean_env(), auth="api-key")
    try:
        yield server
    finally:
        server.stop()


def one_error_line(result: subprocess.CompletedProcess, code: str) -> str:
    assert result.returncode == 1, f"exit {result.returncode}\nstdout: {result.stdout}\nstderr: {result.stderr}"
    assert "Traceback" not in result.stderr
    # generate says what it starts before the answer comes (a plain line when stderr is no terminal)
    lines = [line for line in result.stderr.strip().splitlines() if not line.startswith("loading the model")]
    assert len(lines) == 1 and lines[0].startswith(f"{code}: "), result.stderr
    return lines[0]


def test_serve_with_api_keys_end_to_end(served, dreambench):
    key = persona_cli("keys", "create", "acme", "--name", "e2e", "--data-dir", served.data_dir).stdout.strip()
    assert key.startswith("pk_")

    subject = json.loads(served.remote(key, "subjects", "add", dreambench / "dog", "--class", "dog", "--json").stdout)
    subject_id = subject["subject_id"]
    assert len(subject["images"]) == len(list((dreambench / "dog").glob("*.jpg")))
    listed = json.loads(served.remote(key, "--json", "subjects", "list").stdout)
    assert [s["subject_id"] for s in listed["subjects"]] == [subject_id]

    captioned = json.loads(served.remote(key, "caption", subject_id, "--case", "1", "--json").stdout)
    assert captioned["job"]["state"] == "JOB_STATE_SUCCEEDED"
    shown = served.remote(key, "captions", "show", subject_id).stdout
    assert shown.count("a photo of a sks dog") == len(subject["images"])

    # Another tenant's key sees none of acme's subjects, and cannot reach them by id.
    other = persona_cli("keys", "create", "globex", "--data-dir", served.data_dir).stdout.strip()
    assert json.loads(served.remote(other, "subjects", "list", "--json").stdout) == {"subjects": []}
    one_error_line(served.remote(other, "subjects", "show", subject_id, check=False), "NOT_FOUND")

    assert "not valid" in one_error_line(served.remote("pk_wrong", "subjects", "list", check=False),
                                         "UNAUTHENTICATED")
    assert "no API key" in one_error_line(served.remote(None, "subjects", "list", check=False), "UNAUTHENTICATED")

    # A revoked key stops working.
    key_ids = {k["tenant_id"]: k["key_id"] for k in
               json.loads(persona_cli("keys", "list", "--json", "--data-dir", served.data_dir).stdout)["keys"]}
    persona_cli("keys", "rm", key_ids["globex"], "--data-dir", served.data_dir)
    one_error_line(served.remote(other, "subjects", "list", check=False), "UNAUTHENTICATED")

    served.process.send_signal(signal.SIGTERM)
    assert served.process.wait(timeout=STOP_LIMIT_S) == 0
    log = served.log.read_text()
    assert f"listening on {served.address}" in log
    assert "no API keys yet: create one with `persona-cli keys create" in log  # the data dir started empty
    assert "/persona.v1.SubjectService/CreateSubject OK" in log and "tenant=acme" in log
    assert "/persona.v1.SubjectService/ListSubjects UNAUTHENTICATED" in log
    assert "received SIGTERM" in log
    assert "Traceback" not in log


def test_reflection_lists_every_service_as_grpcurl_sees_them(served):
    with grpc.insecure_channel(served.address) as channel:
        stub = reflection_pb2_grpc.ServerReflectionStub(channel)
        request = reflection_pb2.ServerReflectionRequest(list_services="")
        responses = list(stub.ServerReflectionInfo(iter([request]), timeout=30))
    names = {s.name for s in responses[0].list_services_response.service}
    assert {"persona.v1.SubjectService", "persona.v1.CaptionService", "persona.v1.JobService",
            "grpc.health.v1.Health"} <= names


def test_sigterm_stops_an_idle_server_with_status_0(served):
    served.process.send_signal(signal.SIGTERM)
    assert served.process.wait(timeout=STOP_LIMIT_S) == 0
    with grpc.insecure_channel(served.address) as channel, pytest.raises(grpc.RpcError) as stopped:
        health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5)
    assert stopped.value.code() == grpc.StatusCode.UNAVAILABLE


def test_a_second_server_on_the_same_port_says_so(served, tmp_path):
    port = served.address.rsplit(":", 1)[1]
    result = persona_cli("serve", "--port", port, "--data-dir", tmp_path / "other", check=False)
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert f"UNAVAILABLE: cannot listen on 127.0.0.1:{port}" in result.stderr


def test_console_script_is_installed():
    script = Path(sys.executable).with_name("persona-cli")
    assert script.exists(), f"{script} missing: pip install -e . installs the persona-cli console script"
    result = subprocess.run([str(script), "--help"], capture_output=True, text=True, env=clean_env(),
                            timeout=STARTUP_LIMIT_S)
    assert result.returncode == 0 and "subjects" in result.stdout and "serve" in result.stdout


def test_a_job_running_at_kill_9_is_resumed_not_running_forever(tmp_path, fake_vlm, dreambench):
    from persona.client.sdk import PersonaClient
    from persona.v1 import caption_pb2, common_pb2

    release = threading.Event()

    def slow_answer(body):  # holds each call until the test lets it go, so the kill lands mid-job
        release.wait(STARTUP_LIMIT_S)
        return "a photo of a dog lying on a green lawn next to a red rubber ball"

    fake_vlm.responder = slow_answer
    env = {**clean_env(), "PERSONA_VLM_BASE_URL": fake_vlm.base_url, "PERSONA_VLM_MODEL": "fake-vlm",
           "PERSONA_VLM_API_KEY": "x", "PERSONA_VLM_CONCURRENCY": "1", "PERSONA_VLM_RETRIES": "0"}
    data_dir, log = tmp_path / "data", tmp_path / "serve.log"
    server = start_server(data_dir, log, env)
    try:
        client = PersonaClient.connect(server.address)
        subject = add_dog_subject(client, dreambench, 3)
        job = client.captions.StartCaptioning(caption_pb2.StartCaptioningRequest(subject_id=subject.subject_id))
        release.set()
        seen = 0
        for event in client.jobs.WatchJob(common_pb2.WatchJobRequest(job_id=job.job_id), timeout=STARTUP_LIMIT_S):
            seen = event.sequence
            if event.type == common_pb2.JOB_EVENT_TYPE_PROGRESS:  # one image done, the next one in flight
                release.clear()
                break
        server.kill()
        client.close()
        asked_before_kill = len(fake_vlm.requests)
        release.set()

        server = start_server(data_dir, log, env)
        client = PersonaClient.connect(server.address)
        final = client.wait_for_job(job.job_id, timeout_s=STARTUP_LIMIT_S)
        assert final.state == common_pb2.JOB_STATE_SUCCEEDED, final
        assert final.interrupted and final.attempts == 2
        events = list(client.jobs.WatchJob(common_pb2.WatchJobRequest(job_id=job.job_id, after_sequence=seen)))
        assert any("interrupted by a server restart" in e.message for e in events)
        captions = client.captions.ListCaptions(caption_pb2.ListCaptionsRequest(subject_id=subject.subject_id))
        assert [c.text for c in captions.captions] == [
            "a photo of a sks dog lying on a green lawn next to a red rubber ball"] * 3
        # At least the image captioned before the kill was not asked for again.
        assert len(fake_vlm.requests) - asked_before_kill <= 2
        client.close()
    finally:
        release.set()
        server.stop()


def test_a_failed_job_on_a_server_shows_its_cause_and_the_trace_goes_to_the_data_dir(served, dreambench, tmp_path):
    from test_cli_train import corrupt_base_model

    key = persona_cli("keys", "create", "acme", "--data-dir", served.data_dir).stdout.strip()
    subject_id = json.loads(served.remote(key, "subjects", "add", dreambench / "dog" / "00.jpg", "--class", "dog",
                                          "--json").stdout)["subject_id"]
    # A server opens only folders under its models root (by default its model cache), named without their path.
    corrupt_base_model(Path(served.data_dir) / "models" / "broken-base")
    result = served.remote(key, "train", subject_id, "--captions", "class", "--reg", "none", "--base-model", "broken-base",
                           "--steps", "1", check=False)
    assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr
    line = result.stderr.strip().splitlines()[-1]  # after the progress notes
    assert line.startswith("INTERNAL: OSError: ") and "diffusion_pytorch_model.safetensors" in line
    assert "trace in" not in line  # a remote client is not told the server's paths
    trace_file = served.data_dir / "logs" / "errors.log"
    assert "Traceback" in trace_file.read_text()
    assert f"traces of failed jobs and calls also in {trace_file}" in served.log.read_text()
