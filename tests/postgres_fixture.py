"""A throwaway PostgreSQL server for tests: initdb in a temp folder, started on a free port, removed at the end.

Fixtures: `postgres_server` (session: the running server), `postgres_dsn` (a fresh, empty database per test,
as a `postgresql://` URL with a password). Needs the PostgreSQL server binaries (initdb, pg_ctl); without them
the fixtures FAIL, saying how to install them, instead of skipping. As root the server runs as the `postgres`
system user (postgres refuses to run as root).

Use it from a test module with `postgres_dsn = postgres_fixture.postgres_dsn` (and `postgres_server` likewise),
or load it for every test with `pytest_plugins = [..., "postgres_fixture"]` in tests/conftest.py.
"""
from __future__ import annotations

import glob
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
import uuid
from dataclasses import dataclass
from pathlib import Path

import pytest

USER = "persona"
PASSWORD = "s3cret-pw"  # tests check that errors never print it
INSTALL_HINT = ("install the PostgreSQL server with `apt-get install -y postgresql` (Debian/Ubuntu; the binaries land "
                "in /usr/lib/postgresql/<version>/bin), or set PERSONA_PG_BIN to the folder holding initdb and pg_ctl")


@dataclass(frozen=True)
class PostgresServer:
    host: str
    port: int
    user: str
    password: str
    root: Path

    def dsn(self, database: str = "postgres", password: str | None = None) -> str:
        return f"postgresql://{self.user}:{self.password if password is None else password}@{self.host}:{self.port}/{database}"

    def create_database(self, name: str | None = None) -> str:
        """Creates an empty database; returns its DSN."""
        import psycopg

        name = name or f"t_{uuid.uuid4().hex[:12]}"
        with psycopg.connect(self.dsn(), autocommit=True) as conn:
            conn.execute(f'CREATE DATABASE "{name}"')
        return self.dsn(name)


def _bin_dir() -> Path:
    candidates = [os.environ.get("PERSONA_PG_BIN", "")]
    candidates += sorted(glob.glob("/usr/lib/postgresql/*/bin"), key=lambda p: int(p.split("/")[-2]), reverse=True)
    on_path = shutil.which("initdb")
    candidates += [str(Path(on_path).parent)] if on_path else []
    for candidate in candidates:
        if candidate and (Path(candidate) / "initdb").exists() and (Path(candidate) / "pg_ctl").exists():
            return Path(candidate)
    pytest.fail(f"PostgreSQL server binaries (initdb, pg_ctl) not found: {INSTALL_HINT}", pytrace=False)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run_as(user: str | None, argv: list[str], **kwargs) -> subprocess.CompletedProcess:
    if user is not None:
        argv = ["runuser", "-u", user, "--", *argv]
    result = subprocess.run(argv, capture_output=True, text=True, **kwargs)
    if result.returncode:
        pytest.fail(f"{' '.join(argv)} failed ({result.returncode}):\n{result.stdout}\n{result.stderr}", pytrace=False)
    return result


@pytest.fixture(scope="session")
def postgres_server():
    bin_dir = _bin_dir()
    run_user = None
    if os.geteuid() == 0:  # postgres refuses to run as root
        try:
            owner = pwd.getpwnam("postgres")
        except KeyError:
            pytest.fail(f"running as root and there is no `postgres` user to run the test server as: {INSTALL_HINT}",
                        pytrace=False)
        run_user = "postgres"
    # Short path under /tmp: unix socket paths are limited to ~107 bytes.
    root = Path(tempfile.mkdtemp(prefix="persona-pg-"))
    data, sockets = root / "data", root / "sockets"
    sockets.mkdir()
    pwfile = root / "pwfile"
    pwfile.write_text(PASSWORD + "\n")
    if run_user is not None:
        for path in (root, sockets, pwfile):
            os.chown(path, owner.pw_uid, owner.pw_gid)
    port = _free_port()
    _run_as(run_user, [str(bin_dir / "initdb"), "-D", str(data), "-U", USER, f"--pwfile={pwfile}",
                       "--auth-local=trust", "--auth-host=scram-sha-256", "-E", "UTF8", "--locale=C.UTF-8",
                       "--no-sync", "--no-instructions"])
    options = (f"-p {port} -k {sockets} -c listen_addresses=127.0.0.1 -c fsync=off -c synchronous_commit=off"
               " -c full_page_writes=off -c max_connections=200")
    _run_as(run_user, [str(bin_dir / "pg_ctl"), "-D", str(data), "-o", options, "-l", str(root / "server.log"),
                       "-w", "-t", "60", "start"])
    try:
        yield PostgresServer(host="127.0.0.1", port=port, user=USER, password=PASSWORD, root=root)
    finally:
        subprocess.run((["runuser", "-u", run_user, "--"] if run_user else [])
                       + [str(bin_dir / "pg_ctl"), "-D", str(data), "-m", "immediate", "-w", "stop"],
                       capture_output=True)
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture
def postgres_dsn(postgres_server) -> str:
    """A new empty database on the session's server, as a postgresql:// URL (user, password, 127.0.0.1, port)."""
    return postgres_server.create_database()
