import datetime

from google.protobuf import struct_pb2 as _struct_pb2
from google.protobuf import timestamp_pb2 as _timestamp_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class JobState(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    JOB_STATE_UNSPECIFIED: _ClassVar[JobState]
    JOB_STATE_QUEUED: _ClassVar[JobState]
    JOB_STATE_RUNNING: _ClassVar[JobState]
    JOB_STATE_SUCCEEDED: _ClassVar[JobState]
    JOB_STATE_FAILED: _ClassVar[JobState]
    JOB_STATE_CANCELLED: _ClassVar[JobState]

class JobEventType(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    JOB_EVENT_TYPE_UNSPECIFIED: _ClassVar[JobEventType]
    JOB_EVENT_TYPE_STATE: _ClassVar[JobEventType]
    JOB_EVENT_TYPE_PROGRESS: _ClassVar[JobEventType]
    JOB_EVENT_TYPE_WARNING: _ClassVar[JobEventType]
    JOB_EVENT_TYPE_LOG: _ClassVar[JobEventType]
JOB_STATE_UNSPECIFIED: JobState
JOB_STATE_QUEUED: JobState
JOB_STATE_RUNNING: JobState
JOB_STATE_SUCCEEDED: JobState
JOB_STATE_FAILED: JobState
JOB_STATE_CANCELLED: JobState
JOB_EVENT_TYPE_UNSPECIFIED: JobEventType
JOB_EVENT_TYPE_STATE: JobEventType
JOB_EVENT_TYPE_PROGRESS: JobEventType
JOB_EVENT_TYPE_WARNING: JobEventType
JOB_EVENT_TYPE_LOG: JobEventType

class PageRequest(_message.Message):
    __slots__ = ("page_size", "page_token")
    PAGE_SIZE_FIELD_NUMBER: _ClassVar[int]
    PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    page_size: int
    page_token: str
    def __init__(self, page_size: _Optional[int] = ..., page_token: _Optional[str] = ...) -> None: ...

class PageResponse(_message.Message):
    __slots__ = ("next_page_token",)
    NEXT_PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    next_page_token: str
    def __init__(self, next_page_token: _Optional[str] = ...) -> None: ...

class ImageRef(_message.Message):
    __slots__ = ("subject_id", "image_id")
    SUBJECT_ID_FIELD_NUMBER: _ClassVar[int]
    IMAGE_ID_FIELD_NUMBER: _ClassVar[int]
    subject_id: str
    image_id: str
    def __init__(self, subject_id: _Optional[str] = ..., image_id: _Optional[str] = ...) -> None: ...

class JobError(_message.Message):
    __slots__ = ("code", "message")
    CODE_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    code: str
    message: str
    def __init__(self, code: _Optional[str] = ..., message: _Optional[str] = ...) -> None: ...

class Job(_message.Message):
    __slots__ = ("job_id", "kind", "state", "progress", "params", "result", "error", "interrupted", "attempts", "created_at", "updated_at", "subject_id", "caption_result", "train_result", "export_result", "evaluate_result", "encoder_train_result")
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    KIND_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    PROGRESS_FIELD_NUMBER: _ClassVar[int]
    PARAMS_FIELD_NUMBER: _ClassVar[int]
    RESULT_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    INTERRUPTED_FIELD_NUMBER: _ClassVar[int]
    ATTEMPTS_FIELD_NUMBER: _ClassVar[int]
    CREATED_AT_FIELD_NUMBER: _ClassVar[int]
    UPDATED_AT_FIELD_NUMBER: _ClassVar[int]
    SUBJECT_ID_FIELD_NUMBER: _ClassVar[int]
    CAPTION_RESULT_FIELD_NUMBER: _ClassVar[int]
    TRAIN_RESULT_FIELD_NUMBER: _ClassVar[int]
    EXPORT_RESULT_FIELD_NUMBER: _ClassVar[int]
    EVALUATE_RESULT_FIELD_NUMBER: _ClassVar[int]
    ENCODER_TRAIN_RESULT_FIELD_NUMBER: _ClassVar[int]
    job_id: str
    kind: str
    state: JobState
    progress: float
    params: _struct_pb2.Struct
    result: _struct_pb2.Struct
    error: JobError
    interrupted: bool
    attempts: int
    created_at: _timestamp_pb2.Timestamp
    updated_at: _timestamp_pb2.Timestamp
    subject_id: str
    caption_result: CaptionJobResult
    train_result: TrainJobResult
    export_result: ExportJobResult
    evaluate_result: EvaluateJobResult
    encoder_train_result: EncoderTrainJobResult
    def __init__(self, job_id: _Optional[str] = ..., kind: _Optional[str] = ..., state: _Optional[_Union[JobState, str]] = ..., progress: _Optional[float] = ..., params: _Optional[_Union[_struct_pb2.Struct, _Mapping]] = ..., result: _Optional[_Union[_struct_pb2.Struct, _Mapping]] = ..., error: _Optional[_Union[JobError, _Mapping]] = ..., interrupted: _Optional[bool] = ..., attempts: _Optional[int] = ..., created_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., updated_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., subject_id: _Optional[str] = ..., caption_result: _Optional[_Union[CaptionJobResult, _Mapping]] = ..., train_result: _Optional[_Union[TrainJobResult, _Mapping]] = ..., export_result: _Optional[_Union[ExportJobResult, _Mapping]] = ..., evaluate_result: _Optional[_Union[EvaluateJobResult, _Mapping]] = ..., encoder_train_result: _Optional[_Union[EncoderTrainJobResult, _Mapping]] = ...) -> None: ...

class CaptionJobResult(_message.Message):
    __slots__ = ("captioned", "failed", "skipped")
    CAPTIONED_FIELD_NUMBER: _ClassVar[int]
    FAILED_FIELD_NUMBER: _ClassVar[int]
    SKIPPED_FIELD_NUMBER: _ClassVar[int]
    captioned: int
    failed: _containers.RepeatedScalarFieldContainer[str]
    skipped: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, captioned: _Optional[int] = ..., failed: _Optional[_Iterable[str]] = ..., skipped: _Optional[_Iterable[str]] = ...) -> None: ...

class TrainJobResult(_message.Message):
    __slots__ = ("concept_id", "steps", "final_loss", "resumed_from_step", "loss_curve", "loss_curve_every", "class_images_generated", "class_images_reused", "stage_seconds")
    class StageSecondsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: float
        def __init__(self, key: _Optional[str] = ..., value: _Optional[float] = ...) -> None: ...
    CONCEPT_ID_FIELD_NUMBER: _ClassVar[int]
    STEPS_FIELD_NUMBER: _ClassVar[int]
    FINAL_LOSS_FIELD_NUMBER: _ClassVar[int]
    RESUMED_FROM_STEP_FIELD_NUMBER: _ClassVar[int]
    LOSS_CURVE_FIELD_NUMBER: _ClassVar[int]
    LOSS_CURVE_EVERY_FIELD_NUMBER: _ClassVar[int]
    CLASS_IMAGES_GENERATED_FIELD_NUMBER: _ClassVar[int]
    CLASS_IMAGES_REUSED_FIELD_NUMBER: _ClassVar[int]
    STAGE_SECONDS_FIELD_NUMBER: _ClassVar[int]
    concept_id: str
    steps: int
    final_loss: float
    resumed_from_step: int
    loss_curve: _containers.RepeatedScalarFieldContainer[float]
    loss_curve_every: int
    class_images_generated: int
    class_images_reused: int
    stage_seconds: _containers.ScalarMap[str, float]
    def __init__(self, concept_id: _Optional[str] = ..., steps: _Optional[int] = ..., final_loss: _Optional[float] = ..., resumed_from_step: _Optional[int] = ..., loss_curve: _Optional[_Iterable[float]] = ..., loss_curve_every: _Optional[int] = ..., class_images_generated: _Optional[int] = ..., class_images_reused: _Optional[int] = ..., stage_seconds: _Optional[_Mapping[str, float]] = ...) -> None: ...

class EncoderTrainJobResult(_message.Message):
    __slots__ = ("encoder_id", "path", "steps", "final_loss", "resumed_from_step", "base_model", "base_model_sha256")
    ENCODER_ID_FIELD_NUMBER: _ClassVar[int]
    PATH_FIELD_NUMBER: _ClassVar[int]
    STEPS_FIELD_NUMBER: _ClassVar[int]
    FINAL_LOSS_FIELD_NUMBER: _ClassVar[int]
    RESUMED_FROM_STEP_FIELD_NUMBER: _ClassVar[int]
    BASE_MODEL_FIELD_NUMBER: _ClassVar[int]
    BASE_MODEL_SHA256_FIELD_NUMBER: _ClassVar[int]
    encoder_id: str
    path: str
    steps: int
    final_loss: float
    resumed_from_step: int
    base_model: str
    base_model_sha256: str
    def __init__(self, encoder_id: _Optional[str] = ..., path: _Optional[str] = ..., steps: _Optional[int] = ..., final_loss: _Optional[float] = ..., resumed_from_step: _Optional[int] = ..., base_model: _Optional[str] = ..., base_model_sha256: _Optional[str] = ...) -> None: ...

class JobFile(_message.Message):
    __slots__ = ("path", "artifact_id", "size_bytes")
    PATH_FIELD_NUMBER: _ClassVar[int]
    ARTIFACT_ID_FIELD_NUMBER: _ClassVar[int]
    SIZE_BYTES_FIELD_NUMBER: _ClassVar[int]
    path: str
    artifact_id: str
    size_bytes: int
    def __init__(self, path: _Optional[str] = ..., artifact_id: _Optional[str] = ..., size_bytes: _Optional[int] = ...) -> None: ...

class ExportJobResult(_message.Message):
    __slots__ = ("concept_id", "format", "fp16", "files")
    CONCEPT_ID_FIELD_NUMBER: _ClassVar[int]
    FORMAT_FIELD_NUMBER: _ClassVar[int]
    FP16_FIELD_NUMBER: _ClassVar[int]
    FILES_FIELD_NUMBER: _ClassVar[int]
    concept_id: str
    format: str
    fp16: bool
    files: _containers.RepeatedCompositeFieldContainer[JobFile]
    def __init__(self, concept_id: _Optional[str] = ..., format: _Optional[str] = ..., fp16: _Optional[bool] = ..., files: _Optional[_Iterable[_Union[JobFile, _Mapping]]] = ...) -> None: ...

class JobMetric(_message.Message):
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

class EvaluateJobResult(_message.Message):
    __slots__ = ("concept_ids", "html_artifact_id", "json_artifact_id", "csv_artifact_id", "images", "seconds", "metrics")
    CONCEPT_IDS_FIELD_NUMBER: _ClassVar[int]
    HTML_ARTIFACT_ID_FIELD_NUMBER: _ClassVar[int]
    JSON_ARTIFACT_ID_FIELD_NUMBER: _ClassVar[int]
    CSV_ARTIFACT_ID_FIELD_NUMBER: _ClassVar[int]
    IMAGES_FIELD_NUMBER: _ClassVar[int]
    SECONDS_FIELD_NUMBER: _ClassVar[int]
    METRICS_FIELD_NUMBER: _ClassVar[int]
    concept_ids: _containers.RepeatedScalarFieldContainer[str]
    html_artifact_id: str
    json_artifact_id: str
    csv_artifact_id: str
    images: int
    seconds: float
    metrics: _containers.RepeatedCompositeFieldContainer[JobMetric]
    def __init__(self, concept_ids: _Optional[_Iterable[str]] = ..., html_artifact_id: _Optional[str] = ..., json_artifact_id: _Optional[str] = ..., csv_artifact_id: _Optional[str] = ..., images: _Optional[int] = ..., seconds: _Optional[float] = ..., metrics: _Optional[_Iterable[_Union[JobMetric, _Mapping]]] = ...) -> None: ...

class JobProgress(_message.Message):
    __slots__ = ("stage", "done", "total", "step", "steps", "losses", "it_per_s", "eta_s", "validation_image_ids", "image_id", "component", "concept_id")
    class LossesEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: float
        def __init__(self, key: _Optional[str] = ..., value: _Optional[float] = ...) -> None: ...
    STAGE_FIELD_NUMBER: _ClassVar[int]
    DONE_FIELD_NUMBER: _ClassVar[int]
    TOTAL_FIELD_NUMBER: _ClassVar[int]
    STEP_FIELD_NUMBER: _ClassVar[int]
    STEPS_FIELD_NUMBER: _ClassVar[int]
    LOSSES_FIELD_NUMBER: _ClassVar[int]
    IT_PER_S_FIELD_NUMBER: _ClassVar[int]
    ETA_S_FIELD_NUMBER: _ClassVar[int]
    VALIDATION_IMAGE_IDS_FIELD_NUMBER: _ClassVar[int]
    IMAGE_ID_FIELD_NUMBER: _ClassVar[int]
    COMPONENT_FIELD_NUMBER: _ClassVar[int]
    CONCEPT_ID_FIELD_NUMBER: _ClassVar[int]
    stage: str
    done: int
    total: int
    step: int
    steps: int
    losses: _containers.ScalarMap[str, float]
    it_per_s: float
    eta_s: float
    validation_image_ids: _containers.RepeatedScalarFieldContainer[str]
    image_id: str
    component: str
    concept_id: str
    def __init__(self, stage: _Optional[str] = ..., done: _Optional[int] = ..., total: _Optional[int] = ..., step: _Optional[int] = ..., steps: _Optional[int] = ..., losses: _Optional[_Mapping[str, float]] = ..., it_per_s: _Optional[float] = ..., eta_s: _Optional[float] = ..., validation_image_ids: _Optional[_Iterable[str]] = ..., image_id: _Optional[str] = ..., component: _Optional[str] = ..., concept_id: _Optional[str] = ...) -> None: ...

class JobEvent(_message.Message):
    __slots__ = ("job_id", "sequence", "type", "state", "progress", "message", "data", "created_at", "details")
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    SEQUENCE_FIELD_NUMBER: _ClassVar[int]
    TYPE_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    PROGRESS_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    CREATED_AT_FIELD_NUMBER: _ClassVar[int]
    DETAILS_FIELD_NUMBER: _ClassVar[int]
    job_id: str
    sequence: int
    type: JobEventType
    state: JobState
    progress: float
    message: str
    data: _struct_pb2.Struct
    created_at: _timestamp_pb2.Timestamp
    details: JobProgress
    def __init__(self, job_id: _Optional[str] = ..., sequence: _Optional[int] = ..., type: _Optional[_Union[JobEventType, str]] = ..., state: _Optional[_Union[JobState, str]] = ..., progress: _Optional[float] = ..., message: _Optional[str] = ..., data: _Optional[_Union[_struct_pb2.Struct, _Mapping]] = ..., created_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., details: _Optional[_Union[JobProgress, _Mapping]] = ...) -> None: ...

class GetJobRequest(_message.Message):
    __slots__ = ("job_id",)
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    job_id: str
    def __init__(self, job_id: _Optional[str] = ...) -> None: ...

class ListJobsRequest(_message.Message):
    __slots__ = ("page", "kind", "subject_id")
    PAGE_FIELD_NUMBER: _ClassVar[int]
    KIND_FIELD_NUMBER: _ClassVar[int]
    SUBJECT_ID_FIELD_NUMBER: _ClassVar[int]
    page: PageRequest
    kind: str
    subject_id: str
    def __init__(self, page: _Optional[_Union[PageRequest, _Mapping]] = ..., kind: _Optional[str] = ..., subject_id: _Optional[str] = ...) -> None: ...

class ListJobsResponse(_message.Message):
    __slots__ = ("jobs", "page")
    JOBS_FIELD_NUMBER: _ClassVar[int]
    PAGE_FIELD_NUMBER: _ClassVar[int]
    jobs: _containers.RepeatedCompositeFieldContainer[Job]
    page: PageResponse
    def __init__(self, jobs: _Optional[_Iterable[_Union[Job, _Mapping]]] = ..., page: _Optional[_Union[PageResponse, _Mapping]] = ...) -> None: ...

class WatchJobRequest(_message.Message):
    __slots__ = ("job_id", "after_sequence")
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    AFTER_SEQUENCE_FIELD_NUMBER: _ClassVar[int]
    job_id: str
    after_sequence: int
    def __init__(self, job_id: _Optional[str] = ..., after_sequence: _Optional[int] = ...) -> None: ...

class CancelJobRequest(_message.Message):
    __slots__ = ("job_id",)
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    job_id: str
    def __init__(self, job_id: _Optional[str] = ...) -> None: ...
