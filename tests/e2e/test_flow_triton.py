"""The product's whole flow with the real servers: `persona-cli up` (persona + a real tritonserver) as a process,
driven by `persona-cli --server` processes — photos → SID captions (the test's OpenAI-protocol VLM) → LoRA
training (tiny) → ONNX export → loaded into Triton → images drawn there and saved with their settings."""
from __future__ import annotations

import json
import signal
import subprocess
import time

import pytest
from PIL import Image

from test_cli_serve import CLI, STOP_LIMIT_S, clean_env, free_port, persona_cli, wait_until_serving

COMPLIANT = "a photo of a sks dog lying on a green lawn next to a red rubber ball"


@pytest.fixture
def up(tmp_path, fake_vlm):
    """`persona-cli up` on free ports, its VLM the test's fake server; stopped with SIGTERM at the end."""
    port = free_port()
    data_dir, log = tmp_path / "data", tmp_path / "up.log"
    env = {**clean_env(), "PERSONA_VLM_BASE_URL": fake_vlm.base_url, "PERSONA_VLM_MODEL": "fake-vlm",
           "PERSONA_VLM_API_KEY": "test-key", "PERSONA_TRITON_GPU": "0", "PERSONA_GENERATE_ONNX_FP16": "0"}
    with log.open("w") as stderr:
        process = subprocess.Popen([*CLI, "up", "--port", str(port), "--data-dir", str(data_dir)],
                                   stdout=subprocess.DEVNULL, stderr=stderr, env=env)
    try:
        wait_until_serving(process, f"127.0.0.1:{port}", log)
        yield process, f"127.0.0.1:{port}", data_dir, log
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()


def tritonservers_on(data_dir) -> list[str]:
    """Command lines of tritonserver processes serving `data_dir`'s model repository."""
    found = subprocess.run(["pgrep", "-af", "tritonserver"], capture_output=True, text=True).stdout
    return [line for line in found.splitlines() if str(data_dir) in line]


def test_photos_to_images_drawn_on_triton(up, fake_vlm, dreambench, tmp_path):
    process, address, data_dir, log = up
    # Health says SERVING only once the tritonserver is up.
    assert tritonservers_on(data_dir), "persona-cli up started no tritonserver"

    def cli(*args: str) -> str:
        return persona_cli("--server", address, *args).stdout

    photos = tmp_path / "bruno"
    photos.mkdir()
    for photo in sorted((dreambench / "dog").glob("*.jpg"))[:3]:
        (photos / photo.name).write_bytes(photo.read_bytes())

    subject_id = json.loads(cli("subjects", "add", str(photos), "--class", "dog", "--json"))["subject_id"]
    fake_vlm.script(COMPLIANT)
    captioned = json.loads(cli("caption", subject_id, "--json"))  # Case 3, SID: the default
    assert captioned["job"]["state"] == "JOB_STATE_SUCCEEDED"
    assert len(fake_vlm.requests) == 3
    assert cli("captions", "show", subject_id).count("green lawn") == 3

    concept_id = cli("train", subject_id, "--method", "lora", "--reg", "none", "--base-model", "tiny", "--steps", "3",
                     "--resolution", "32").strip()
    assert concept_id.startswith("cpt_")

    exported = json.loads(cli("export", concept_id, "--format", "onnx", "--out", str(tmp_path / "onnx"), "--json"))
    assert {"unet/model.onnx", "text_encoder/model.onnx", "vae_decoder/model.onnx", "manifest.json"} <= {
        w["file"] for w in exported["written"]}

    shots = tmp_path / "shots"
    images = json.loads(cli("generate", concept_id, "a sks dog on the beach", "-n", "2", "--steps", "3", "--seed", "7",
                            "--out", str(shots), "--json"))
    assert [(i["engine"], int(i["seed"])) for i in images] == [("triton", 7), ("triton", 8)]
    for image in images:
        png = Image.open(image["path"])
        assert png.size == (32, 32)  # the concept's training resolution
        assert png.info["prompt"] == "a sks dog on the beach" and png.info["seed"] == image["seed"]
        assert "Steps: 3, Sampler: DPM++ 2M, CFG scale: 7.5" in png.info["parameters"]

    assert "Triton serving" in log.read_text()
    # SIGTERM stops persona and the tritonserver it started: nothing is left behind.
    process.send_signal(signal.SIGTERM)
    assert process.wait(timeout=STOP_LIMIT_S) == 0, log.read_text()
    deadline = time.monotonic() + 10
    while tritonservers_on(data_dir) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not tritonservers_on(data_dir), "tritonserver outlived persona-cli up"
