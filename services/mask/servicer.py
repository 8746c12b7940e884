"""MaskService over gRPC: proto ↔ domain only."""
from __future__ import annotations

from persona.v1 import mask_pb2, mask_pb2_grpc
from persona.services.runtime.context import current_tenant
from persona.services.runtime.errors import InvalidArgument
from persona.services.runtime.server import ServiceRegistration

from .domain import CLIPSEG, GROUNDED_SAM, MaskDomain, StoredMask

TEXT_METHODS = {mask_pb2.TEXT_MASK_METHOD_UNSPECIFIED: GROUNDED_SAM,
                mask_pb2.TEXT_MASK_METHOD_GROUNDED_SAM: GROUNDED_SAM,
                mask_pb2.TEXT_MASK_METHOD_CLIPSEG: CLIPSEG}


def _points(points) -> list[tuple[int, int]]:
    return [(p.x, p.y) for p in points]


class MaskServicer(mask_pb2_grpc.MaskServiceServicer):
    def __init__(self, domain: MaskDomain):
        self.domain = domain

    def _mask(self, mask: StoredMask) -> mask_pb2.Mask:
        return mask_pb2.Mask(
            subject_id=mask.subject_id, image_id=mask.image_id, artifact_id=mask.artifact_id, width=mask.width,
            height=mask.height, method=mask.method, positive=[mask_pb2.Point(x=x, y=y) for x, y in mask.positive],
            negative=[mask_pb2.Point(x=x, y=y) for x, y in mask.negative], text=mask.text, models=mask.models,
            coverage=mask.coverage, created_at=mask.created_at, png=self.domain.png(mask))

    def MaskFromPoints(self, request, context):
        return self._mask(self.domain.from_points(current_tenant(), request.subject_id, request.image_id,
                                                  _points(request.positive), _points(request.negative),
                                                  request.model))

    def MaskFromText(self, request, context):
        if request.method not in TEXT_METHODS:
            raise InvalidArgument(f"`method` is {request.method}: use TEXT_MASK_METHOD_GROUNDED_SAM or _CLIPSEG")
        masks = self.domain.from_text(current_tenant(), request.subject_id, request.image_id, request.text,
                                      TEXT_METHODS[request.method])
        return mask_pb2.MaskFromTextResponse(masks=[self._mask(m) for m in masks])

    def GetMask(self, request, context):
        return self._mask(self.domain.get(current_tenant(), request.subject_id, request.image_id))


def mask_service(domain: MaskDomain) -> ServiceRegistration:
    servicer = MaskServicer(domain)
    return ServiceRegistration(
        "persona.v1.MaskService", lambda server: mask_pb2_grpc.add_MaskServiceServicer_to_server(servicer, server))
