"""`persona-cli bench generate` on the tiny model (CPU): every path draws, each row carries its ratio to diffusers
(and to diffusers + compile where that row exists), the embedded engine reports its first and cached start and a
second concept's in-place hot-load, Triton its first load and hot-load, and the output says why compile rows are
left out on a CPU. Figures are printed, never asserted."""
from __future__ import annotations

import json

from typer.testing import CliRunner

from persona.client.cli import app


def test_bench_generate_prints_every_path_beside_diffusers(tmp_path, monkeypatch, model_cache):
    monkeypatch.setenv("PERSONA_MODEL_CACHE", str(model_cache))
    for name in ("PERSONA_SERVER", "PERSONA_GENERATE_ENGINE", "PERSONA_TRITON_URL"):
        monkeypatch.delenv(name, raising=False)
    result = CliRunner().invoke(app, ["--data-dir", str(tmp_path / "home"), "--json", "bench", "generate",
                                      "--base-model", "tiny", "--steps", "2", "--repeats", "1", "--warmup", "0",
                                      "--resolution", "32", "--batch", "1", "--batch", "2", "--device", "cpu"])
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    rows = {(r["path"], r["batch"]): r for r in data["rows"]}
    assert set(rows) == {(p, b) for p in ("triton", "embedded", "diffusers") for b in (1, 2)}
    assert all(r["seconds_per_image"] > 0 and r["peak_gpu_mem_bytes"] is None for r in rows.values())
    assert rows[("diffusers", 2)]["speedup_vs_diffusers"] == 1.0
    assert rows[("triton", 1)]["speedup_vs_diffusers"] == (
        rows[("diffusers", 1)]["seconds_per_image"] / rows[("triton", 1)]["seconds_per_image"])
    assert data["triton_hot_load_seconds"] > 0 and data["triton_first_load_seconds"] > 0
    assert data["triton_components"] == "python" and data["device"].startswith("cpu")
    assert all(r["speedup_vs_diffusers_compile"] is None for r in rows.values())  # no compile row on CPU…
    assert any("torch.compile" in line and "--path" in line for line in data["notes"])  # …and it says why
    [start] = data["starts"]
    assert start["path"] == "embedded" and start["first_start_seconds"] > 0 and start["cached_start_seconds"] > 0
    assert start["hot_load_seconds"] > 0 and start["recaptured"] is False  # the base's modules, weights copied in
