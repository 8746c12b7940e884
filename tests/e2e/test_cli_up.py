"""`persona-cli up --detach`, `status` and `down` as real processes: persona and a real tritonserver started in the
background, health-checked one by one, driven through `--server`, and stopped with nothing left behind."""
from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest
from PIL import Image

from test_cli_serve import CLI, STARTUP_LIMIT_S, STOP_LIMIT_S, clean_env
from test_flow_triton import tritonservers_on


@pytest.fixture
def env(model_cache) -> dict[str, str]:
    """No persona settings from the developer's shell; Triton on CPU, fp32 ONNX, the session's model cache."""
    return {**clean_env(), "PERSONA_TRITON_GPU": "0", "PERSONA_GENERATE_ONNX_FP16": "0",
            "PERSONA_MODEL_CACHE": str(model_cache)}


@pytest.fixture
def cli(env):
    def run(*args, check: bool = True) -> subprocess.CompletedProcess:
        """`persona-cli *args` as a separate process."""
        result = subprocess.run([*CLI, *map(str, args)], capture_output=True, text=True, env=env,
                                timeout=STARTUP_LIMIT_S)
        if check:
            assert result.returncode == 0, (f"exit {result.returncode}\nstdout: {result.stdout}\n"
                                            f"stderr: {result.stderr}")
        return result
    return run


def process_gone(pid: int) -> bool:
    """Exited (a zombie left for a parent that never reaps it counts as exited)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
    except OSError:
        return True


def wait_until(condition, limit_s: float = STOP_LIMIT_S) -> bool:
    deadline = time.monotonic() + limit_s
    while not condition() and time.monotonic() < deadline:
        time.sleep(0.2)
    return condition()


@pytest.fixture
def detached(cli, tmp_path):
    """`persona-cli up --detach --port 0` on a fresh data dir → (data dir, state file contents); `down` at the end,
    and a kill of whatever is still there should a test fail before its own `down`."""
    data_dir = tmp_path / "data"
    started = cli("--json", "up", "--detach", "--port", "0", "--data-dir", data_dir)
    state = json.loads(started.stdout)
    try:
        yield data_dir, state
    finally:
        cli("down", "--data-dir", data_dir, check=False)
        for pid in (state["persona"]["pid"], state["triton"]["pid"]):
            if not process_gone(pid):
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(pid, signal.SIGKILL)


def test_up_detached_serves_the_flow_and_down_leaves_nothing(cli, detached, dreambench, tmp_path):
    data_dir, state = detached
    persona, triton = state["persona"], state["triton"]
    address = persona["address"]
    assert address.startswith("127.0.0.1:") and not address.endswith(":0")
    assert triton["grpc_url"] and triton["log"] == str(data_dir / "triton" / "tritonserver.log")
    assert json.loads((data_dir / "run" / "up.json").read_text()) == state
    assert (data_dir / "logs" / "persona.log").exists()

    shown = json.loads(cli("status", "--json", "--data-dir", data_dir).stdout)
    assert shown["serving"] is True
    assert {name: p["state"] for name, p in shown["processes"].items()} == {"persona": "serving",
                                                                            "triton": "serving"}
    table = [line.split() for line in cli("status", "--data-dir", data_dir).stdout.splitlines()]
    assert table == [["PROCESS", "PID", "ADDRESS", "STATE"],
                     ["persona", str(persona["pid"]), address, "serving"],
                     ["triton", str(triton["pid"]), triton["grpc_url"], "serving"]]

    def remote(*args: str) -> str:
        return cli("--server", address, *args).stdout

    photos = tmp_path / "bruno"
    photos.mkdir()
    for photo in sorted((dreambench / "dog").glob("*.jpg"))[:2]:
        (photos / photo.name).write_bytes(photo.read_bytes())
    subject_id = json.loads(remote("subjects", "add", str(photos), "--class", "dog", "--json"))["subject_id"]
    assert json.loads(remote("caption", subject_id, "--case", "1", "--json"))["job"]["state"] == "JOB_STATE_SUCCEEDED"
    concept_id = remote("train", subject_id, "--method", "lora", "--reg", "none", "--base-model", "tiny",
                        "--steps", "2", "--resolution", "32").strip()
    assert concept_id.startswith("cpt_")
    images = json.loads(remote("generate", concept_id, "a sks dog", "--steps", "2", "--out", str(tmp_path / "shots"),
                               "--json"))
    assert [i["engine"] for i in images] == ["triton"]
    assert Image.open(images[0]["path"]).format == "PNG"

    stopped = cli("down", "--data-dir", data_dir)
    assert f"persona (pid {persona['pid']}): stopped" in stopped.stdout
    assert f"triton (pid {triton['pid']}): stopped by persona" in stopped.stdout
    assert process_gone(persona["pid"]) and process_gone(triton["pid"])
    assert wait_until(lambda: not tritonservers_on(data_dir), 10), "tritonserver outlived `persona-cli down`"
    assert not (data_dir / "run" / "up.json").exists()
    log = (data_dir / "logs" / "persona.log").read_text()
    assert "received SIGTERM" in log and "Traceback" not in log

    # Idempotent: nothing up is not an error; status says so with exit 1.
    again = cli("down", "--data-dir", data_dir)
    assert "not up" in again.stderr
    not_up = cli("status", "--data-dir", data_dir, check=False)
    assert not_up.returncode == 1 and "persona is not up" in not_up.stderr


def test_a_killed_tritonserver_shows_in_status_and_down_still_cleans_up(cli, detached):
    data_dir, state = detached
    persona, triton = state["persona"], state["triton"]
    os.kill(triton["pid"], signal.SIGKILL)
    assert wait_until(lambda: process_gone(triton["pid"]), 10)

    shown = cli("status", "--json", "--data-dir", data_dir, check=False)
    assert shown.returncode == 1, shown.stderr
    report = json.loads(shown.stdout)
    assert report["serving"] is False
    assert report["processes"]["triton"]["state"] == "down"
    assert report["processes"]["persona"]["state"] == "serving"
    assert json.loads(cli("--server", persona["address"], "subjects", "list", "--json").stdout) == {"subjects": []}
    assert cli("status", "--data-dir", data_dir, check=False).returncode == 1

    cli("down", "--data-dir", data_dir)
    assert process_gone(persona["pid"])
    assert wait_until(lambda: not tritonservers_on(data_dir), 10), "a tritonserver outlived `persona-cli down`"
    assert not (data_dir / "run" / "up.json").exists()
    assert cli("status", "--data-dir", data_dir, check=False).returncode == 1
