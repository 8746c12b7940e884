"""SubjectService over gRPC: proto ↔ domain only."""
from __future__ import annotations

from persona.v1 import common_pb2, subjects_pb2, subjects_pb2_grpc
from persona.services.runtime.context import current_tenant
from persona.services.runtime.errors import InvalidArgument
from persona.services.runtime.paging import parse_page
from persona.services.runtime.protoconv import timestamp
from persona.services.runtime.server import ServiceRegistration

from .domain import Subject, SubjectImage, SubjectRepository


def image_to_proto(image: SubjectImage) -> subjects_pb2.SubjectImage:
    return subjects_pb2.SubjectImage(
        image_id=image.image_id, index=image.index, filename=image.filename, width=image.width,
        height=image.height, media_type=image.media_type, sha256=image.sha256, size_bytes=image.size_bytes,
    )


def subject_to_proto(subject: Subject) -> subjects_pb2.Subject:
    return subjects_pb2.Subject(
        subject_id=subject.subject_id, class_name=subject.class_name, token=subject.token,
        display_name=subject.display_name, images=[image_to_proto(i) for i in subject.images],
        created_at=timestamp(subject.created_at),
    )


class SubjectServicer(subjects_pb2_grpc.SubjectServiceServicer):
    def __init__(self, subjects: SubjectRepository):
        self.subjects = subjects

    def CreateSubject(self, request, context):
        uploads = [(image.data, image.filename) for image in request.images]
        subject = self.subjects.create(current_tenant(), request.class_name, request.token,
                                       request.display_name, uploads)
        return subject_to_proto(subject)

    def GetSubject(self, request, context):
        return subject_to_proto(self.subjects.get(current_tenant(), request.subject_id))

    def ListSubjects(self, request, context):
        page = parse_page(request.page.page_size, request.page.page_token)
        subjects, token = self.subjects.list(current_tenant(), page)
        return subjects_pb2.ListSubjectsResponse(subjects=[subject_to_proto(s) for s in subjects],
                                                 page=common_pb2.PageResponse(next_page_token=token))

    def DeleteSubject(self, request, context):
        self.subjects.delete(current_tenant(), request.subject_id)
        return subjects_pb2.DeleteSubjectResponse(subject_id=request.subject_id)

    def GetSubjectImage(self, request, context):
        if not request.image.image_id:
            raise InvalidArgument("`image.image_id` is empty: pass an id from GetSubject's `images`")
        image, data = self.subjects.image_bytes(current_tenant(), request.image.subject_id, request.image.image_id)
        return subjects_pb2.GetSubjectImageResponse(image=image_to_proto(image), data=data)


def subject_service(subjects: SubjectRepository) -> ServiceRegistration:
    servicer = SubjectServicer(subjects)
    return ServiceRegistration("persona.v1.SubjectService",
                               lambda server: subjects_pb2_grpc.add_SubjectServiceServicer_to_server(servicer, server))
