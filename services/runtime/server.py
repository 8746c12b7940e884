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
from .interceptors import rebuilt_handler

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
    # The routed pools (PoolRoutingInterceptor), shut down with the server.
    executors: tuple = ()

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
        for executor in self.executors:
            executor.shutdown(wait=False)


# RPCs that answer from the metadata store at once, whatever else runs: health, reflection, Get…/List…, cancels and
# deletes. They have a thread pool of their own, so long calls and streams never make them wait (a busy pod's
# health probe must not time out).
QUICK_METHODS = ("Get", "List", "Cancel", "Delete", "Check", "SetCaption", "ServerReflectionInfo")
# Server streams that mostly wait (a job's events): a pool of their own, sized by how many may be open at once.
WAITING_METHODS = ("/persona.v1.JobService/WatchJob",)


def is_quick(method: str) -> bool:
    """Whether `method` ("/persona.v1.SubjectService/ListSubjects") is served from the quick pool."""
    return method.startswith("/grpc.") or method.rsplit("/", 1)[-1].startswith(QUICK_METHODS)


class PoolRoutingInterceptor(grpc.ServerInterceptor):
    """Outermost: runs each call on the pool of its kind (quick, waiting streams, or work), by grpc's per-handler
    `experimental_thread_pool`; the server's own pool is the quick one."""

    def __init__(self, waiting: futures.ThreadPoolExecutor, work: futures.ThreadPoolExecutor):
        self.waiting, self.work = waiting, work

    def intercept_service(self, continuation, handler_call_details):
        handler = continuation(handler_call_details)
        method = handler_call_details.method
        if handler is None or is_quick(method):
            return handler
        pool = self.waiting if method in WAITING_METHODS else self.work

        def routed(kind, behaviour):
            def call(*args):
                return behaviour(*args)

            call.experimental_thread_pool = pool
            return call

        return rebuilt_handler(handler, routed)


@dataclass(frozen=True)
class Pools:
    """Threads of a server: `quick` for health and cheap reads, `work` for everything long (generate, uploads,
    exports, masks, starts), `waiting` for WatchJob streams (each holds one while open)."""

    quick: int = 32
    work: int = 32
    waiting: int = 128


def create_server(services: Sequence[ServiceRegistration], address: str, *,
                  interceptors: Sequence[grpc.ServerInterceptor], max_message_bytes: int,
                  workers: int | Pools = Pools(), unix_socket: Path | None = None) -> RunningServer:
    """Builds and starts a server on `address` ("127.0.0.1:0" picks a free port), and on `unix_socket` too when
    given (owner-only: what an embedded persona-cli offers a second persona-cli on its data dir).

    Health reports NOT_SERVING until the caller calls `set_serving(True)` once it is ready.
    """
    pools = workers if isinstance(workers, Pools) else Pools(quick=workers)
    waiting = futures.ThreadPoolExecutor(max_workers=pools.waiting, thread_name_prefix="persona-watch")
    work = futures.ThreadPoolExecutor(max_workers=pools.work, thread_name_prefix="persona-work")
    server = grpc.server(
        futures.ThreadPoolExecutor(max_workers=pools.quick, thread_name_prefix="persona-rpc"),
        interceptors=[PoolRoutingInterceptor(waiting, work), *interceptors],
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
    running = RunningServer(server=server, port=port, health=health_servicer, service_names=names,
                            executors=(waiting, work))
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
