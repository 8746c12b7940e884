"""`persona-cli up --detach`, `status` and `down`: persona (every service, one process, one port) and its
tritonserver run in the background, recorded in <data dir>/run/up.json, health-checked and stopped together."""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import typer

from persona.services.runtime.settings import env_float

from ..output import EXIT_FAILED, fail, fields, note, print_json, table
from .session import DataDirOption, JsonOption, session


# How long `up --detach` waits for persona and Triton to serve before giving up (model loads can be slow).
UP_TIMEOUT_S = env_float("PERSONA_UP_TIMEOUT_S", 300.0)
# Health checks of `status` and `up --detach`.
HEALTH_TIMEOUT_S = 2.0
# How long `down` waits for Triton after SIGTERM before killing its process group.
TRITON_STOP_S = 10.0


def up_state_path(data_dir: Path) -> Path:
    return data_dir / "run" / "up.json"


def write_up_state(data_dir: Path, address: str, endpoint) -> Path:
    """Writes run/up.json (temp file + rename: a reader never sees half of it); returns its path."""
    server = getattr(endpoint, "server", None)  # ManagedTriton: the tritonserver this process started
    triton = None
    if endpoint is not None:
        triton = {"pid": server.pid if server else None,
                  "grpc_url": server.grpc_url if server else endpoint.url,
                  "log": str(server.log_file) if server and server.log_file else None}
    state = {"persona": {"pid": os.getpid(), "address": address, "log": str(data_dir / "logs" / "persona.log")},
             "triton": triton, "started_at": datetime.now(timezone.utc).isoformat(timespec="seconds")}
    path = up_state_path(data_dir)
    path.parent.mkdir(parents=True, exist_ok=True)
    temp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    temp.write_text(json.dumps(state, indent=2) + "\n")
    os.replace(temp, path)
    return path


def read_up_state(data_dir: Path) -> dict | None:
    path = up_state_path(data_dir)
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except ValueError as e:
        fail("FAILED_PRECONDITION", f"{path} is not valid JSON ({e}): remove it if no persona runs")


def process_running(pid: int | None, marker: str) -> bool:
    """Whether `pid` runs (not a zombie) and its command line holds `marker` (a reused pid does not count)."""
    if not pid:
        return False
    proc = Path(f"/proc/{pid}")
    if Path("/proc/self").exists():  # Linux: the state and command line tell a zombie or a reused pid apart
        try:
            stat = (proc / "stat").read_text()
            cmdline = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            return False
        return stat.rsplit(")", 1)[1].split()[0] != "Z" and marker in cmdline
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def connect_address(address: str) -> str:
    """The address to call a server listening on `address` (0.0.0.0 or [::] mean this machine)."""
    host, port = address.rsplit(":", 1)
    return f"127.0.0.1:{port}" if host in ("0.0.0.0", "[::]", "") else address


def persona_serving(address: str, wait: bool = False) -> bool:
    from persona.services.runtime.healthcheck import check

    return check(connect_address(address), timeout=HEALTH_TIMEOUT_S, wait_for_ready=wait)[0]


def triton_serving(url: str) -> bool:
    import tritonclient.grpc as grpcclient
    from tritonclient.utils import InferenceServerException

    try:
        client = grpcclient.InferenceServerClient(url)
    except InferenceServerException:
        return False
    try:
        return bool(client.is_server_ready(client_timeout=HEALTH_TIMEOUT_S))
    except InferenceServerException:
        return False
    finally:
        client.close()


def pick_free_port(host: str) -> int:
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as s:
        s.bind((host if host not in ("0.0.0.0", "::") else "", 0))
        return s.getsockname()[1]


def log_tail(path: Path, limit: int = 3000) -> str:
    try:
        return path.read_text(errors="replace")[-limit:]
    except OSError:
        return ""


def up_detached(ctx: typer.Context, host: str, port: int, data_dir, auth: str, triton_url: str,
                log_level: str) -> None:
    """Starts the foreground `up` as a detached child (own session, log file), waits until it serves and its
    state file names both processes, then prints the endpoints."""
    home = session(ctx).settings(data_dir).data_dir
    state = read_up_state(home)
    if state and process_running(state["persona"]["pid"], "persona"):
        fail("ALREADY_EXISTS", f"persona is already up on {state['persona']['address']} (pid "
                               f"{state['persona']['pid']}): see `persona-cli status`, stop it with `persona-cli down`")
    up_state_path(home).unlink(missing_ok=True)  # left by a persona that was killed
    port = port or pick_free_port(host)  # chosen here so the address is known before the child listens
    log_file = home / "logs" / "persona.log"
    log_file.parent.mkdir(parents=True, exist_ok=True)
    command = [sys.executable, "-m", "persona.client.cli", "--data-dir", str(home), "up", "--host", host,
               "--port", str(port), "--auth", auth, "--log-level", log_level]
    if triton_url:
        command += ["--triton-url", triton_url]
    with log_file.open("ab") as log:
        child = subprocess.Popen(command, start_new_session=True, stdin=subprocess.DEVNULL, stdout=log,
                                 stderr=subprocess.STDOUT)
    address = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    deadline = time.monotonic() + UP_TIMEOUT_S
    while True:
        code = child.poll()
        if code is not None:
            fail("UNAVAILABLE", f"persona-cli up exited with code {code} while starting (log {log_file}): "
                                f"{log_tail(log_file)}")
        state = read_up_state(home)
        if state and state["persona"]["pid"] == child.pid and persona_serving(address, wait=True):
            break
        if time.monotonic() > deadline:
            fail("DEADLINE_EXCEEDED", f"persona (pid {child.pid}) is not serving after {UP_TIMEOUT_S:.0f}s "
                                      f"(PERSONA_UP_TIMEOUT_S); it keeps starting: check `persona-cli status`, "
                                      f"or stop it with `persona-cli down` (log {log_file}): {log_tail(log_file)}")
        time.sleep(0.2)
    triton = state["triton"] or {}
    session(ctx).output().emit(state, lambda: fields([
        ("persona", f"{state['persona']['address']}  (gRPC, pid {child.pid})"),
        ("triton", f"{triton.get('grpc_url')}  (gRPC, pid {triton.get('pid')})"),
        ("logs", f"{log_file}  {triton.get('log') or ''}"),
    ]))
    note(f"persona is up: `persona-cli --server {connect_address(address)} subjects list`; "
         f"`persona-cli status`, `persona-cli down` (with --data-dir {home})")


def check_up(state: dict) -> dict:
    """Each process of the state file with its state: serving, not serving (running, health says no) or down."""
    persona, triton = state["persona"], state.get("triton")
    rows = {}
    alive = process_running(persona["pid"], "persona")
    rows["persona"] = {**persona, "state": "down" if not alive else
                       "serving" if persona_serving(persona["address"]) else "not serving"}
    if triton:
        # An external Triton (--triton-url) has no pid here: its health alone tells.
        alive = triton["pid"] is None or process_running(triton["pid"], "tritonserver")
        rows["triton"] = {**triton, "address": triton["grpc_url"], "state": "down" if not alive else
                          "serving" if triton_serving(triton["grpc_url"]) else "not serving"}
    return rows


def status(
    ctx: typer.Context,
    data_dir: DataDirOption = None,
    as_json: JsonOption = False,
) -> None:
    """Show the processes `persona-cli up --detach` started on the data dir (persona, tritonserver): pid, address
    and state (serving, not serving, down) from each one's health check.

    Exit status 0 when every process serves, 1 otherwise, so scripts can wait on it.

    Example: `persona-cli status --json`
    """
    home = session(ctx).settings(data_dir).data_dir
    state = read_up_state(home)
    if state is None:
        fail("UNAVAILABLE", f"persona is not up on {home}: start it with `persona-cli up --detach`")
    rows = check_up(state)
    serving = all(r["state"] == "serving" for r in rows.values())
    session(ctx).output(as_json).emit(
        {"processes": rows, "started_at": state.get("started_at"), "serving": serving},
        lambda: table(["PROCESS", "PID", "ADDRESS", "STATE"],
                      [[name, r["pid"] or "-", r["address"], r["state"]] for name, r in rows.items()]))
    if not serving:
        raise typer.Exit(EXIT_FAILED)


def wait_gone(pid: int, marker: str, timeout_s: float) -> bool:
    deadline = time.monotonic() + timeout_s
    while process_running(pid, marker):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.1)
    return True


def signal_process(pid: int, signum: int, group: bool = False) -> None:
    try:
        (os.killpg if group else os.kill)(pid, signum)
    except (ProcessLookupError, PermissionError):
        pass


def down(
    ctx: typer.Context,
    data_dir: DataDirOption = None,
    as_json: JsonOption = False,
) -> None:
    """Stop what `persona-cli up --detach` started on the data dir: SIGTERM to persona (calls in flight finish,
    running jobs resume on the next start; it stops its tritonserver), then make sure tritonserver is gone
    (SIGTERM, SIGKILL to its process group after a timeout). Nothing up: says so, exit 0.

    Example: `persona-cli down --data-dir /srv/persona`
    """
    settings = session(ctx).settings(data_dir)
    state = read_up_state(settings.data_dir)
    if state is None:
        note(f"persona is not up on {settings.data_dir}: nothing to stop")
        if session(ctx).as_json or as_json:
            print_json({"stopped": []})
        return
    stopped = []
    persona, triton = state["persona"], state.get("triton") or {}
    triton_was_running = process_running(triton.get("pid"), "tritonserver")
    if process_running(persona["pid"], "persona"):
        signal_process(persona["pid"], signal.SIGTERM)
        # Its gRPC grace period, then its jobs' (each up to the grace period), then its tritonserver's stop.
        how = "stopped"
        if not wait_gone(persona["pid"], "persona", 2 * settings.grace_period_s + TRITON_STOP_S + 10):
            signal_process(persona["pid"], signal.SIGKILL)
            wait_gone(persona["pid"], "persona", 10)
            how = "killed (SIGTERM timed out)"
        stopped.append({"process": "persona", "pid": persona["pid"], "how": how})
    if triton.get("pid") and process_running(triton["pid"], "tritonserver"):
        signal_process(triton["pid"], signal.SIGTERM)
        how = "stopped"
        if not wait_gone(triton["pid"], "tritonserver", TRITON_STOP_S):
            how = "killed (SIGTERM timed out)"
        # Its own session: the group id is its pid; python backend stubs go with it.
        signal_process(triton["pid"], signal.SIGKILL, group=True)
        wait_gone(triton["pid"], "tritonserver", 10)
        stopped.append({"process": "triton", "pid": triton["pid"], "how": how})
    elif triton_was_running:
        stopped.append({"process": "triton", "pid": triton["pid"], "how": "stopped by persona"})
    up_state_path(settings.data_dir).unlink(missing_ok=True)
    session(ctx).output(as_json).emit(
        {"stopped": stopped},
        lambda: "\n".join(f"{s['process']} (pid {s['pid']}): {s['how']}" for s in stopped)
        or "persona had already stopped")
