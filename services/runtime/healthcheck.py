"""A container health check: one grpc.health.v1 Check against a persona server.

    python -m persona.services.runtime.healthcheck [--address 127.0.0.1:50051] [--service NAME] [--timeout 3]

Exits 0 only when the server answers SERVING for `--service` ("" = the whole server, the default); otherwise
prints one line on stderr (unreachable, NOT_SERVING, unknown service, timeout…) and exits 1 (2 for bad
arguments). Never prints a stack trace, so `docker inspect` / `kubectl describe` show a readable reason.

It imports only grpcio and grpcio-health-checking (not persona's services), so a check stays cheap (~0.2 s)
even while the server is busy loading models. Defaults come from PERSONA_HEALTHCHECK_ADDRESS (else
127.0.0.1:PERSONA_PORT, else 127.0.0.1:50051).
"""
from __future__ import annotations

import argparse
import os
import sys

EXIT_OK = 0
EXIT_UNHEALTHY = 1
EXIT_USAGE = 2


def default_address() -> str:
    address = os.environ.get("PERSONA_HEALTHCHECK_ADDRESS", "").strip()
    if address:
        return address
    return f"127.0.0.1:{os.environ.get('PERSONA_PORT', '').strip() or '50051'}"


def check(address: str, service: str = "", timeout: float = 3.0, wait_for_ready: bool = False) -> tuple[bool, str]:
    """One Health.Check call: (serving, a one-line description). `wait_for_ready`: a server not listening yet is
    waited for (up to `timeout`) instead of being unreachable at once."""
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    what = f"service {service!r}" if service else "server"
    try:
        with grpc.insecure_channel(address) as channel:
            stub = health_pb2_grpc.HealthStub(channel)
            response = stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=timeout,
                                  wait_for_ready=wait_for_ready)
    except grpc.RpcError as error:
        code = error.code() if callable(getattr(error, "code", None)) else None
        details = (error.details() if callable(getattr(error, "details", None)) else "") or ""
        details = " ".join(details.split())[:300]
        if code == grpc.StatusCode.NOT_FOUND:
            return False, f"UNHEALTHY: {address} does not know {what} (NOT_FOUND)"
        if code == grpc.StatusCode.DEADLINE_EXCEEDED:
            return False, f"UNHEALTHY: no answer from {address} within {timeout:g}s"
        if code == grpc.StatusCode.UNAVAILABLE:
            return False, f"UNHEALTHY: cannot reach {address}: {details or 'unavailable'}"
        name = code.name if code is not None else "ERROR"
        return False, f"UNHEALTHY: health check of {address} failed: {name}: {details}".rstrip(": ")
    except Exception as error:  # bad address syntax and the like: still one line, no traceback
        return False, f"UNHEALTHY: health check of {address} failed: {type(error).__name__}: {error}"
    status = health_pb2.HealthCheckResponse.ServingStatus.Name(response.status)
    if response.status == health_pb2.HealthCheckResponse.SERVING:
        return True, f"SERVING: {what} at {address}"
    return False, f"UNHEALTHY: {what} at {address} is {status}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m persona.services.runtime.healthcheck",
        description="Exit 0 when the persona server's gRPC health service reports SERVING, else 1 with one line.")
    parser.add_argument("--address", default=default_address(),
                        help="HOST:PORT of the server (default: %(default)s)")
    parser.add_argument("--service", default="",
                        help='service name to check, e.g. persona.v1.SubjectService; "" = the whole server')
    parser.add_argument("--timeout", type=float, default=3.0, help="seconds to wait for the answer (default 3)")
    parser.add_argument("--quiet", "-q", action="store_true", help="print nothing when SERVING")
    args = parser.parse_args(argv)
    if args.timeout <= 0:
        parser.error("--timeout must be > 0")
    try:
        serving, message = check(args.address, args.service, args.timeout)
    except KeyboardInterrupt:
        return EXIT_UNHEALTHY
    except Exception as error:  # e.g. grpcio missing: one line, never a traceback
        serving, message = False, f"UNHEALTHY: {type(error).__name__}: {error}"
    if serving:
        if not args.quiet:
            print(message)
        return EXIT_OK
    print(message, file=sys.stderr)
    return EXIT_UNHEALTHY


if __name__ == "__main__":
    sys.exit(main())
