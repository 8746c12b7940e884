from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class Scheduler(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    SCHEDULER_UNSPECIFIED: _ClassVar[Scheduler]
    SCHEDULER_DDIM: _ClassVar[Scheduler]
    SCHEDULER_DPMPP: _ClassVar[Scheduler]
    SCHEDULER_EULER: _ClassVar[Scheduler]
SCHEDULER_UNSPECIFIED: Scheduler
SCHEDULER_DDIM: Scheduler
SCHEDULER_DPMPP: Scheduler
SCHEDULER_EULER: Scheduler

class GenerateRequest(_message.Message):
    __slots__ = ("concept_id", "base_model", "prompts", "negative_prompt", "seed", "steps", "guidance_scale", "scheduler", "width", "height", "images_per_prompt", "p3s_weight_schedule", "p3s_weight_alpha", "p3s_weight_beta", "p3s_weight_k", "p3s_reference", "p3s_injection_lambda")
    CONCEPT_ID_FIELD_NUMBER: _ClassVar[int]
    BASE_MODEL_FIELD_NUMBER: _ClassVar[int]
    PROMPTS_FIELD_NUMBER: _ClassVar[int]
    NEGATIVE_PROMPT_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    STEPS_FIELD_NUMBER: _ClassVar[int]
    GUIDANCE_SCALE_FIELD_NUMBER: _ClassVar[int]
    SCHEDULER_FIELD_NUMBER: _ClassVar[int]
    WIDTH_FIELD_NUMBER: _ClassVar[int]
    HEIGHT_FIELD_NUMBER: _ClassVar[int]
    IMAGES_PER_PROMPT_FIELD_NUMBER: _ClassVar[int]
    P3S_WEIGHT_SCHEDULE_FIELD_NUMBER: _ClassVar[int]
    P3S_WEIGHT_ALPHA_FIELD_NUMBER: _ClassVar[int]
    P3S_WEIGHT_BETA_FIELD_NUMBER: _ClassVar[int]
    P3S_WEIGHT_K_FIELD_NUMBER: _ClassVar[int]
    P3S_REFERENCE_FIELD_NUMBER: _ClassVar[int]
    P3S_INJECTION_LAMBDA_FIELD_NUMBER: _ClassVar[int]
    concept_id: str
    base_model: str
    prompts: _containers.RepeatedScalarFieldContainer[str]
    negative_prompt: str
    seed: int
    steps: int
    guidance_scale: float
    scheduler: Scheduler
    width: int
    height: int
    images_per_prompt: int
    p3s_weight_schedule: str
    p3s_weight_alpha: float
    p3s_weight_beta: float
    p3s_weight_k: float
    p3s_reference: int
    p3s_injection_lambda: float
    def __init__(self, concept_id: _Optional[str] = ..., base_model: _Optional[str] = ..., prompts: _Optional[_Iterable[str]] = ..., negative_prompt: _Optional[str] = ..., seed: _Optional[int] = ..., steps: _Optional[int] = ..., guidance_scale: _Optional[float] = ..., scheduler: _Optional[_Union[Scheduler, str]] = ..., width: _Optional[int] = ..., height: _Optional[int] = ..., images_per_prompt: _Optional[int] = ..., p3s_weight_schedule: _Optional[str] = ..., p3s_weight_alpha: _Optional[float] = ..., p3s_weight_beta: _Optional[float] = ..., p3s_weight_k: _Optional[float] = ..., p3s_reference: _Optional[int] = ..., p3s_injection_lambda: _Optional[float] = ...) -> None: ...

class GeneratedImage(_message.Message):
    __slots__ = ("prompt_index", "image_index", "prompt", "negative_prompt", "seed", "steps", "guidance_scale", "scheduler", "width", "height", "concept_id", "base_model", "png", "seconds", "engine")
    PROMPT_INDEX_FIELD_NUMBER: _ClassVar[int]
    IMAGE_INDEX_FIELD_NUMBER: _ClassVar[int]
    PROMPT_FIELD_NUMBER: _ClassVar[int]
    NEGATIVE_PROMPT_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    STEPS_FIELD_NUMBER: _ClassVar[int]
    GUIDANCE_SCALE_FIELD_NUMBER: _ClassVar[int]
    SCHEDULER_FIELD_NUMBER: _ClassVar[int]
    WIDTH_FIELD_NUMBER: _ClassVar[int]
    HEIGHT_FIELD_NUMBER: _ClassVar[int]
    CONCEPT_ID_FIELD_NUMBER: _ClassVar[int]
    BASE_MODEL_FIELD_NUMBER: _ClassVar[int]
    PNG_FIELD_NUMBER: _ClassVar[int]
    SECONDS_FIELD_NUMBER: _ClassVar[int]
    ENGINE_FIELD_NUMBER: _ClassVar[int]
    prompt_index: int
    image_index: int
    prompt: str
    negative_prompt: str
    seed: int
    steps: int
    guidance_scale: float
    scheduler: Scheduler
    width: int
    height: int
    concept_id: str
    base_model: str
    png: bytes
    seconds: float
    engine: str
    def __init__(self, prompt_index: _Optional[int] = ..., image_index: _Optional[int] = ..., prompt: _Optional[str] = ..., negative_prompt: _Optional[str] = ..., seed: _Optional[int] = ..., steps: _Optional[int] = ..., guidance_scale: _Optional[float] = ..., scheduler: _Optional[_Union[Scheduler, str]] = ..., width: _Optional[int] = ..., height: _Optional[int] = ..., concept_id: _Optional[str] = ..., base_model: _Optional[str] = ..., png: _Optional[bytes] = ..., seconds: _Optional[float] = ..., engine: _Optional[str] = ...) -> None: ...

class LoadConceptRequest(_message.Message):
    __slots__ = ("concept_id",)
    CONCEPT_ID_FIELD_NUMBER: _ClassVar[int]
    concept_id: str
    def __init__(self, concept_id: _Optional[str] = ...) -> None: ...

class LoadedConcept(_message.Message):
    __slots__ = ("concept_id", "engine", "resolution", "load_seconds")
    CONCEPT_ID_FIELD_NUMBER: _ClassVar[int]
    ENGINE_FIELD_NUMBER: _ClassVar[int]
    RESOLUTION_FIELD_NUMBER: _ClassVar[int]
    LOAD_SECONDS_FIELD_NUMBER: _ClassVar[int]
    concept_id: str
    engine: str
    resolution: int
    load_seconds: float
    def __init__(self, concept_id: _Optional[str] = ..., engine: _Optional[str] = ..., resolution: _Optional[int] = ..., load_seconds: _Optional[float] = ...) -> None: ...

class UnloadConceptRequest(_message.Message):
    __slots__ = ("concept_id",)
    CONCEPT_ID_FIELD_NUMBER: _ClassVar[int]
    concept_id: str
    def __init__(self, concept_id: _Optional[str] = ...) -> None: ...

class UnloadConceptResponse(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ListLoadedConceptsRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ListLoadedConceptsResponse(_message.Message):
    __slots__ = ("concepts",)
    CONCEPTS_FIELD_NUMBER: _ClassVar[int]
    concepts: _containers.RepeatedCompositeFieldContainer[LoadedConcept]
    def __init__(self, concepts: _Optional[_Iterable[_Union[LoadedConcept, _Mapping]]] = ...) -> None: ...
