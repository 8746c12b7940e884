"""Server interceptors: request id, access log, error mapping, auth, request limits and request checks, in that
order (outermost first).

Each interceptor wraps the method handler's behaviour in a scope (a context manager) that is
entered for the whole call, streaming responses included.
"""
from __future__ import annotations

import contextlib
import logging
import time
import uuid
from typing import Callable, ContextManager

import grpc

from .auth import ApiKeyAuthenticator
from .context import CallInfo, current_call, set_call
from .errors import InvalidArgument, PersonaError
from .limits import bounded_message, check_ids
from .validation import check_finite

access_log = logging.getLogger("persona.access")
log = logging.getLogger("persona.errors")

# RPCs that answer without a tenant: load balancers and grpcurl must reach them keyless.
PUBLIC_SERVICES = ("/grpc.health.v1.Health/", "/grpc.reflection.v1alpha.ServerReflection/",
                   "/grpc.reflection.v1.ServerReflection/")

Scope = Callable[[grpc.HandlerCallDetails, grpc.ServicerContext], ContextManager[None]]


_MAKERS = {"unary_unary": grpc.unary_unary_rpc_method_handler, "unary_stream": grpc.unary_stream_rpc_method_handler,
           "stream_unary": grpc.stream_unary_rpc_method_handler,
           "stream_stream": grpc.stream_stream_rpc_method_handler}


def rebuilt_handler(handler: grpc.RpcMethodHandler, wrap: Callable[[str, Callable], Callable],
                    request_deserializer: Callable | None = None) -> grpc.RpcMethodHandler:
    """`handler` with its behaviour replaced by `wrap(kind, behaviour)` (kind: "unary_stream", …) and, when given,
    its request deserializer."""
    for kind, make in _MAKERS.items():
        behaviour = getattr(handler, kind)
        if behaviour is not None:
            return make(wrap(kind, behaviour), request_deserializer=request_deserializer or handler.request_deserializer,
                        response_serializer=handler.response_serializer)
    return handler


def _wrap(handler: grpc.RpcMethodHandler, details: grpc.HandlerCallDetails, scope: Scope) -> grpc.RpcMethodHandler:
    """A handler like `handler` whose behaviour runs inside `scope(details, context)`."""

    def unary(behaviour):
        def call(request_or_iterator, context):
            with scope(details, context):
                return behaviour(request_or_iterator, context)
        return call

    def streaming(behaviour):
        def call(request_or_iterator, context):
            with scope(details, context):
                yield from behaviour(request_or_iterator, context)
        return call

    return rebuilt_handler(handler, lambda kind, b: streaming(b) if kind.endswith("_stream") else unary(b))


class ScopedInterceptor(grpc.ServerInterceptor):
    """Base: subclasses implement `scope`, entered around every call."""

    def scope(self, details: grpc.HandlerCallDetails, context: grpc.ServicerContext) -> ContextManager[None]:
        raise NotImplementedError

    def intercept_service(self, continuation, handler_call_details):
        handler = continuation(handler_call_details)
        if handler is None:
            return None
        return _wrap(handler, handler_call_details, self.scope)


def _metadata(details: grpc.HandlerCallDetails) -> dict[str, str]:
    return {k: v for k, v in (details.invocation_metadata or ()) if isinstance(v, str)}


class RequestIdInterceptor(ScopedInterceptor):
    """Takes the client's `x-request-id` or makes one, and sends it back as trailing metadata.

    Not as initial metadata: a client commits a call once headers arrive, so an early header would stop grpc's
    retry policy from retrying a RESOURCE_EXHAUSTED or UNAVAILABLE answer."""

    @contextlib.contextmanager
    def scope(self, details, context):
        request_id = _metadata(details).get("x-request-id") or uuid.uuid4().hex[:16]
        context.set_trailing_metadata((("x-request-id", request_id),))
        previous = set_call(CallInfo(request_id=request_id, method=details.method))
        try:
            yield
        finally:
            set_call(previous)


class AccessLogInterceptor(ScopedInterceptor):
    """One log line per call: method, status, duration, request id, tenant."""

    @contextlib.contextmanager
    def scope(self, details, context):
        started = time.perf_counter()
        try:
            yield
        finally:
            code = context.code() if hasattr(context, "code") else None
            call = current_call()
            access_log.info("%s %s %.1fms request_id=%s tenant=%s", details.method,
                            getattr(code, "name", None) or "OK", (time.perf_counter() - started) * 1e3,
                            call.request_id, call.tenant_id or "-")


class ErrorMappingInterceptor(ScopedInterceptor):
    """Domain errors → their status code and message; anything else → INTERNAL with the request id.

    The stack trace of an unexpected error goes to the log only, never to the client.
    """

    @contextlib.contextmanager
    def scope(self, details, context):
        try:
            yield
        except PersonaError as e:
            retry_after_s = getattr(e, "retry_after_s", None)
            if retry_after_s is not None:  # grpc's client retry policy waits this long before its next attempt
                context.set_trailing_metadata((("x-request-id", current_call().request_id),
                                               ("grpc-retry-pushback-ms", str(int(retry_after_s * 1000)))))
            context.abort(getattr(grpc.StatusCode, e.code, grpc.StatusCode.UNKNOWN), bounded_message(e.message))
        except Exception:
            request_id = current_call().request_id
            log.exception("unexpected error in %s request_id=%s", details.method, request_id)
            context.abort(grpc.StatusCode.INTERNAL,
                          f"internal error (request_id={request_id}); the server log has the details")


class RequestLimitsInterceptor(grpc.ServerInterceptor):
    """Refuses a request whose ids are longer than an id can be (limits.check_ids), before the servicer sees it."""

    def intercept_service(self, continuation, handler_call_details):
        handler = continuation(handler_call_details)
        if handler is None or handler.request_streaming:
            return handler

        def checked(behaviour):
            def call(request, context):
                check_ids(request)
                return behaviour(request, context)
            return call

        if handler.unary_unary is not None:
            return grpc.unary_unary_rpc_method_handler(checked(handler.unary_unary), handler.request_deserializer,
                                                       handler.response_serializer)
        return grpc.unary_stream_rpc_method_handler(checked(handler.unary_stream), handler.request_deserializer,
                                                    handler.response_serializer)


class AuthInterceptor(ScopedInterceptor):
    """Resolves the caller's tenant from `authorization: Bearer <key>` (or the local tenant)."""

    def __init__(self, authenticator: ApiKeyAuthenticator):
        self.authenticator = authenticator

    @contextlib.contextmanager
    def scope(self, details, context):
        if details.method.startswith(PUBLIC_SERVICES):
            yield
            return
        tenant = self.authenticator.tenant_for(_metadata(details).get("authorization"))
        call = current_call()
        # Not restored here: RequestIdInterceptor restores the outer CallInfo, after the access log
        # has recorded the tenant.
        set_call(CallInfo(request_id=call.request_id, method=call.method, tenant_id=tenant))
        yield


class _Undecodable:
    """Stands for a request body that is not a valid message, so the RPC can answer INVALID_ARGUMENT after auth
    (grpc's own answer to a deserializer's exception is INTERNAL, before any interceptor runs)."""

    def __init__(self, error: Exception):
        self.error = error


class RequestCheckInterceptor(grpc.ServerInterceptor):
    """Innermost: a body that does not deserialise, or any NaN/infinite float in a request, is INVALID_ARGUMENT
    before the servicer runs (so before anything is stored or queued)."""

    def intercept_service(self, continuation, handler_call_details):
        handler = continuation(handler_call_details)
        if handler is None or handler.request_deserializer is None:
            return handler
        decode = handler.request_deserializer

        def deserializer(data: bytes):
            try:
                return decode(data)
            except Exception as e:  # protobuf's DecodeError, or a wrong wire type deep inside
                return _Undecodable(e)

        def checked(request):
            if isinstance(request, _Undecodable):
                raise InvalidArgument(f"the request body is not a valid message for {handler_call_details.method}: "
                                      "send a serialised protobuf of the request type (regenerate your stubs from "
                                      "protos/persona/v1)")
            if hasattr(request, "ListFields"):
                check_finite(request)
            return request

        def wrap(kind, behaviour):
            if kind.startswith("stream_"):
                return lambda requests, context: behaviour((checked(r) for r in requests), context)
            return lambda request, context: behaviour(checked(request), context)

        return rebuilt_handler(handler, wrap, deserializer)


def standard_interceptors(authenticator: ApiKeyAuthenticator) -> list[grpc.ServerInterceptor]:
    return [RequestIdInterceptor(), AccessLogInterceptor(), ErrorMappingInterceptor(), AuthInterceptor(authenticator),
            RequestCheckInterceptor(), RequestLimitsInterceptor()]
