"""`python -m persona.services.runtime.healthcheck`: the images' HEALTHCHECK, against a real persona server."""
import socket
import subprocess
import sys

from persona.services.runtime import healthcheck


def run_check(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "persona.services.runtime.healthcheck", *args],
                          capture_output=True, text=True, timeout=60)


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_serving_server_exits_0(start_app):
    app = start_app(auth="api-key")  # health stays public with API keys on
    result = run_check("--address", app.address, "--timeout", "5")
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == f"SERVING: server at {app.address}"
    assert result.stderr == ""

    named = run_check("--address", app.address, "--service", "persona.v1.SubjectService", "--quiet")
    assert named.returncode == 0, named.stderr
    assert named.stdout == ""


def test_unknown_service_and_not_serving(start_app):
    app = start_app()
    unknown = run_check("--address", app.address, "--service", "persona.v1.NoSuchService")
    assert unknown.returncode == 1
    assert unknown.stderr.strip() == (
        f"UNHEALTHY: {app.address} does not know service 'persona.v1.NoSuchService' (NOT_FOUND)")

    app.server.set_serving(False)  # what a graceful stop reports first
    result = run_check("--address", app.address)
    assert result.returncode == 1
    assert result.stderr.strip() == f"UNHEALTHY: server at {app.address} is NOT_SERVING"
    app.server.set_serving(True)
    assert healthcheck.check(app.address) == (True, f"SERVING: server at {app.address}")

def test_unreachable_address_fails_with_one_line():
    address = f"127.0.0.1:{closed_port()}"
    result = run_check("--address", address, "--timeout", "2")
    assert result.returncode == 1
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith(f"UNHEALTHY: cannot reach {address}")
    assert "Traceback" not in result.stderr and result.stdout == ""


def test_bad_arguments_and_defaults(monkeypatch):
    assert run_check("--timeout", "0").returncode == 2
    monkeypatch.delenv("PERSONA_HEALTHCHECK_ADDRESS", raising=False)
    monkeypatch.setenv("PERSONA_PORT", "6123")
    assert healthcheck.default_address() == "127.0.0.1:6123"
    monkeypatch.setenv("PERSONA_HEALTHCHECK_ADDRESS", "persona:50051")
    assert healthcheck.default_address() == "persona:50051"
    serving, message = healthcheck.check("not a valid address:::", timeout=1)
    assert not serving and message.startswith("UNHEALTHY:") and "\n" not in message
