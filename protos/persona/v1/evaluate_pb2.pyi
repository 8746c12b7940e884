from persona.v1 import common_pb2 as _common_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class StartEvaluationRequest(_message.Message):
    __slots__ = ("concept_ids", "prompt_set", "prompts", "images_per_prompt", "seed", "steps", "guidance_scale", "metrics", "resolution", "p3s_weight_schedule", "p3s_weight_alpha", "p3s_weight_beta", "p3s_weight_k", "p3s_injection_lambda", "p3s_reference")
    CONCEPT_IDS_FIELD_NUMBER: _ClassVar[int]
    PROMPT_SET_FIELD_NUMBER: _ClassVar[int]
    PROMPTS_FIELD_NUMBER: _ClassVar[int]
    IMAGES_PER_PROMPT_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    STEPS_FIELD_NUMBER: _ClassVar[int]
    GUIDANCE_SCALE_FIELD_NUMBER: _ClassVar[int]
    METRICS_FIELD_NUMBER: _ClassVar[int]
    RESOLUTION_FIELD_NUMBER: _ClassVar[int]
    P3S_WEIGHT_SCHEDULE_FIELD_NUMBER: _ClassVar[int]
    P3S_WEIGHT_ALPHA_FIELD_NUMBER: _ClassVar[int]
    P3S_WEIGHT_BETA_FIELD_NUMBER: _ClassVar[int]
    P3S_WEIGHT_K_FIELD_NUMBER: _ClassVar[int]
    P3S_INJECTION_LAMBDA_FIELD_NUMBER: _ClassVar[int]
    P3S_REFERENCE_FIELD_NUMBER: _ClassVar[int]
    concept_ids: _containers.RepeatedScalarFieldContainer[str]
    prompt_set: str
    prompts: _containers.RepeatedScalarFieldContainer[str]
    images_per_prompt: int
    seed: int
    steps: int
    guidance_scale: float
    metrics: _containers.RepeatedScalarFieldContainer[str]
    resolution: int
    p3s_weight_schedule: str
    p3s_weight_alpha: float
    p3s_weight_beta: float
    p3s_weight_k: float
    p3s_injection_lambda: float
    p3s_reference: int
    def __init__(self, concept_ids: _Optional[_Iterable[str]] = ..., prompt_set: _Optional[str] = ..., prompts: _Optional[_Iterable[str]] = ..., images_per_prompt: _Optional[int] = ..., seed: _Optional[int] = ..., steps: _Optional[int] = ..., guidance_scale: _Optional[float] = ..., metrics: _Optional[_Iterable[str]] = ..., resolution: _Optional[int] = ..., p3s_weight_schedule: _Optional[str] = ..., p3s_weight_alpha: _Optional[float] = ..., p3s_weight_beta: _Optional[float] = ..., p3s_weight_k: _Optional[float] = ..., p3s_injection_lambda: _Optional[float] = ..., p3s_reference: _Optional[int] = ...) -> None: ...

class GetReportRequest(_message.Message):
    __slots__ = ("job_id",)
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    job_id: str
    def __init__(self, job_id: _Optional[str] = ...) -> None: ...

class MetricValue(_message.Message):
    __slots__ = ("concept_id", "metric", "value", "source")
    CONCEPT_ID_FIELD_NUMBER: _ClassVar[int]
    METRIC_FIELD_NUMBER: _ClassVar[int]
    VALUE_FIELD_NUMBER: _ClassVar[int]
    SOURCE_FIELD_NUMBER: _ClassVar[int]
    concept_id: str
    metric: str
    value: float
    source: str
    def __init__(self, concept_id: _Optional[str] = ..., metric: _Optional[str] = ..., value: _Optional[float] = ..., source: _Optional[str] = ...) -> None: ...

class Report(_message.Message):
    __slots__ = ("job_id", "concept_ids", "metrics", "html_artifact_id", "json_artifact_id", "csv_artifact_id", "images", "seconds")
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    CONCEPT_IDS_FIELD_NUMBER: _ClassVar[int]
    METRICS_FIELD_NUMBER: _ClassVar[int]
    HTML_ARTIFACT_ID_FIELD_NUMBER: _ClassVar[int]
    JSON_ARTIFACT_ID_FIELD_NUMBER: _ClassVar[int]
    CSV_ARTIFACT_ID_FIELD_NUMBER: _ClassVar[int]
    IMAGES_FIELD_NUMBER: _ClassVar[int]
    SECONDS_FIELD_NUMBER: _ClassVar[int]
    job_id: str
    concept_ids: _containers.RepeatedScalarFieldContainer[str]
    metrics: _containers.RepeatedCompositeFieldContainer[MetricValue]
    html_artifact_id: str
    json_artifact_id: str
    csv_artifact_id: str
    images: int
    seconds: float
    def __init__(self, job_id: _Optional[str] = ..., concept_ids: _Optional[_Iterable[str]] = ..., metrics: _Optional[_Iterable[_Union[MetricValue, _Mapping]]] = ..., html_artifact_id: _Optional[str] = ..., json_artifact_id: _Optional[str] = ..., csv_artifact_id: _Optional[str] = ..., images: _Optional[int] = ..., seconds: _Optional[float] = ...) -> None: ...

class ReadReportFileRequest(_message.Message):
    __slots__ = ("job_id", "artifact_id")
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    ARTIFACT_ID_FIELD_NUMBER: _ClassVar[int]
    job_id: str
    artifact_id: str
    def __init__(self, job_id: _Optional[str] = ..., artifact_id: _Optional[str] = ...) -> None: ...

class ReportFileChunk(_message.Message):
    __slots__ = ("offset", "data", "total_size")
    OFFSET_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    TOTAL_SIZE_FIELD_NUMBER: _ClassVar[int]
    offset: int
    data: bytes
    total_size: int
    def __init__(self, offset: _Optional[int] = ..., data: _Optional[bytes] = ..., total_size: _Optional[int] = ...) -> None: ...
