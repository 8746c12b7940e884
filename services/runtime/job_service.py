"""JobService: inspect, follow and cancel the caller's jobs (served by every persona server)."""
from __future__ import annotations

import logging

import grpc
from google.protobuf import json_format

from persona.v1 import common_pb2, common_pb2_grpc

from .budget import Budget
from .context import current_tenant
from .errors import InvalidArgument
from .job_store import JobEventRecord, JobRecord
from .jobs import JobRunner
from .paging import parse_page
from .protoconv import struct, timestamp
from .server import ServiceRegistration

log = logging.getLogger("persona.jobs")

# The Job field holding the typed result of each job kind (common.proto); a handler's result dict uses the
# message's field names, so one parse fills it.
TYPED_RESULTS = {"caption": "caption_result", "train": "train_result", "export": "export_result",
                 "evaluate": "evaluate_result", "encoder_train": "encoder_train_result"}


def job_to_proto(job: JobRecord) -> common_pb2.Job:
    message = common_pb2.Job(
        job_id=job.job_id, kind=job.kind, state=common_pb2.JobState.Value(f"JOB_STATE_{job.state}"),
        progress=job.progress, params=struct(job.params), result=struct(job.result),
        interrupted=job.interrupted, attempts=job.attempts, created_at=timestamp(job.created_at),
        updated_at=timestamp(job.updated_at), subject_id=job.subject_id,
    )
    if job.error_code:
        message.error.CopyFrom(common_pb2.JobError(code=job.error_code, message=job.error_message))
    field = TYPED_RESULTS.get(job.kind)
    if field and job.result:
        _parse_into(job.result, getattr(message, field), f"the result of job {job.job_id}")
    return message


def event_to_proto(event: JobEventRecord) -> common_pb2.JobEvent:
    message = common_pb2.JobEvent(
        job_id=event.job_id, sequence=event.sequence,
        type=common_pb2.JobEventType.Value(f"JOB_EVENT_TYPE_{event.type}"),
        state=common_pb2.JobState.Value(f"JOB_STATE_{event.state}") if event.state else 0,
        progress=event.progress, message=event.message, data=struct(event.data),
        created_at=timestamp(event.created_at),
    )
    if event.type == "PROGRESS" and event.data:
        _parse_into(event.data, message.details, f"event {event.sequence} of job {event.job_id}")
    return message


def _parse_into(data: dict, target, what: str) -> None:
    """Fills the typed message `target` from a handler's dict (keys it does not declare are left to the Struct).
    A dict that does not fit (an older server's row) leaves the typed message unset, not the call failed."""
    try:
        json_format.ParseDict(data, target, ignore_unknown_fields=True)
    except json_format.ParseError:
        target.Clear()
        log.warning("%s does not fit %s; only the untyped data carries it", what, target.DESCRIPTOR.name,
                    exc_info=True)


def _require_job_id(job_id: str) -> str:
    if not job_id:
        raise InvalidArgument("`job_id` is empty: pass the id StartCaptioning (or another Start… RPC) returned")
    return job_id


class JobServicer(common_pb2_grpc.JobServiceServicer):
    def __init__(self, runner: JobRunner, max_streams: int = 128):
        self.runner = runner
        self.store = runner.store
        # Open WatchJob streams (each holds a thread): one more is turned away, not queued.
        self.streams = Budget(max_streams, queue=0, wait_s=0, what="WatchJob streams",
                              settings="PERSONA_MAX_WATCH_STREAMS")

    def GetJob(self, request, context):
        return job_to_proto(self.store.get(_require_job_id(request.job_id), current_tenant()))

    def ListJobs(self, request, context):
        page = parse_page(request.page.page_size, request.page.page_token)
        jobs, token = self.store.list(current_tenant(), page, request.kind, request.subject_id)
        return common_pb2.ListJobsResponse(jobs=[job_to_proto(j) for j in jobs],
                                           page=common_pb2.PageResponse(next_page_token=token))

    def WatchJob(self, request, context: grpc.ServicerContext):
        if request.after_sequence < 0:
            raise InvalidArgument("`after_sequence` is negative: pass 0 to replay the whole history")
        job_id = _require_job_id(request.job_id)
        with self.streams.hold():
            for event in self.store.watch(current_tenant(), job_id, request.after_sequence, is_active=context.is_active):
                yield event_to_proto(event)

    def CancelJob(self, request, context):
        return job_to_proto(self.runner.cancel(current_tenant(), _require_job_id(request.job_id)))


def job_service(runner: JobRunner, max_streams: int = 128) -> ServiceRegistration:
    servicer = JobServicer(runner, max_streams)
    return ServiceRegistration("persona.v1.JobService",
                               lambda server: common_pb2_grpc.add_JobServiceServicer_to_server(servicer, server))
