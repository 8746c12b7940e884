"""The server factory every persona service runs in: health, reflection, interceptors, message
limits, and a graceful stop on SIGTERM."""
from __future__ import annotations

import logging
import signal
import threading
from concurrent import futures
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from . import model_loading
from .errors import Unavailable

log = logging.getLogger("persona.server")


@dataclass(frozen=True)
class ServiceRegistration:
    """One gRPC service to serve: its full name (for health and reflection) and how to add it."""

    name: str  # e.g. "persona.v1.SubjectService"
    add_to_server: Callable[[grpc.Server], None]


@dataclass
class RunningServer:
    server: grpc.Server
    port: int
    health: health.HealthServicer
    service_names: list[str] = field(default_factory=list)
    # Stops following model_loading (set by create_server: a broken loader turns health NOT_SERVING).
    forget_loading: Callable[[], None] = lambda: None

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def set_serving(self, serving: bool) -> None:
        """SERVING or NOT_SERVING on every name; never SERVING once this process cannot load models."""
        serving = serving and not model_loading.broken()
        status = health_pb2.HealthCheckResponse.SERVING if serving else health_pb2.HealthCheckResponse.NOT_SERVING
        for name in ("", *self.service_names):
            self.health.set(name, status)

    def stop(self, grace_s: float = 5.0) -> None:
        """Reports NOT_SERVING, lets in-flight calls finish for up to `grace_s`, then stops."""
        self.set_serving(False)
        self.forget_loading()
        self.server.stop(grace_s).wait()


def create_server(services: Sequence[ServiceRegistration], address: str, *,
                  interceptors: Sequence[grpc.ServerInterceptor], max_message_bytes: int,
                  workers: int = 32, unix_socket: Path | None = None) -> RunningServer:
    """Builds and starts a server on `address` ("127.0.0.1:0" picks a free port), and on `unix_socket` too when
    given (owner-only: what an embedded persona-cli offers a second persona-cli on its data dir).

    Health reports NOT_SERVING until the caller calls `set_serving(True)` once it is ready.
    """
    server = grpc.server(
        futures.ThreadPoolExecutor(max_workers=workers, thread_name_prefix="persona-rpc"),
        interceptors=list(interceptors),
        options=[
            ("grpc.max_receive_message_length", max_message_bytes),
            ("grpc.max_send_message_length", max_message_bytes),
            ("grpc.so_reuseport", 0),  # two servers on one port would split traffic silently
        ],
    )
    health_servicer = health.HealthServicer(experimental_non_blocking=True)
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    for service in services:
        service.add_to_server(server)
    names = [s.name for s in services]
    reflection.enable_server_reflection((*names, health.SERVICE_NAME, reflection.SERVICE_NAME), server)
    try:
        port = server.add_insecure_port(address)
    except RuntimeError:  # grpcio ≥ 1.60 raises instead of returning 0
        port = 0
    if port == 0:
        raise Unavailable(f"cannot listen on {address}: is another server using that port? Pick another --port")
    if unix_socket is not None:
        unix_socket.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        server.add_insecure_port(f"unix:{unix_socket}")  # a stale socket file is replaced
    running = RunningServer(server=server, port=port, health=health_servicer, service_names=names)
    running.set_serving(False)
    running.forget_loading = model_loading.on_broken(lambda reason: running.set_serving(False))
    server.start()
    if unix_socket is not None:
        unix_socket.chmod(0o600)  # this user only: the embedded server asks for no API key
    return running


def serve_until_signal(running: RunningServer, grace_s: float, on_stop: Callable[[], None] = lambda: None) -> None:
    """Blocks until SIGTERM or SIGINT, then stops gracefully and calls `on_stop`."""
    stop = threading.Event()

    def request_stop(signum, _frame):
        log.info("received %s: stopping (grace %.0fs)", signal.Signals(signum).name, grace_s)
        stop.set()

    previous = {s: signal.signal(s, request_stop) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        stop.wait()
        running.stop(grace_s)
        on_stop()
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
