"""Who is calling: the request id and tenant of the RPC being served, set by the interceptors."""
from __future__ import annotations

import contextvars
from dataclasses import dataclass

LOCAL_TENANT = "local"


@dataclass(frozen=True)
class CallInfo:
    request_id: str
    method: str
    tenant_id: str | None = None


_current: contextvars.ContextVar[CallInfo | None] = contextvars.ContextVar("persona_call", default=None)


def current_call() -> CallInfo:
    """The CallInfo of the RPC this thread serves; outside an RPC, the local tenant."""
    return _current.get() or CallInfo(request_id="-", method="-", tenant_id=LOCAL_TENANT)


def current_tenant() -> str:
    tenant = current_call().tenant_id
    if tenant is None:  # the auth interceptor always sets it; reaching here is a wiring bug
        raise RuntimeError("no tenant resolved for this call")
    return tenant


def set_call(info: CallInfo | None) -> CallInfo | None:
    """Sets the current CallInfo and returns the previous one (restore it when done)."""
    previous = _current.get()
    _current.set(info)
    return previous
