"""Everything persona writes lands under its data dir: `persona-cli serve --data-dir D` driven by `persona-cli
--server` processes through subject → captions → training (with class images) → drawing → ONNX export, with HOME,
XDG_CACHE_HOME and TMPDIR pointed at empty folders that must stay empty (issue 23, item 4)."""
from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

from test_cli_serve import CLI, STARTUP_LIMIT_S, free_port, wait_until_serving

# Variables that would send a library's cache somewhere the test does not watch (or that name a persona setting a
# developer's shell may carry): the processes see none of them.
REDIRECTING = ("HF_HOME", "HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE", "TRANSFORMERS_CACHE", "TORCH_HOME",
               "TORCHINDUCTOR_CACHE_DIR", "TRITON_CACHE_DIR", "MPLCONFIGDIR", "XDG_CONFIG_HOME", "XDG_DATA_HOME")
# Long enough for a busy 2-core machine; not a performance bound.
COMMAND_LIMIT_S = 300


def everything_under(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*"))


@pytest.fixture
def outside(tmp_path) -> dict[str, Path]:
    """Fresh, empty HOME, XDG_CACHE_HOME and TMPDIR."""
    folders = {name: tmp_path / name.lower() for name in ("HOME", "XDG_CACHE_HOME", "TMPDIR")}
    for folder in folders.values():
        folder.mkdir()
    return folders


@pytest.fixture
def env(outside) -> dict[str, str]:
    kept = {k: v for k, v in os.environ.items() if not k.startswith("PERSONA_") and k not in REDIRECTING}
    return {**kept, **{name: str(folder) for name, folder in outside.items()}, "HF_HUB_OFFLINE": "1"}


def test_serve_writes_nothing_outside_its_data_dir(tmp_path, outside, env, dreambench):
    data_dir, out, log = tmp_path / "data", tmp_path / "out", tmp_path / "serve.log"
    port = free_port()
    with log.open("w") as stderr:
        server = subprocess.Popen([*CLI, "serve", "--port", str(port), "--data-dir", str(data_dir), "--auth", "none"],
                                  stdout=subprocess.DEVNULL, stderr=stderr, env=env)
    address = f"127.0.0.1:{port}"

    def cli(*args) -> str:
        result = subprocess.run([*CLI, "--server", address, *map(str, args)], capture_output=True, text=True,
                                env=env, timeout=COMMAND_LIMIT_S)
        assert result.returncode == 0, f"{args}: exit {result.returncode}\n{result.stderr}\nserver:\n{log.read_text()}"
        return result.stdout

    try:
        wait_until_serving(server, address, log)
        subject_id = json.loads(cli("subjects", "add", dreambench / "dog", "--class", "dog", "--json"))["subject_id"]
        cli("caption", subject_id, "--case", "1")
        # Prior preservation on (the default), with two class images of two steps: the pipeline load diffusers does
        # for them imports onnxruntime, which writes its telemetry files under the cache it is pointed at.
        trained = json.loads(cli("train", subject_id, "--method", "lora", "--base-model", "tiny", "--steps", "2",
                                 "--resolution", "32", "--num-class-images", "2", "--class-image-steps", "2", "--json"))
        concept_id = trained["concept_id"]
        cli("generate", concept_id, "a sks dog on the beach", "--steps", "2", "--width", "32", "--height", "32",
            "--out", out / "shots")
        cli("export", concept_id, "--format", "onnx", "--out", out / "onnx")
    finally:
        server.terminate()
        server.wait(timeout=STARTUP_LIMIT_S)

    assert list((out / "shots").glob("*.png")) and (out / "onnx" / "unet" / "model.onnx").is_file()
    for name, folder in outside.items():
        assert everything_under(folder) == [], f"persona wrote under ${name}"
    # Beside the data dir only what the test itself made: the server's log and the files the CLI was asked for.
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["data", "out", "serve.log", *(
        f.name for f in outside.values())])
    # The caches persona did fill are in the data dir: the built-in model and onnxruntime's files.
    assert (data_dir / "models" / "tiny-sd" / "model_index.json").is_file()
    assert (data_dir / "cache").is_dir()
