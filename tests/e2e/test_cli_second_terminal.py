"""A second terminal while one persona-cli works embedded on a data dir: two real persona-cli processes. The
second reaches the first over the data dir's local socket, or, when the owner takes no local calls, fails at once
saying what to do."""
from __future__ import annotations

import json
import socket
import subprocess
import threading
import time

import pytest

from persona.services.runtime.datadir import local_socket, lock_data_dir

from fakevlm import DEFAULT_ANSWER
from test_cli_serve import CLI, STARTUP_LIMIT_S, clean_env

COMPLIANT = "a photo of a sks dog lying on a green lawn next to a red rubber ball"


def persona_cli(data_dir, *args: str, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run([*CLI, "--data-dir", str(data_dir), *args], capture_output=True, text=True,
                          env={**clean_env(), **env}, timeout=STARTUP_LIMIT_S)


def ok(result: subprocess.CompletedProcess) -> str:
    assert result.returncode == 0, f"exit {result.returncode}\nstdout: {result.stdout}\nstderr: {result.stderr}"
    return result.stdout


@pytest.fixture
def data_dir(tmp_path):
    home = tmp_path / "home"
    assert local_socket(home) is not None, f"{home} is too deep for a unix socket: run pytest with a shorter basetemp"
    return home


@pytest.fixture
def subject_id(data_dir, dreambench) -> str:
    return json.loads(ok(persona_cli(data_dir, "subjects", "add", str(dreambench / "dog"), "--class", "dog",
                                     "--json")))["subject_id"]


def test_a_second_cli_runs_its_command_in_the_one_that_owns_the_data_dir(data_dir, subject_id, fake_vlm):
    # The first terminal captions through a VLM that holds its answer until the second terminal has been heard.
    release = threading.Event()

    def held_answer(body: dict) -> str:
        release.wait(STARTUP_LIMIT_S)
        return COMPLIANT

    fake_vlm.script(held_answer)
    vlm_env = {"PERSONA_VLM_BASE_URL": fake_vlm.base_url, "PERSONA_VLM_MODEL": "fake-vlm",
               "PERSONA_VLM_API_KEY": "x", "PERSONA_VLM_RETRIES": "0"}
    first = subprocess.Popen([*CLI, "--data-dir", str(data_dir), "caption", subject_id, "--image", "0", "--json"],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env={**clean_env(), **vlm_env})
    try:
        deadline = time.monotonic() + STARTUP_LIMIT_S  # a bound on a process that never starts, not a speed check
        while not fake_vlm.requests:
            assert first.poll() is None, f"the first persona-cli ended early: {first.communicate()}"
            assert time.monotonic() < deadline, "the first persona-cli never called the VLM"
            time.sleep(0.1)

        listed = persona_cli(data_dir, "subjects", "list", "--json")
        assert [s["subject_id"] for s in json.loads(ok(listed))["subjects"]] == [subject_id]
        assert f"in use by persona-cli (pid {first.pid}): running this command in it" in listed.stderr
        jobs = json.loads(ok(persona_cli(data_dir, "jobs", "list", "--json")))["jobs"]
        assert [(j["kind"], j["state"]) for j in jobs if j["kind"] == "caption"][-1] == ("caption",
                                                                                         "JOB_STATE_RUNNING")
    finally:
        release.set()
        stdout, stderr = first.communicate(timeout=STARTUP_LIMIT_S)
    assert first.returncode == 0, stderr
    assert [c["text"] for c in json.loads(stdout)["captions"]] == [COMPLIANT]
    assert not local_socket(data_dir).exists()  # gone with the process that listened there
    # With no owner left, the next command runs embedded again and sees what the first one wrote.
    shown = ok(persona_cli(data_dir, "captions", "show", subject_id, "--json"))
    assert COMPLIANT in shown and DEFAULT_ANSWER not in shown


def test_an_owner_that_takes_no_local_calls_is_named_at_once(data_dir, subject_id):
    lock = lock_data_dir(data_dir)  # as `persona-cli serve` holds it: this test's process owns the data dir
    try:
        result = persona_cli(data_dir, "subjects", "list")
    finally:
        lock.close()
    assert result.returncode == 1 and "Traceback" not in result.stderr
    line = result.stderr.strip().splitlines()[-1]
    assert line.startswith("FAILED_PRECONDITION: ") and "in use by another persona process" in line
    assert "--server HOST:PORT" in line and "--data-dir" in line


def test_a_socket_left_by_a_killed_cli_is_replaced(data_dir, subject_id):
    stale = local_socket(data_dir)
    stale.parent.mkdir(parents=True, exist_ok=True)
    with socket.socket(socket.AF_UNIX) as listener:  # bound and closed, as after kill -9: nobody listens
        listener.bind(str(stale))
    listed = persona_cli(data_dir, "subjects", "list", "--json")
    assert [s["subject_id"] for s in json.loads(ok(listed))["subjects"]] == [subject_id]
    assert "in use" not in listed.stderr
