"""GenerateService over gRPC: proto ↔ domain only."""
from __future__ import annotations

from persona.v1 import generate_pb2, generate_pb2_grpc
from persona.services.runtime.context import current_tenant
from persona.services.runtime.errors import InvalidArgument
from persona.services.runtime.server import ServiceRegistration

from .domain import GenerateDomain, GenerateRequest, LoadedModel
from .options import SETTINGS

SCHEDULERS = {generate_pb2.SCHEDULER_UNSPECIFIED: "", generate_pb2.SCHEDULER_DDIM: "ddim",
              generate_pb2.SCHEDULER_DPMPP: "dpmpp", generate_pb2.SCHEDULER_EULER: "euler"}
SCHEDULER_VALUES = {name: value for value, name in SCHEDULERS.items() if name}


def settings_from_proto(request: generate_pb2.GenerateRequest) -> dict:
    """The declared settings (options.py) of a GenerateRequest; None (or "") for those the caller left unset."""
    if request.scheduler not in SCHEDULERS:
        raise InvalidArgument(f"`scheduler` is {request.scheduler}: use SCHEDULER_DDIM, _DPMPP or _EULER")
    values = {}
    for option in SETTINGS:
        if option.name == "scheduler":  # an enum on the wire, a name in the domain
            values[option.name] = SCHEDULERS[request.scheduler]
        elif request.DESCRIPTOR.fields_by_name[option.name].has_presence:
            values[option.name] = getattr(request, option.name) if request.HasField(option.name) else None
        else:
            values[option.name] = getattr(request, option.name)
    return values


def _loaded(model: LoadedModel, engine: str) -> generate_pb2.LoadedConcept:
    return generate_pb2.LoadedConcept(concept_id=model.key, engine=engine, resolution=model.resolution,
                                      load_seconds=model.load_seconds)


class GenerateServicer(generate_pb2_grpc.GenerateServiceServicer):
    def __init__(self, domain: GenerateDomain):
        self.domain = domain

    def Generate(self, request, context):
        request = GenerateRequest(prompts=tuple(request.prompts), concept_id=request.concept_id,
                                  base_model=request.base_model, **settings_from_proto(request))
        self.domain.check(request)  # a bad request is refused at once, not after its turn in the queue
        with self.domain.admission.hold(is_active=context.is_active):
            yield from self._images(self.domain.generate(current_tenant(), request))

    @staticmethod
    def _images(images):
        for image in images:
            s = image.settings
            yield generate_pb2.GeneratedImage(
                prompt_index=image.prompt_index, image_index=image.image_index, prompt=s.prompt,
                negative_prompt=s.negative_prompt, seed=s.seed, steps=s.steps, guidance_scale=s.guidance_scale,
                scheduler=SCHEDULER_VALUES[s.scheduler], width=s.width, height=s.height, concept_id=image.concept_id,
                base_model=image.base_model, png=image.png, seconds=image.seconds, engine=image.engine)

    def LoadConcept(self, request, context):
        return _loaded(self.domain.load(current_tenant(), request.concept_id), self.domain.engine.name)

    def UnloadConcept(self, request, context):
        self.domain.unload(current_tenant(), request.concept_id)
        return generate_pb2.UnloadConceptResponse()

    def ListLoadedConcepts(self, request, context):
        return generate_pb2.ListLoadedConceptsResponse(
            concepts=[_loaded(m, self.domain.engine.name) for m in self.domain.loaded(current_tenant())])


def generate_service(domain: GenerateDomain) -> ServiceRegistration:
    servicer = GenerateServicer(domain)
    return ServiceRegistration(
        "persona.v1.GenerateService",
        lambda server: generate_pb2_grpc.add_GenerateServiceServicer_to_server(servicer, server))
