"""Typed Python SDK over the persona.v1 stubs: one channel with auth and request-id metadata (plus, optionally, a
channel per service that runs elsewhere, as in a split deployment), one stub per service, gRPC errors turned into
PersonaClientError(code, message)."""
from __future__ import annotations

from dataclasses import dataclass, field
import json
import os
import tempfile
import time
from pathlib import Path
from typing import Iterator

import grpc

from persona.v1 import (caption_pb2_grpc, common_pb2, common_pb2_grpc, evaluate_pb2, evaluate_pb2_grpc,
                        generate_pb2_grpc, mask_pb2_grpc,
                        subjects_pb2, subjects_pb2_grpc, train_pb2, train_pb2_grpc)

MAX_MESSAGE_BYTES = 128 * 1024 * 1024
# Services a client can reach at their own address (`service_addresses`), and the environment variable the CLI
# reads each one from. Subjects and jobs always use the default address: every persona process serves them, over
# the metadata store they share.
ROUTABLE_SERVICES = ("caption", "mask", "train", "generate", "evaluate")
SERVICE_ADDRESS_ENV = {name: f"PERSONA_{name.upper()}_SERVER" for name in ROUTABLE_SERVICES}


class PersonaClientError(Exception):
    """A call failed: `code` is the gRPC status name (e.g. "INVALID_ARGUMENT"), `message` the server's text."""

    def __init__(self, code: str, message: str):
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message

    @classmethod
    def from_rpc_error(cls, error: grpc.RpcError) -> "PersonaClientError":
        code = error.code() if hasattr(error, "code") else None
        details = error.details() if hasattr(error, "details") else str(error)
        return cls(getattr(code, "name", "UNKNOWN"), details or "")


class _MetadataInterceptor(grpc.UnaryUnaryClientInterceptor, grpc.UnaryStreamClientInterceptor):
    """Adds `authorization: Bearer <key>` to every call."""

    def __init__(self, metadata: tuple[tuple[str, str], ...]):
        self.metadata = metadata

    def intercept_unary_unary(self, continuation, client_call_details, request):
        return continuation(_CallDetails(client_call_details, self.metadata), request)

    def intercept_unary_stream(self, continuation, client_call_details, request):
        return continuation(_CallDetails(client_call_details, self.metadata), request)


class _CallDetails(grpc.ClientCallDetails):
    def __init__(self, details, extra):
        self.method = details.method
        self.timeout = details.timeout
        self.metadata = tuple(details.metadata or ()) + extra
        self.credentials = details.credentials
        self.wait_for_ready = getattr(details, "wait_for_ready", None)
        self.compression = getattr(details, "compression", None)


# grpc's own retries, for every call: a server restarting (UNAVAILABLE) or busy (RESOURCE_EXHAUSTED, whose
# grpc-retry-pushback-ms says when to come back) is tried again with exponential backoff, up to 5 attempts.
# A server stream is retried only until its first message; `wait_for_job` re-attaches to a job's stream itself.
RETRY_SERVICE_CONFIG = json.dumps({"methodConfig": [{
    "name": [{}],
    "retryPolicy": {"maxAttempts": 5, "initialBackoff": "0.5s", "maxBackoff": "10s", "backoffMultiplier": 2,
                    "retryableStatusCodes": ["UNAVAILABLE", "RESOURCE_EXHAUSTED"]},
}]})
# How long `wait_for_job` keeps trying to re-attach to a job's stream when the server goes away (a restart).
REATTACH_S = 120.0


def open_channel(address: str, api_key: str | None = None) -> grpc.Channel:
    """A channel to `address` that sends `api_key` (if any) with every call.

    `HOST:PORT` (or `grpc://HOST:PORT`) is plaintext, as `persona-cli serve` listens; `grpcs://HOST:PORT` is TLS,
    for a server behind a TLS-terminating ingress or load balancer, verified against the system's roots or the
    PEM bundle in PERSONA_TLS_CA (a private CA)."""
    options = [("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
               ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
               ("grpc.enable_retries", 1), ("grpc.service_config", RETRY_SERVICE_CONFIG)]
    if address.startswith("grpcs://"):
        ca_path = os.environ.get("PERSONA_TLS_CA", "").strip()
        try:
            roots = Path(ca_path).read_bytes() if ca_path else None
        except OSError as e:
            raise PersonaClientError("INVALID_ARGUMENT", f"PERSONA_TLS_CA {ca_path!r} cannot be read ({e.strerror}): "
                                                         "point it at a PEM file of CA certificates") from None
        channel = grpc.secure_channel(address[len("grpcs://"):], grpc.ssl_channel_credentials(roots), options=options)
    else:
        channel = grpc.insecure_channel(address.removeprefix("grpc://"), options=options)
    if api_key:
        channel = grpc.intercept_channel(channel, _MetadataInterceptor((("authorization", f"Bearer {api_key}"),)))
    return channel


@dataclass
class PersonaClient:
    """Stubs of every persona service: over `channel`, except the services named in `service_channels`
    ("caption", "mask", "train", "generate", "evaluate"), which use their own."""

    channel: grpc.Channel
    service_channels: dict[str, grpc.Channel] = field(default_factory=dict)

    def __post_init__(self):
        unknown = sorted(set(self.service_channels) - set(ROUTABLE_SERVICES))
        if unknown:
            raise ValueError(f"unknown service(s) {', '.join(unknown)}: per-service addresses are for "
                             f"{', '.join(ROUTABLE_SERVICES)}")
        self.subjects = subjects_pb2_grpc.SubjectServiceStub(self.channel)
        self.jobs = common_pb2_grpc.JobServiceStub(self.channel)
        self.captions = caption_pb2_grpc.CaptionServiceStub(self.channel_for("caption"))
        self.train = train_pb2_grpc.TrainServiceStub(self.channel_for("train"))
        self.generate = generate_pb2_grpc.GenerateServiceStub(self.channel_for("generate"))
        self.masks = mask_pb2_grpc.MaskServiceStub(self.channel_for("mask"))
        self.evaluate = evaluate_pb2_grpc.EvaluateServiceStub(self.channel_for("evaluate"))

    @classmethod
    def connect(cls, address: str, api_key: str | None = None,
                service_addresses: dict[str, str] | None = None) -> "PersonaClient":
        """A client of the server at `address`; `service_addresses` ({"train": "host:port", …}) sends a service's
        calls to another address (a split deployment: a Service per persona service). Jobs and subjects always go
        to `address`: every persona process serves them over the shared metadata store, so any one can list,
        watch or cancel a job whichever service runs it. One channel per distinct address."""
        channels = {address: open_channel(address, api_key)}
        service_channels = {}
        for name, service_address in (service_addresses or {}).items():
            if not service_address or service_address == address:
                continue
            if service_address not in channels:
                channels[service_address] = open_channel(service_address, api_key)
            service_channels[name] = channels[service_address]
        try:
            return cls(channels[address], service_channels)
        except BaseException:
            for channel in channels.values():
                channel.close()
            raise

    def channel_for(self, service: str) -> grpc.Channel:
        """The channel `service`'s calls use ("caption", "train", …): its own address if given, else the default."""
        return self.service_channels.get(service, self.channel)

    def wait_for_job(self, job_id: str, on_event=lambda event: None, timeout_s: float | None = None,
                     reattach_s: float = REATTACH_S) -> common_pb2.Job:
        """Follows WatchJob until the job ends, calling `on_event` for each event once; returns the final Job.

        When the server goes away (UNAVAILABLE: a restart, a rolling update), it re-attaches after the last event
        seen, retrying with backoff for up to `reattach_s` seconds (a job resumed by the restarted server goes on)."""
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        seen, backoff, lost = 0, 0.5, None  # lost: when the stream was last lost, unless an event came since
        while True:
            left = None if deadline is None else max(0.0, deadline - time.monotonic())
            try:
                for event in self.jobs.WatchJob(common_pb2.WatchJobRequest(job_id=job_id, after_sequence=seen),
                                                timeout=left):
                    seen, backoff, lost = event.sequence, 0.5, None
                    on_event(event)
                return self.jobs.GetJob(common_pb2.GetJobRequest(job_id=job_id), timeout=left)
            except grpc.RpcError as e:
                if e.code() not in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.RESOURCE_EXHAUSTED):
                    raise
                lost = lost or time.monotonic()
                if not self._reconnect(lost + reattach_s if deadline is None else min(deadline, lost + reattach_s),
                                       backoff):
                    raise
                backoff = min(backoff * 2, 10.0)

    def _reconnect(self, until: float, backoff: float) -> bool:
        """Waits `backoff` seconds, then until the channel is connected again or `until`; whether it is."""
        if time.monotonic() >= until:
            return False
        time.sleep(min(backoff, max(0.0, until - time.monotonic())))
        try:
            grpc.channel_ready_future(self.channel).result(timeout=max(0.0, until - time.monotonic()))
            return True
        except grpc.FutureTimeoutError:
            return False

    def wait_until_ready(self, address: str, timeout_s: float) -> None:
        """Waits up to `timeout_s` for the channel to connect; PersonaClientError UNAVAILABLE if it does not."""
        try:
            grpc.channel_ready_future(self.channel).result(timeout=timeout_s)
        except grpc.FutureTimeoutError:
            raise PersonaClientError(
                "UNAVAILABLE", f"no persona server answers at {address} (waited {timeout_s:g}s): start one with "
                "`persona-cli serve`, or check --server / PERSONA_SERVER") from None

    def all_subjects(self) -> Iterator[subjects_pb2.Subject]:
        """Every subject of the caller, newest first, following page tokens."""
        return _every_page(lambda page: self.subjects.ListSubjects(subjects_pb2.ListSubjectsRequest(page=page)),
                           "subjects")

    def all_jobs(self, kind: str = "", subject_id: str = "") -> Iterator[common_pb2.Job]:
        """Every job of the caller (optionally of one kind or subject), newest first, following page tokens."""
        return _every_page(lambda page: self.jobs.ListJobs(
            common_pb2.ListJobsRequest(page=page, kind=kind, subject_id=subject_id)), "jobs")

    def all_concepts(self, subject_id: str = "") -> Iterator[train_pb2.Concept]:
        """Every concept of the caller (optionally of one subject), newest first, following page tokens."""
        return _every_page(lambda page: self.train.ListConcepts(
            train_pb2.ListConceptsRequest(page=page, subject_id=subject_id)), "concepts")

    def read_concept_file(self, concept_id: str, artifact_id: str, out_path: str | os.PathLike) -> int:
        """Streams one file of a concept into `out_path`; returns its size in bytes (see `_save_stream`)."""
        request = train_pb2.ReadConceptFileRequest(concept_id=concept_id, artifact_id=artifact_id)
        return _save_stream(self.train.ReadConceptFile(request), out_path, f"file {artifact_id} of {concept_id}")

    def read_report_file(self, job_id: str, artifact_id: str, out_path: str | os.PathLike) -> int:
        """Streams one file of an evaluation report into `out_path`; returns its size in bytes."""
        request = evaluate_pb2.ReadReportFileRequest(job_id=job_id, artifact_id=artifact_id)
        return _save_stream(self.evaluate.ReadReportFile(request), out_path, f"report file {artifact_id} of {job_id}")

    def close(self) -> None:
        for channel in {id(c): c for c in (self.channel, *self.service_channels.values())}.values():
            channel.close()


def _save_stream(chunks, out_path: str | os.PathLike, what: str) -> int:
    """Writes a stream of (offset, data, total_size) chunks to `out_path` through a temporary file beside it,
    renamed when complete, so a broken download never leaves a partial file under the final name.

    Raises PersonaClientError DATA_LOSS when the chunks do not add up to the size the server announced.
    """
    out = Path(out_path)
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{out.name}.", suffix=".part", dir=out.parent)
    try:
        written, total = 0, None
        with os.fdopen(fd, "wb") as handle:
            for chunk in chunks:
                if chunk.offset != written:
                    raise PersonaClientError("DATA_LOSS", f"{what}: chunk at offset {chunk.offset} where {written} "
                                                          "was expected")
                handle.write(chunk.data)
                written += len(chunk.data)
                total = chunk.total_size
        if total is not None and written != total:
            raise PersonaClientError("DATA_LOSS", f"{what}: received {written} of {total} bytes")
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp_name, 0o666 & ~umask)  # mkstemp makes 0600; give the file the permissions open() would
        os.replace(tmp_name, out)
        return written
    except BaseException:
        Path(tmp_name).unlink(missing_ok=True)
        raise


def _every_page(list_page, field: str) -> Iterator:
    """Items of `field` across every page of a List… RPC (`list_page(PageRequest)` → response)."""
    token = ""
    while True:
        response = list_page(common_pb2.PageRequest(page_token=token))
        yield from getattr(response, field)
        token = response.page.next_page_token
        if not token:
            return
