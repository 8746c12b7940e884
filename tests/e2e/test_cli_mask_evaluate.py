"""persona-cli mask and evaluate in the embedded default, on tiny random stand-ins of every model (pointed at by
PERSONA_MASK_* and PERSONA_EVAL_*): a photo folder → a LoRA → masks from a click and from the class name, each
with an overlay PNG → an evaluation report on own prompts, written as HTML, JSON and CSV."""
from __future__ import annotations

import json

from PIL import Image

from test_cli import failed, ok, ok_json
from test_cli_train import TINY, Cli, photo_folder


def test_mask_then_evaluate_from_the_cli(dreambench, tmp_path, monkeypatch, mask_models, eval_models, model_cache):
    for name in ("PERSONA_SERVER", "PERSONA_API_KEY", "PERSONA_VLM_BASE_URL", "PERSONA_GENERATE_ENGINE"):
        monkeypatch.delenv(name, raising=False)
    env = {"PERSONA_MODEL_CACHE": str(model_cache), "PERSONA_MASK_CLIP_MODEL": str(mask_models["clip"]),
           "PERSONA_MASK_CLIPSEG_MODEL": str(mask_models["clipseg"]),
           "PERSONA_MASK_DETECTOR_MODEL": str(mask_models["detector"]),
           "PERSONA_MASK_SEGMENTER_MODEL": str(mask_models["segmenter"]), "PERSONA_MASK_DEVICE": "cpu",
           "PERSONA_EVAL_CLIP_MODEL": str(eval_models["clip"]), "PERSONA_EVAL_DINO_MODEL": str(eval_models["dino"]),
           "PERSONA_EVAL_DEVICE": "cpu", "PERSONA_TRAIN_DEVICE": "cpu", "PERSONA_GENERATE_DEVICE": "cpu"}
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    cli = Cli(tmp_path / "home")
    photos = photo_folder(dreambench, tmp_path / "bruno", count=2)
    concept_id = ok(cli("train", photos, "--class", "dog", "--method", "lora", "--reg", "none", *TINY)).strip()
    subject_id = ok_json(cli("concepts", "show", concept_id, "--json"))["subject_id"]

    out = tmp_path / "masks"
    clicked = ok_json(cli("mask", subject_id, "--image", "1", "--point", "300,300", "--negative", "20,20",
                          "--out", out, "--json"))
    assert [m["method"] for m in clicked] == ["p3s-points"]
    mask = Image.open(clicked[0]["mask_path"])
    overlay = Image.open(clicked[0]["overlay_path"])
    assert mask.mode == "L" and mask.getpixel((300, 300)) == 255 and overlay.size == mask.size
    named = ok_json(cli("mask", subject_id, "--text", "dog", "--method", "clipseg", "--out", out, "--json"))
    assert [m["method"] for m in named] == ["clipseg", "clipseg"]  # every photo of the subject
    failed(cli("mask", subject_id, "--point", "300,300", "--text", "dog"), "INVALID_ARGUMENT")
    failed(cli("mask", subject_id, "--point", "9999,1"), "INVALID_ARGUMENT")

    prompts = tmp_path / "prompts.txt"
    prompts.write_text("# two prompts, one of each kind\na {} on the beach\nE: a red {}\n")
    report = tmp_path / "out" / "report.html"
    result = ok_json(cli("evaluate", concept_id, "--prompts", prompts, "-n", "1", "--steps", "2", "--report",
                         report, "--json"))
    assert {m["metric"] for m in result["metrics"]} >= {"clip_i", "sa", "nsd", "ta", "dino"}
    assert report.is_file() and "<svg" in report.read_text()
    assert json.loads(report.with_suffix(".json").read_text())["concepts"][0]["concept_id"] == concept_id
    assert report.with_suffix(".csv").read_text().startswith("concept_id,scope,prompt,kind,metric,value")
    failed(cli("evaluate", concept_id, "--prompts", tmp_path / "missing.txt"), "INVALID_ARGUMENT")
    failed(cli("evaluate", "cpt_nope", "--prompts", prompts), "NOT_FOUND")
