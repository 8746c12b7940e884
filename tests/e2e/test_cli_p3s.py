"""`persona-cli train SUBJECT --method p3s` in the embedded default on the tiny models (PERSONA_MASK_CLIP_MODEL is
both the clicks' and the RNGR encoder's CLIP): refused while a photo has no mask, with the command that makes one;
then each photo clicked with `persona-cli mask --point` and the concept trained with --p3s-* options, drawn with
`persona-cli generate` (its schedule and photo set with --p3s-* flags) and refused by `persona-cli export`."""
from __future__ import annotations

from pathlib import Path

from test_cli import failed, ok, ok_json
from test_cli_train import Cli, photo_folder


def test_train_p3s_on_clicked_photos_from_the_cli(dreambench, tmp_path, monkeypatch, mask_models, model_cache):
    for name in ("PERSONA_SERVER", "PERSONA_API_KEY", "PERSONA_VLM_BASE_URL", "PERSONA_GENERATE_ENGINE"):
        monkeypatch.delenv(name, raising=False)
    for name, value in {"PERSONA_MODEL_CACHE": str(model_cache), "PERSONA_MASK_CLIP_MODEL": str(mask_models["clip"]),
                        "PERSONA_MASK_DEVICE": "cpu", "PERSONA_TRAIN_DEVICE": "cpu"}.items():
        monkeypatch.setenv(name, value)
    cli = Cli(tmp_path / "home")
    subject_id = ok_json(cli("subjects", "add", photo_folder(dreambench, tmp_path / "bruno", count=2), "--class",
                             "dog", "--json"))["subject_id"]
    train = ("train", subject_id, "--method", "p3s", "--base-model", "tiny", "--steps", "3", "--resolution", "32",
             "--captions", "class")
    refused = failed(cli(*train), "FAILED_PRECONDITION")
    assert f"persona-cli mask {subject_id} --image 0 --point X,Y" in refused

    for index in ("0", "1"):
        ok(cli("mask", subject_id, "--image", index, "--point", "300,300", "--negative", "20,20", "--out",
               str(tmp_path / "masks"), "--json"))
    # --lr 1e-3: the zero convs move off zero in 3 steps, so the condition visibly changes the drawing below.
    concept_id = ok(cli(*train, "--lr", "1e-3", "--p3s-weight-schedule", "constant", "--p3s-consistency-weight",
                        "0.5")).strip()
    concept = ok_json(cli("concepts", "show", concept_id, "--json"))
    assert concept["method"] == "p3s" and concept["state"] == "CONCEPT_STATE_READY"
    options = concept["options"]
    assert options["p3s_weight_schedule"] == "constant" and options["p3s_consistency_weight"] == 0.5
    assert options["p3s_injection_lambda"] == 0.2
    assert any(f["path"] == "p3s_condition.safetensors" for f in concept["files"])

    # Drawn in-process with the schedule the concept trained with, then with another set per call.
    shots = tmp_path / "shots"
    drawn = ok_json(cli("generate", concept_id, "a dog", "--steps", "2", "--seed", "3", "--out", shots, "--json"))
    redrawn = ok_json(cli("generate", concept_id, "a dog", "--steps", "2", "--seed", "3", "--p3s-weight-schedule",
                          "decreasing", "--p3s-weight-alpha", "0", "--p3s-weight-beta", "-1", "--p3s-reference", "1",
                          "--out", tmp_path / "off", "--json"))
    [image], [off] = drawn, redrawn
    assert image["width"] == 32 and image["engine"] == "embedded"
    png, off_png = (Path(i["path"]).read_bytes() for i in (image, off))
    assert png.startswith(b"\x89PNG") and png != off_png
    # p3s settings for a model that is not p3s: refused naming the flag's field.
    refused = failed(cli("generate", "--base-model", "tiny", "a dog", "--steps", "1", "--p3s-weight-k", "3"),
                     "INVALID_ARGUMENT")
    assert "`p3s_weight_k` is set" in refused
    # No export: what other tools can and cannot load.
    refused = failed(cli("export", concept_id, "--format", "diffusers", "--out", tmp_path / "export"),
                     "FAILED_PRECONDITION")
    assert "drawn only by persona's generate service" in refused
