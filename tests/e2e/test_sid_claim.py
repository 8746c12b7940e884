"""The product's main claim, on the toy world (../shared/toyworld): SID captions with prior preservation leak less
of the photos' background into a learned subject than class-only (Case 1) captions. One shared subject (red-ring:
its 4 photos all on the same green-and-yellow stripes), DreamBooth through the real services, `persona-cli bench
quality` as a user runs it. The settings are the shortest at which the effect held on every seed measured
(notes/quality-18.md, sections 7–9): all 4 photos and 4 class images per step (`batch_size` 4, train's default
since then, so the test guards it), 400 steps at lr 1e-4 (the toy base's; real bases keep DreamBooth's 5e-6); at
100–200 steps, or 1 photo per step, the two captions leak alike. These exact settings, seed 0: Case 1 +
prior 0.338 of the frame, SID + prior 0.021 (seeds 1 and 2 in the note); MARGIN asks for 2x where 16x was measured.
About 7 minutes on 2 CPU cores: the product's main claim is worth them."""
from __future__ import annotations

from pathlib import Path

import pytest

from test_cli import ok_json
from test_cli_train import Cli

TOYWORLD = Path(__file__).resolve().parents[2].parent / "shared" / "toyworld"
# Batch (4) and class-image steps (30) are train's defaults on this base, left to them on purpose.
SETTINGS = ("--method", "dreambooth", "--seeds", "1", "--steps", "400", "--lr", "1e-4", "--num-class-images", "16",
            "-n", "8", "--prompts", "1")
# Case 1's background fills at least this much of the frame (else there is no leak to reduce and the test proves
# nothing); SID + prior at most MARGIN of Case 1's.
CASE1_LEAKS_AT_LEAST = 0.05
MARGIN = 0.5


@pytest.fixture
def cli(tmp_path, monkeypatch):
    for name in ("PERSONA_SERVER", "PERSONA_API_KEY", "PERSONA_HOME", "PERSONA_VLM_BASE_URL", "PERSONA_BASE_MODEL"):
        monkeypatch.delenv(name, raising=False)
    return Cli(tmp_path / "home")


def test_sid_with_prior_leaks_less_background_than_class_only_captions(cli):
    data = ok_json(cli("--json", "bench", "quality", TOYWORLD / "references" / "red-ring", "--base-model",
                       TOYWORLD / "base", "--config", "case1+prior", "--config", "sid+prior", *SETTINGS))
    rows = {row["config"]: row["metrics"] for row in data["rows"]}
    case1 = rows["dreambooth case1+prior"]["background_leakage"]["mean"]
    sid = rows["dreambooth sid+prior"]["background_leakage"]["mean"]
    assert case1 >= CASE1_LEAKS_AT_LEAST, f"Case 1 leaked only {case1:.3f} of the frame: the test lost its power"
    assert sid <= MARGIN * case1, f"SID + prior leaked {sid:.3f} of the frame, Case 1 + prior {case1:.3f}"
