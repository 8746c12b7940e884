"""CaptionService over gRPC: proto ↔ domain only."""
from __future__ import annotations

from persona.v1 import caption_pb2, caption_pb2_grpc, common_pb2
from persona.services.runtime.context import current_tenant
from persona.services.runtime.errors import InvalidArgument
from persona.services.runtime.job_service import job_to_proto
from persona.services.runtime.protoconv import timestamp
from persona.services.runtime.server import ServiceRegistration

from . import instructions
from .domain import Caption, CaptionDomain

MODES = {caption_pb2.CAPTION_MODE_UNSPECIFIED: instructions.DEFAULT_MODE,
         caption_pb2.CAPTION_MODE_OBJECT: "object",
         caption_pb2.CAPTION_MODE_STYLE: "style",
         caption_pb2.CAPTION_MODE_EXPRESSION: "expression"}
MODE_VALUES = {name: value for value, name in MODES.items() if value}
SOURCES = {"template": caption_pb2.CAPTION_SOURCE_TEMPLATE, "vlm": caption_pb2.CAPTION_SOURCE_VLM,
           "user": caption_pb2.CAPTION_SOURCE_USER}


def caption_to_proto(caption: Caption) -> caption_pb2.Caption:
    # DescriptionCase values are the case numbers (DESCRIPTION_CASE_3 = 3); 0 for a person's caption.
    return caption_pb2.Caption(
        image=common_pb2.ImageRef(subject_id=caption.subject_id, image_id=caption.image_id), text=caption.text,
        case=caption.case, mode=MODE_VALUES.get(caption.mode, 0), source=SOURCES[caption.source],
        instruction_version=caption.instruction_version, model=caption.model, attempts=caption.attempts,
        failure=caption.failure, updated_at=timestamp(caption.updated_at),
    )


def _image_ref(image: common_pb2.ImageRef) -> tuple[str, str]:
    if not image.image_id:
        raise InvalidArgument("`image.image_id` is empty: pass an id from GetSubject's `images`")
    return image.subject_id, image.image_id


class CaptionServicer(caption_pb2_grpc.CaptionServiceServicer):
    def __init__(self, captions: CaptionDomain):
        self.captions = captions

    def StartCaptioning(self, request, context):
        job = self.captions.start(
            current_tenant(), request.subject_id,
            case=request.case or instructions.DEFAULT_CASE,
            mode=MODES.get(request.mode, str(request.mode)),  # an unknown number: the domain names it
            image_ids=list(request.image_ids), overwrite_user_captions=request.overwrite_user_captions,
        )
        return job_to_proto(job)

    def ListCaptions(self, request, context):
        captions = self.captions.list(current_tenant(), request.subject_id)
        return caption_pb2.ListCaptionsResponse(captions=[caption_to_proto(c) for c in captions])

    def GetCaption(self, request, context):
        return caption_to_proto(self.captions.get(current_tenant(), *_image_ref(request.image)))

    def SetCaption(self, request, context):
        return caption_to_proto(self.captions.set(current_tenant(), *_image_ref(request.image), request.text))


def caption_service(captions: CaptionDomain) -> ServiceRegistration:
    servicer = CaptionServicer(captions)
    return ServiceRegistration("persona.v1.CaptionService",
                               lambda server: caption_pb2_grpc.add_CaptionServiceServicer_to_server(servicer, server))
