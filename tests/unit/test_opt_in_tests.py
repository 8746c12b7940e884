"""The opt-in tests of tests/conftest.py: the Docker image proof is left out of the default run, reported as
deselected with its reason, and collected when PERSONA_TEST_IMAGES=1."""
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def pytest_run(*args: str, **env: str) -> subprocess.CompletedProcess:
    environ = {k: v for k, v in os.environ.items() if k != "PERSONA_TEST_IMAGES"}
    return subprocess.run([sys.executable, "-m", "pytest", "-p", "no:cacheprovider", *args], cwd=REPO,
                          env={**environ, **env}, capture_output=True, text=True, timeout=600)


def test_image_proof_is_deselected_by_default_with_its_reason():
    # --collect-only: without the opt-in in place this test must fail, not start the 10-minute proof
    run = pytest_run("tests/deploy/test_images.py", "--collect-only", "-q")
    assert run.returncode == 5, run.stdout + run.stderr  # 5: no test ran (none failed, none skipped)
    assert "3 deselected" in run.stdout
    assert "opt-in: 3 `images` test(s) deselected" in run.stdout
    assert "set PERSONA_TEST_IMAGES=1 to run them" in run.stdout
    assert "skipped" not in run.stdout


def test_image_proof_is_collected_when_opted_in():
    run = pytest_run("tests/deploy/test_images.py", "--collect-only", "-q", PERSONA_TEST_IMAGES="1")
    assert run.returncode == 0, run.stdout + run.stderr
    assert "3 tests collected" in run.stdout and "deselected" not in run.stdout
