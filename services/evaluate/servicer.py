"""EvaluateService over gRPC: proto ↔ domain only."""
from __future__ import annotations

from persona.v1 import evaluate_pb2, evaluate_pb2_grpc
from persona.services.runtime.context import current_tenant
from persona.services.runtime.errors import InvalidArgument
from persona.services.runtime.job_service import job_to_proto
from persona.services.runtime.server import ServiceRegistration

from ..generate.options import P3S_SETTINGS
from .domain import EvaluateDomain, EvaluationRequest


def _optional(message, name: str):
    return getattr(message, name) if message.HasField(name) else None


def _p3s(request) -> dict:
    """The p3s drawing settings the request sets (GenerateRequest's names), the unset ones left out."""
    fields = request.DESCRIPTOR.fields_by_name
    given = {name: _optional(request, name) if fields[name].has_presence else getattr(request, name)
             for name in P3S_SETTINGS}
    return {name: value for name, value in given.items() if value not in (None, "")}


class EvaluateServicer(evaluate_pb2_grpc.EvaluateServiceServicer):
    def __init__(self, domain: EvaluateDomain):
        self.domain = domain

    def StartEvaluation(self, request, context):
        job = self.domain.start(current_tenant(), EvaluationRequest(
            concept_ids=tuple(request.concept_ids), prompt_set=request.prompt_set, prompts=tuple(request.prompts),
            images_per_prompt=_optional(request, "images_per_prompt"), seed=_optional(request, "seed"),
            steps=_optional(request, "steps"), guidance_scale=_optional(request, "guidance_scale"),
            metrics=tuple(request.metrics), resolution=_optional(request, "resolution"), p3s=_p3s(request)))
        return job_to_proto(job)

    def GetReport(self, request, context):
        if not request.job_id:
            raise InvalidArgument("`job_id` is empty: pass the id StartEvaluation returned")
        r = self.domain.report(current_tenant(), request.job_id)
        return evaluate_pb2.Report(
            job_id=r.job_id, concept_ids=r.concept_ids,
            metrics=[evaluate_pb2.MetricValue(**m) for m in r.metrics], html_artifact_id=r.html_artifact_id,
            json_artifact_id=r.json_artifact_id, csv_artifact_id=r.csv_artifact_id, images=r.images,
            seconds=r.seconds)

    def ReadReportFile(self, request, context):
        for offset, data, total in self.domain.read_file(current_tenant(), request.job_id, request.artifact_id):
            yield evaluate_pb2.ReportFileChunk(offset=offset, data=data, total_size=total)


def evaluate_service(domain: EvaluateDomain) -> ServiceRegistration:
    servicer = EvaluateServicer(domain)
    return ServiceRegistration("persona.v1.EvaluateService",
                               lambda server: evaluate_pb2_grpc.add_EvaluateServiceServicer_to_server(servicer, server))
