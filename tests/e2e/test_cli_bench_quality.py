"""persona-cli bench quality end to end on the built-in `tiny` base (noise images, a few steps at 32 px: the
plumbing, not the figures): subjects and captions through the services, one concept per configuration and seed,
the table, JSON and the HTML report; bad flags refused naming them."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from test_cli import failed, ok, ok_json
from test_cli_train import Cli

RED_RING = Path(__file__).resolve().parents[2].parent / "shared" / "toyworld" / "references" / "red-ring"
QUICK = ("--base-model", "tiny", "--seeds", "2", "-n", "1", "--prompts", "1", "--steps", "2",
         "--num-class-images", "1", "--class-image-steps", "1", "--set", "resolution=32")


@pytest.fixture
def cli(tmp_path, monkeypatch):
    for name in ("PERSONA_SERVER", "PERSONA_API_KEY", "PERSONA_HOME", "PERSONA_VLM_BASE_URL", "PERSONA_BASE_MODEL"):
        monkeypatch.delenv(name, raising=False)
    return Cli(tmp_path / "home")


def test_bench_quality_trains_each_configuration_per_seed_and_reports(cli, tmp_path):
    report = tmp_path / "quality.html"
    data = ok_json(cli("--json", "bench", "quality", RED_RING, *QUICK, "--config", "case1", "--config", "sid+prior",
                       "--report", report))
    rows = {row["config"]: row for row in data["rows"]}
    assert list(rows) == ["lora case1", "lora sid+prior"]
    assert rows["lora sid+prior"]["regularizers"] == ["prior"] and rows["lora sid+prior"]["baseline"] == "lora case1"
    for row in rows.values():
        metrics = row["metrics"]
        assert set(metrics) == {"nearby_leakage", "background_leakage", "text_alignment", "subject_fidelity",
                                "nearby_object_leakage"}
        assert all(len(m["per_seed"]) == 2 and 0 <= m["mean"] <= 1 for m in metrics.values())
        assert set(row["per_reference"]) == {"red-ring"}
    assert data["options"] == {"steps": 2, "num_class_images": 1, "class_image_steps": 1, "resolution": 32}
    page = report.read_text()
    assert "lora sid+prior" in page and "nearby-object leakage" in page and page.count("<img") == 2 * 2
    assert "red-ring: a photo of a sks ring next to a small black circle" in page
    assert json.loads(report.with_suffix(".json").read_text())["rows"][0]["config"] == "lora case1"
    # The bench leaves no subject or concept behind.
    assert ok_json(cli("--json", "subjects", "list")) in ([], {"subjects": []})
    # --first-seed 1 runs seed 1 alone: the same concept and images as the second seed above, figure for figure.
    again = ok_json(cli("--json", "bench", "quality", RED_RING, *QUICK, "--seeds", "1", "--first-seed", "1",
                        "--config", "case1"))
    assert again["first_seed"] == 1
    assert again["rows"][0]["metrics"]["nearby_leakage"]["per_seed"] == pytest.approx(
        rows["lora case1"]["metrics"]["nearby_leakage"]["per_seed"][1:])
    table = ok(cli("bench", "quality", RED_RING, *QUICK, "--seeds", "1", "--config", "case1"))
    assert "NEARBY ÷ CASE1" in table and "lora case1" in table


def test_bench_quality_refuses_bad_flags_naming_them(cli, tmp_path):
    assert "`--config` 'prior+sid'" in failed(cli("bench", "quality", RED_RING, "--config", "prior+sid"),
                                              "INVALID_ARGUMENT")
    assert "`--config` 'sid+priors' has priors" in failed(cli("bench", "quality", RED_RING, "--config", "sid+priors"),
                                                          "INVALID_ARGUMENT")
    assert "`--set` 'lora_rank=big'" in failed(cli("bench", "quality", RED_RING, "--set", "lora_rank=big"),
                                               "INVALID_ARGUMENT")
    assert "`--set` 'colour=red'" in failed(cli("bench", "quality", RED_RING, "--set", "colour=red"),
                                            "INVALID_ARGUMENT")
    assert "has no scene.json" in failed(cli("bench", "quality", tmp_path), "INVALID_ARGUMENT")


def test_bench_quality_compares_customcontrast_encoders_with_no_fine_tuning(cli, tmp_path, model_cache, monkeypatch):
    """--encoder rows: each encoder makes its concepts from the set's photos (no training options, class captions),
    draws them on the same prompts and seeds, and the second's ratios are over the first's."""
    from persona.bench.toyworld_views import write_multiview_dataset

    monkeypatch.setenv("PERSONA_MODEL_CACHE", str(model_cache))
    views = write_multiview_dataset(tmp_path / "views", subjects=2, views=2, seed=0, size=64)
    full, ablated = (ok_json(cli("encoder", "train", views, "--base-model", "tiny", "--steps", "1", "--lr", "1e-3",
                                 *flags, "--json"))["encoder_id"] for flags in ((), ("--no-cscl", "--no-macl")))
    data = ok_json(cli("--json", "bench", "quality", RED_RING, "--base-model", "tiny", "--seeds", "2", "-n", "1",
                       "--prompts", "1", "--encoder", full, "--encoder", ablated))
    rows = {row["config"]: row for row in data["rows"]}
    assert list(rows) == [f"customcontrast {full}", f"customcontrast {ablated}"]  # --encoder alone: its rows only
    assert rows[f"customcontrast {ablated}"]["encoder"] == ablated
    assert rows[f"customcontrast {ablated}"]["baseline"] == f"customcontrast {full}"
    assert all(len(m["per_seed"]) == 2 for row in rows.values() for m in row["metrics"].values())
    assert ok_json(cli("--json", "subjects", "list")) in ([], {"subjects": []})
    assert "`encoder` 'enc_missing'" in failed(cli("bench", "quality", RED_RING, "--base-model", "tiny", "--seeds",
                                                   "1", "-n", "1", "--prompts", "1", "--encoder", "enc_missing"),
                                               "INVALID_ARGUMENT")
