"""`persona-cli serve` as operators get it: its help documents the limits and queue sizes, and by default it draws
only allow-listed base models (no server path), while the embedded CLI still reads the user's own folders."""
from __future__ import annotations

from typer.testing import CliRunner

from test_cli_serve import one_error_line, persona_cli, served  # noqa: F401 (served is a fixture)

from persona.client.cli import app


def test_serve_help_documents_the_limits_and_model_paths():
    result = CliRunner().invoke(app, ["serve", "--help"], env={"COLUMNS": "400"})
    assert result.exit_code == 0
    for name in ("PERSONA_RPC_WORKERS", "PERSONA_GENERATE_CONCURRENCY", "PERSONA_GENERATE_QUEUE",
                 "PERSONA_GENERATE_MAX_PIXELS", "PERSONA_GENERATE_MAX_MEGAPIXEL_STEPS", "PERSONA_TRAIN_MAX_RESOLUTION",
                 "PERSONA_MAX_UPLOAD_PIXELS", "PERSONA_DECODE_BUDGET_PIXELS", "PERSONA_MAX_WATCH_STREAMS",
                 "--model-paths", "PERSONA_MODELS_ROOT", "PERSONA_ALLOWED_MODELS"):
        assert name in result.output, name


def test_serve_refuses_server_paths_alike_and_the_embedded_cli_reads_folders(served, tiny_model, tmp_path):
    key = persona_cli("keys", "create", "acme", "--data-dir", served.data_dir).stdout.strip()
    lines = set()
    for path in ("/etc", "/etc/passwd", "/nonexistent", str(tiny_model)):
        result = persona_cli("--server", served.address, "--api-key", key, "generate", "--base-model", path, "a dog",
                             "--steps", "1", "--out", tmp_path / "remote", check=False)
        lines.add(one_error_line(result, "INVALID_ARGUMENT"))
    assert len(lines) == 1 and "`base_model`" in lines.pop()  # one message: no file-system oracle
    # The embedded CLI is the user on their own files: a local folder is a base model.
    persona_cli("--data-dir", tmp_path / "home", "generate", "--base-model", tiny_model, "a dog",
                           "--steps", "1", "--width", "32", "--height", "32", "--out", tmp_path / "local")
    assert list((tmp_path / "local").glob("*.png"))
