"""The finetune-free flow from the CLI in the embedded default on the tiny models: `persona-cli encoder train` on
toy-world views, `persona-cli train SUBJECT --method customcontrast --encoder ENCODER` (no steps: a concept in one
pass, shown by `concepts show` with its encoder), `persona-cli generate` drawing it; --method customcontrast without
--encoder, and a training option with it, refused naming the field; `persona-cli export` refused."""
from __future__ import annotations

from test_cli import failed, ok, ok_json
from test_cli_train import Cli, photo_folder

from persona.bench.toyworld_views import write_multiview_dataset


def test_encoder_train_then_a_customcontrast_concept_then_generate(dreambench, tmp_path, monkeypatch, model_cache):
    for name in ("PERSONA_SERVER", "PERSONA_API_KEY", "PERSONA_VLM_BASE_URL", "PERSONA_GENERATE_ENGINE",
                 "PERSONA_BASE_MODEL"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("PERSONA_MODEL_CACHE", str(model_cache))
    monkeypatch.setenv("PERSONA_TRAIN_DEVICE", "cpu")
    cli = Cli(tmp_path / "home")
    views = write_multiview_dataset(tmp_path / "views", subjects=2, views=2, seed=0, size=64)
    encoder_id = ok_json(cli("encoder", "train", views, "--base-model", "tiny", "--steps", "2", "--lr", "1e-3",
                             "--json"))["encoder_id"]
    subject_id = ok_json(cli("subjects", "add", photo_folder(dreambench, tmp_path / "bruno", count=2), "--class",
                             "dog", "--json"))["subject_id"]

    refused = failed(cli("train", subject_id, "--method", "customcontrast"), "INVALID_ARGUMENT")
    assert "`encoder` is empty" in refused and "--encoder" in refused
    refused = failed(cli("train", subject_id, "--method", "customcontrast", "--encoder", encoder_id, "--steps", "5"),
                     "INVALID_ARGUMENT")
    assert "`steps` does not apply to method customcontrast" in refused

    result = cli("train", subject_id, "--method", "customcontrast", "--encoder", encoder_id)
    concept_id = ok(result).strip()
    assert f"from encoder {encoder_id} without fine-tuning" in result.stderr
    concept = ok_json(cli("concepts", "show", concept_id, "--json"))
    assert (concept["method"], concept["encoder"], concept["state"]) == ("customcontrast", encoder_id,
                                                                         "CONCEPT_STATE_READY")
    listed = ok(cli("concepts", "list"))
    assert concept_id in listed

    drawn = ok_json(cli("generate", concept_id, "a sks dog on the beach", "--steps", "2", "--seed", "3", "--out",
                        tmp_path / "shots", "--json"))
    assert len(drawn) == 1 and (tmp_path / "shots").is_dir()
    assert any(p.suffix == ".png" for p in (tmp_path / "shots").iterdir())

    refused = failed(cli("export", concept_id, "--format", "lora", "--out", tmp_path / "x.safetensors"),
                     "FAILED_PRECONDITION")
    assert "made with customcontrast" in refused
