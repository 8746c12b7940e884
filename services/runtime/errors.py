"""Domain errors: each carries the gRPC status it maps to, by name, so domain code never imports grpc.

Messages name the field in backticks and say how to fix it, e.g.
"`class_name` is empty: pass --class, e.g. --class dog".
"""
from __future__ import annotations


class PersonaError(Exception):
    """Base of every error a client may see; `code` is a grpc.StatusCode name."""

    code = "INTERNAL"

    def __init__(self, message: str):
        super().__init__(message)
        self.message = message


class InvalidArgument(PersonaError):
    code = "INVALID_ARGUMENT"


class NotFound(PersonaError):
    code = "NOT_FOUND"


class FailedPrecondition(PersonaError):
    code = "FAILED_PRECONDITION"


class InvalidSetting(FailedPrecondition):
    """A setting (a PERSONA_* variable, a settings field, a generated config's parameter) holds a value persona
    cannot use: the request is fine, the deployment is not. The message names the setting, the value and a good
    one."""


class ResourceExhausted(PersonaError):
    code = "RESOURCE_EXHAUSTED"
    # Seconds a client should wait before trying again (sent as grpc-retry-pushback-ms); None: no advice.
    retry_after_s: float | None = None


class Unavailable(PersonaError):
    code = "UNAVAILABLE"


class Unauthenticated(PersonaError):
    code = "UNAUTHENTICATED"


class Cancelled(PersonaError):
    """Raised inside a job when its cancellation was requested."""

    code = "CANCELLED"


class DeadlineExceeded(PersonaError):
    code = "DEADLINE_EXCEEDED"
