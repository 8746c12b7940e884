"""The training benchmark on the tiny base model, CPU: both loops run, rows and ratios are filled; `bench train --json`."""
from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
from typer.testing import CliRunner

from persona.client.commands import bench as bench_cli
from persona.services.runtime.errors import InvalidArgument
from persona.bench.train import BENCH_METHODS, OURS, REFERENCE, run_train_benchmark

# 32 px (half the tiny model's native 64) keeps a step near 0.2 s on two CPU cores; one timed step per run, as
# each run's fixed cost (loading, our loop's saving) dominates at this size.
RESOLUTION = 32


@pytest.fixture(scope="module")
def tiny(tiny_model) -> Path:
    return tiny_model


def test_benchmark_runs_both_loops_for_each_method(tiny):
    runs = []
    rows = run_train_benchmark(tiny, methods=BENCH_METHODS, steps=1, warmup_steps=1, resolution=RESOLUTION,
                               device="cpu", num_images=1, on_run=lambda method, loop: runs.append((method, loop)))
    assert runs == [(m, loop) for m in BENCH_METHODS for loop in (OURS, REFERENCE)]
    assert [(r.method, r.loop) for r in rows] == runs
    by_key = {(r.method, r.loop): r for r in rows}
    for row in rows:
        assert row.steps == 1
        assert row.seconds > 0 and row.it_per_s > 0 and row.median_it_per_s > 0
        assert row.peak_gpu_mem_bytes is None  # CPU
        assert math.isfinite(row.mean_loss) and row.mean_loss > 0
        reference = by_key[(row.method, REFERENCE)]
        assert row.vs_reference == pytest.approx(row.it_per_s / reference.it_per_s)
    assert all(by_key[(m, REFERENCE)].vs_reference == pytest.approx(1.0) for m in BENCH_METHODS)


def test_regulariser_rows_are_priced_against_plain_lora(tiny):
    rows = run_train_benchmark(tiny, methods=("lora",), steps=1, warmup_steps=1, resolution=RESOLUTION,
                               device="cpu", num_images=1, regularizers=("mask", "core"))
    by_method = {(r.method, r.loop): r for r in rows}
    assert list(by_method) == [("lora", OURS), ("lora", REFERENCE), ("lora+mask", OURS), ("lora+core", OURS)]
    plain = by_method[("lora", OURS)]
    for name in ("lora+mask", "lora+core"):
        assert by_method[(name, OURS)].vs_reference == pytest.approx(by_method[(name, OURS)].it_per_s / plain.it_per_s)
    with pytest.raises(InvalidArgument, match="`regularizers`"):
        run_train_benchmark(tiny, methods=("lora",), steps=1, device="cpu", regularizers=("sharpen",))


def test_methods_without_a_reference_are_timed_with_ours_and_priced_against_lora(tiny):
    rows = run_train_benchmark(tiny, methods=("lora", "ti", "custom_diffusion", "svdiff"), steps=1, warmup_steps=1,
                               resolution=RESOLUTION, device="cpu", num_images=1)
    by_method = {(r.method, r.loop): r for r in rows}
    assert list(by_method) == [("lora", OURS), ("lora", REFERENCE), ("ti", OURS), ("custom_diffusion", OURS),
                               ("svdiff", OURS)]
    plain = by_method[("lora", OURS)]
    for name in ("ti", "custom_diffusion", "svdiff"):
        row = by_method[(name, OURS)]
        assert row.steps == 1 and row.it_per_s > 0 and math.isfinite(row.mean_loss)
        assert row.vs_reference == pytest.approx(row.it_per_s / plain.it_per_s)
    alone = run_train_benchmark(tiny, methods=("ti",), steps=1, warmup_steps=0, resolution=RESOLUTION, device="cpu",
                                num_images=1)
    assert [(r.method, r.loop, r.vs_reference) for r in alone] == [("ti", OURS, None)]


def test_batch_size_puts_that_many_photos_and_class_images_in_each_unet_call_of_both_loops(tiny, monkeypatch):
    from diffusers import UNet2DConditionModel

    batches = []
    forward = UNet2DConditionModel.forward

    def recording(self, sample, *args, **kwargs):
        batches.append(sample.shape[0])
        return forward(self, sample, *args, **kwargs)

    monkeypatch.setattr(UNet2DConditionModel, "forward", recording)
    rows = run_train_benchmark(tiny, methods=("lora",), steps=1, warmup_steps=1, resolution=RESOLUTION,
                               device="cpu", num_images=3, batch_size=2)
    assert [(r.method, r.loop) for r in rows] == [("lora", OURS), ("lora", REFERENCE)]
    assert batches and set(batches) == {4}  # 2 photos + 2 class images, every step of both loops
    with pytest.raises(InvalidArgument, match="`batch_size` is 4: use 1 to `num_images` \\(3\\)"):
        run_train_benchmark(tiny, methods=("lora",), steps=1, device="cpu", num_images=3, batch_size=4)


def test_benchmark_rejects_unknown_method(tiny):
    with pytest.raises(InvalidArgument, match="`method`"):
        run_train_benchmark(tiny, methods=("hypernetwork",), steps=1, device="cpu")


def test_cli_prints_json(model_cache, tiny, monkeypatch):
    monkeypatch.setenv("PERSONA_MODEL_CACHE", str(model_cache))
    result = CliRunner().invoke(bench_cli.app, [
        "train", "--base-model", "tiny", "--method", "lora", "--steps", "1", "--warmup", "0",
        "--resolution", str(RESOLUTION), "--device", "cpu", "--num-images", "2", "--batch-size", "2", "--json"])
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert data["device"].startswith("cpu") and data["resolution"] == RESOLUTION and data["batch_size"] == 2
    assert [(r["method"], r["loop"]) for r in data["rows"]] == [("lora", OURS), ("lora", REFERENCE)]
    assert all(r["it_per_s"] > 0 and r["peak_gpu_mem_bytes"] is None for r in data["rows"])
    assert data["rows"][1]["vs_reference"] == pytest.approx(1.0)


def test_bench_flow_times_every_stage_from_photos_to_an_exported_lora(tmp_path, dreambench):
    import json


    from persona.client.commands import bench

    result = CliRunner().invoke(bench.app, [
        "flow", str(dreambench / "dog"), "--steps", "2", "--resolution", "32", "--num-class-images", "1", "--json"],
        env={"PERSONA_HOME": str(tmp_path / "home"), "PERSONA_VLM_BASE_URL": "", "PERSONA_TRAIN_DEVICE": "cpu"})
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout[result.stdout.index("{"):])
    assert list(data["seconds"]) == ["upload", "captions", "train", "export"]
    assert data["caption_case"] == 1 and data["steps"] == 2 and data["concept_id"].startswith("cpt_")
    assert data["batch_size"] == 1  # train's default on the built-in tiny, as the concept recorded it
    assert data["total_seconds"] == pytest.approx(sum(data["seconds"].values()))
    # the train stage split as the server measured it
    assert list(data["train_stage_seconds"]) == ["preparing", "waiting", "class_images", "training", "saving"]
    assert sum(data["train_stage_seconds"].values()) <= data["seconds"]["train"]
