"""CaptionService over gRPC (SKELETON: being implemented)."""
from __future__ import annotations

from persona.v1 import caption_pb2_grpc
from persona.services.runtime.server import ServiceRegistration


def caption_service(domain) -> ServiceRegistration:
    servicer = caption_pb2_grpc.CaptionServiceServicer()
    return ServiceRegistration("persona.v1.CaptionService",
                               lambda server: caption_pb2_grpc.add_CaptionServiceServicer_to_server(servicer, server))
