"""TrainService over gRPC: proto ↔ domain only."""
from __future__ import annotations

from persona.v1 import common_pb2, train_pb2, train_pb2_grpc
from persona.services.models.concepts import VALIDATION, WEIGHTS, Concept
from persona.services.runtime.context import current_tenant
from persona.services.runtime.errors import InvalidArgument
from persona.services.runtime.job_service import job_to_proto
from persona.services.runtime.paging import parse_page
from persona.services.runtime.protoconv import timestamp
from persona.services.runtime.server import ServiceRegistration

from .customcontrast.jobs import EncoderTraining, EncoderTrainRequest
from .domain import TrainDomain
from .options import BY_NAME, OPTIONS
from .request import TrainRequest

STATES = {"TRAINING": train_pb2.CONCEPT_STATE_TRAINING, "READY": train_pb2.CONCEPT_STATE_READY,
          "FAILED": train_pb2.CONCEPT_STATE_FAILED, "CANCELLED": train_pb2.CONCEPT_STATE_CANCELLED}
FORMATS = {train_pb2.EXPORT_FORMAT_DIFFUSERS: "diffusers", train_pb2.EXPORT_FORMAT_LORA: "lora",
           train_pb2.EXPORT_FORMAT_KOHYA: "kohya", train_pb2.EXPORT_FORMAT_TI: "ti",
           train_pb2.EXPORT_FORMAT_ONNX: "onnx", train_pb2.EXPORT_FORMAT_TENSORRT: "tensorrt",
           train_pb2.EXPORT_FORMAT_CUSTOM_DIFFUSION: "custom_diffusion", train_pb2.EXPORT_FORMAT_SVDIFF: "svdiff"}


def options_from_proto(options: train_pb2.TrainingOptions) -> dict:
    """Only the options the caller set (options.py declares them): unset `optional` numbers, empty strings, false
    and empty lists take the server's defaults."""
    result: dict = {}
    for option in OPTIONS:
        value = getattr(options, option.name)
        if option.type is list:
            if value:
                result[option.name] = list(value)
        elif option.type in (bool, str):  # plain proto3 fields: unset reads as false / ""
            if value:
                result[option.name] = value
        elif options.HasField(option.name):
            result[option.name] = value
    return result


def options_to_proto(options: dict) -> train_pb2.TrainingOptions:
    message = train_pb2.TrainingOptions()
    for name, value in options.items():
        if name not in BY_NAME or value is None:
            continue  # a stored option this server no longer declares
        if BY_NAME[name].type is list:
            getattr(message, name).extend(value)
        else:
            setattr(message, name, value)
    return message


def _file(file) -> train_pb2.ConceptFile:
    return train_pb2.ConceptFile(path=file.path, artifact_id=file.artifact_id, size_bytes=file.size_bytes)


def concept_to_proto(concept: Concept) -> train_pb2.Concept:
    return train_pb2.Concept(
        concept_id=concept.concept_id, subject_id=concept.subject_id, token=concept.token,
        class_name=concept.class_name, display_name=concept.display_name, state=STATES[concept.state],
        job_id=concept.job_id, base_model=concept.base_model, base_model_sha256=concept.base_model_sha256,
        base_model_family=concept.base_model_family, method=concept.method, regularizers=concept.regularizers,
        captions=concept.captions, options=options_to_proto(concept.options),
        training_captions=[train_pb2.TrainingCaption(
            image=common_pb2.ImageRef(subject_id=concept.subject_id, image_id=c.image_id), text=c.text,
            source=c.source) for c in concept.training_captions],
        steps_done=concept.steps_done, final_loss=concept.final_loss,
        files=[_file(f) for f in concept.files_of(WEIGHTS)],
        validation_images=[train_pb2.ValidationImage(step=f.step, prompt=f.prompt, artifact_id=f.artifact_id)
                           for f in concept.files_of(VALIDATION)],
        parent_concept_id=concept.parent_concept_id, persona_version=concept.persona_version,
        resolution=concept.resolution, encoder=concept.encoder, created_at=timestamp(concept.created_at),
        updated_at=timestamp(concept.updated_at),
    )


def _export_request(request: train_pb2.ExportConceptRequest) -> tuple[str, str, bool | None]:
    """(concept_id, format name, fp16 or None when unset) of an ExportConceptRequest."""
    if request.format not in FORMATS:
        raise InvalidArgument(f"`format` is {request.format}: use EXPORT_FORMAT_DIFFUSERS, _LORA, _KOHYA, _TI, "
                              "_ONNX, _TENSORRT, _CUSTOM_DIFFUSION or _SVDIFF")
    return (_concept_id(request.concept_id), FORMATS[request.format],
            request.fp16 if request.HasField("fp16") else None)


def _concept_id(concept_id: str) -> str:
    if not concept_id:
        raise InvalidArgument("`concept_id` is empty: pass an id from ListConcepts (`persona-cli concepts list`)")
    return concept_id


def encoder_request(request: train_pb2.StartEncoderTrainingRequest) -> EncoderTrainRequest:
    def optional(name):
        return getattr(request, name) if request.HasField(name) else None

    return EncoderTrainRequest(
        dataset=request.dataset, base_model=request.base_model, image_encoder=request.image_encoder,
        steps=optional("steps"), learning_rate=optional("learning_rate"), batch_size=optional("batch_size"),
        seed=optional("seed"), checkpoint_every=optional("checkpoint_every"),
        no_textual_qformer=request.no_textual_qformer, no_cscl=request.no_cscl, no_macl=request.no_macl)


class TrainServicer(train_pb2_grpc.TrainServiceServicer):
    def __init__(self, domain: TrainDomain, encoders: EncoderTraining):
        self.domain, self.encoders = domain, encoders

    def StartTraining(self, request, context):
        if not request.subject_id:
            raise InvalidArgument("`subject_id` is empty: pass an id from `persona-cli subjects list`")
        job = self.domain.start(current_tenant(), TrainRequest(
            subject_id=request.subject_id, base_model=request.base_model, method=request.method,
            regularizers=tuple(request.regularizers), captions=request.captions,
            options=options_from_proto(request.options), display_name=request.display_name,
            parent_concept_id=request.parent_concept_id, mode=request.mode, encoder=request.encoder))
        return job_to_proto(job)

    def GetConcept(self, request, context):
        return concept_to_proto(self.domain.get(current_tenant(), _concept_id(request.concept_id)))

    def ListConcepts(self, request, context):
        page = parse_page(request.page.page_size, request.page.page_token)
        concepts, token = self.domain.list(current_tenant(), page, request.subject_id)
        return train_pb2.ListConceptsResponse(concepts=[concept_to_proto(c) for c in concepts],
                                              page=common_pb2.PageResponse(next_page_token=token))

    def DeleteConcept(self, request, context):
        self.domain.delete(current_tenant(), _concept_id(request.concept_id))
        return train_pb2.DeleteConceptResponse()

    def ExportConcept(self, request, context):
        exported = self.domain.exports.export(current_tenant(), *_export_request(request))
        return train_pb2.ConceptExport(concept_id=request.concept_id, format=request.format, fp16=exported.fp16,
                                       files=[_file(f) for f in exported.files])

    def StartExport(self, request, context):
        return job_to_proto(self.domain.exports.start_export(current_tenant(), *_export_request(request)))

    def ReadConceptFile(self, request, context):
        if not request.artifact_id:
            raise InvalidArgument("`artifact_id` is empty: pass one from GetConcept's files or ExportConcept")
        chunks = self.domain.read_file(current_tenant(), _concept_id(request.concept_id), request.artifact_id)
        for offset, data, total in chunks:
            yield train_pb2.FileChunk(offset=offset, data=data, total_size=total)

    def StartEncoderTraining(self, request, context):
        return job_to_proto(self.encoders.start(current_tenant(), encoder_request(request)))


def train_service(domain: TrainDomain, encoders: EncoderTraining) -> ServiceRegistration:
    servicer = TrainServicer(domain, encoders)
    return ServiceRegistration("persona.v1.TrainService",
                               lambda server: train_pb2_grpc.add_TrainServiceServicer_to_server(servicer, server))
