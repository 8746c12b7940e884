"""`persona-cli train SUBJECT --method p3s` in the embedded default on the tiny models (PERSONA_MASK_CLIP_MODEL is
both the clicks' and the RNGR encoder's CLIP): refused while a photo has no mask, with the command that makes one;
then each photo clicked with `persona-cli mask --point` and the concept trained with --p3s-* options."""
from __future__ import annotations

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
    concept_id = ok(cli(*train, "--p3s-weight-schedule", "constant", "--p3s-consistency-weight", "0.5")).strip()
    concept = ok_json(cli("concepts", "show", concept_id, "--json"))
    assert concept["method"] == "p3s" and concept["state"] == "CONCEPT_STATE_READY"
    options = concept["options"]
    assert options["p3s_weight_schedule"] == "constant" and options["p3s_consistency_weight"] == 0.5
    assert options["p3s_injection_lambda"] == 0.2
    assert any(f["path"] == "p3s_condition.safetensors" for f in concept["files"])
