import datetime

from google.protobuf import timestamp_pb2 as _timestamp_pb2
from persona.v1 import common_pb2 as _common_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class ConceptState(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    CONCEPT_STATE_UNSPECIFIED: _ClassVar[ConceptState]
    CONCEPT_STATE_TRAINING: _ClassVar[ConceptState]
    CONCEPT_STATE_READY: _ClassVar[ConceptState]
    CONCEPT_STATE_FAILED: _ClassVar[ConceptState]
    CONCEPT_STATE_CANCELLED: _ClassVar[ConceptState]

class ExportFormat(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    EXPORT_FORMAT_UNSPECIFIED: _ClassVar[ExportFormat]
    EXPORT_FORMAT_DIFFUSERS: _ClassVar[ExportFormat]
    EXPORT_FORMAT_LORA: _ClassVar[ExportFormat]
    EXPORT_FORMAT_KOHYA: _ClassVar[ExportFormat]
    EXPORT_FORMAT_TI: _ClassVar[ExportFormat]
    EXPORT_FORMAT_ONNX: _ClassVar[ExportFormat]
    EXPORT_FORMAT_TENSORRT: _ClassVar[ExportFormat]
    EXPORT_FORMAT_CUSTOM_DIFFUSION: _ClassVar[ExportFormat]
    EXPORT_FORMAT_SVDIFF: _ClassVar[ExportFormat]
CONCEPT_STATE_UNSPECIFIED: ConceptState
CONCEPT_STATE_TRAINING: ConceptState
CONCEPT_STATE_READY: ConceptState
CONCEPT_STATE_FAILED: ConceptState
CONCEPT_STATE_CANCELLED: ConceptState
EXPORT_FORMAT_UNSPECIFIED: ExportFormat
EXPORT_FORMAT_DIFFUSERS: ExportFormat
EXPORT_FORMAT_LORA: ExportFormat
EXPORT_FORMAT_KOHYA: ExportFormat
EXPORT_FORMAT_TI: ExportFormat
EXPORT_FORMAT_ONNX: ExportFormat
EXPORT_FORMAT_TENSORRT: ExportFormat
EXPORT_FORMAT_CUSTOM_DIFFUSION: ExportFormat
EXPORT_FORMAT_SVDIFF: ExportFormat

class TrainingOptions(_message.Message):
    __slots__ = ("steps", "learning_rate", "batch_size", "resolution", "seed", "train_text_encoder", "lora_rank", "lora_alpha", "lora_targets", "initializer_token", "mixed_precision", "gradient_checkpointing", "min_snr_gamma", "lr_scheduler", "lr_warmup_steps", "use_8bit_adam", "prior_loss_weight", "num_class_images", "class_prompt", "checkpoint_every", "validation_every", "validation_prompts", "max_grad_norm", "epochs", "class_image_steps", "unmasked_weight", "spl_weight", "core_emb_weight", "core_attn_weight", "core_variant", "core_rescale_start", "core_rescale_end", "p3s_injection_lambda", "p3s_weight_schedule", "p3s_weight_alpha", "p3s_weight_beta", "p3s_weight_k", "p3s_consistency_weight", "p3s_consistency_layers", "p3s_fill", "p3s_inpainting_model", "class_image_guidance", "p3s_region")
    STEPS_FIELD_NUMBER: _ClassVar[int]
    LEARNING_RATE_FIELD_NUMBER: _ClassVar[int]
    BATCH_SIZE_FIELD_NUMBER: _ClassVar[int]
    RESOLUTION_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    TRAIN_TEXT_ENCODER_FIELD_NUMBER: _ClassVar[int]
    LORA_RANK_FIELD_NUMBER: _ClassVar[int]
    LORA_ALPHA_FIELD_NUMBER: _ClassVar[int]
    LORA_TARGETS_FIELD_NUMBER: _ClassVar[int]
    INITIALIZER_TOKEN_FIELD_NUMBER: _ClassVar[int]
    MIXED_PRECISION_FIELD_NUMBER: _ClassVar[int]
    GRADIENT_CHECKPOINTING_FIELD_NUMBER: _ClassVar[int]
    MIN_SNR_GAMMA_FIELD_NUMBER: _ClassVar[int]
    LR_SCHEDULER_FIELD_NUMBER: _ClassVar[int]
    LR_WARMUP_STEPS_FIELD_NUMBER: _ClassVar[int]
    USE_8BIT_ADAM_FIELD_NUMBER: _ClassVar[int]
    PRIOR_LOSS_WEIGHT_FIELD_NUMBER: _ClassVar[int]
    NUM_CLASS_IMAGES_FIELD_NUMBER: _ClassVar[int]
    CLASS_PROMPT_FIELD_NUMBER: _ClassVar[int]
    CHECKPOINT_EVERY_FIELD_NUMBER: _ClassVar[int]
    VALIDATION_EVERY_FIELD_NUMBER: _ClassVar[int]
    VALIDATION_PROMPTS_FIELD_NUMBER: _ClassVar[int]
    MAX_GRAD_NORM_FIELD_NUMBER: _ClassVar[int]
    EPOCHS_FIELD_NUMBER: _ClassVar[int]
    CLASS_IMAGE_STEPS_FIELD_NUMBER: _ClassVar[int]
    UNMASKED_WEIGHT_FIELD_NUMBER: _ClassVar[int]
    SPL_WEIGHT_FIELD_NUMBER: _ClassVar[int]
    CORE_EMB_WEIGHT_FIELD_NUMBER: _ClassVar[int]
    CORE_ATTN_WEIGHT_FIELD_NUMBER: _ClassVar[int]
    CORE_VARIANT_FIELD_NUMBER: _ClassVar[int]
    CORE_RESCALE_START_FIELD_NUMBER: _ClassVar[int]
    CORE_RESCALE_END_FIELD_NUMBER: _ClassVar[int]
    P3S_INJECTION_LAMBDA_FIELD_NUMBER: _ClassVar[int]
    P3S_WEIGHT_SCHEDULE_FIELD_NUMBER: _ClassVar[int]
    P3S_WEIGHT_ALPHA_FIELD_NUMBER: _ClassVar[int]
    P3S_WEIGHT_BETA_FIELD_NUMBER: _ClassVar[int]
    P3S_WEIGHT_K_FIELD_NUMBER: _ClassVar[int]
    P3S_CONSISTENCY_WEIGHT_FIELD_NUMBER: _ClassVar[int]
    P3S_CONSISTENCY_LAYERS_FIELD_NUMBER: _ClassVar[int]
    P3S_FILL_FIELD_NUMBER: _ClassVar[int]
    P3S_INPAINTING_MODEL_FIELD_NUMBER: _ClassVar[int]
    CLASS_IMAGE_GUIDANCE_FIELD_NUMBER: _ClassVar[int]
    P3S_REGION_FIELD_NUMBER: _ClassVar[int]
    steps: int
    learning_rate: float
    batch_size: int
    resolution: int
    seed: int
    train_text_encoder: bool
    lora_rank: int
    lora_alpha: float
    lora_targets: _containers.RepeatedScalarFieldContainer[str]
    initializer_token: str
    mixed_precision: str
    gradient_checkpointing: bool
    min_snr_gamma: float
    lr_scheduler: str
    lr_warmup_steps: int
    use_8bit_adam: bool
    prior_loss_weight: float
    num_class_images: int
    class_prompt: str
    checkpoint_every: int
    validation_every: int
    validation_prompts: _containers.RepeatedScalarFieldContainer[str]
    max_grad_norm: float
    epochs: int
    class_image_steps: int
    unmasked_weight: float
    spl_weight: float
    core_emb_weight: float
    core_attn_weight: float
    core_variant: str
    core_rescale_start: int
    core_rescale_end: int
    p3s_injection_lambda: float
    p3s_weight_schedule: str
    p3s_weight_alpha: float
    p3s_weight_beta: float
    p3s_weight_k: float
    p3s_consistency_weight: float
    p3s_consistency_layers: str
    p3s_fill: str
    p3s_inpainting_model: str
    class_image_guidance: float
    p3s_region: str
    def __init__(self, steps: _Optional[int] = ..., learning_rate: _Optional[float] = ..., batch_size: _Optional[int] = ..., resolution: _Optional[int] = ..., seed: _Optional[int] = ..., train_text_encoder: _Optional[bool] = ..., lora_rank: _Optional[int] = ..., lora_alpha: _Optional[float] = ..., lora_targets: _Optional[_Iterable[str]] = ..., initializer_token: _Optional[str] = ..., mixed_precision: _Optional[str] = ..., gradient_checkpointing: _Optional[bool] = ..., min_snr_gamma: _Optional[float] = ..., lr_scheduler: _Optional[str] = ..., lr_warmup_steps: _Optional[int] = ..., use_8bit_adam: _Optional[bool] = ..., prior_loss_weight: _Optional[float] = ..., num_class_images: _Optional[int] = ..., class_prompt: _Optional[str] = ..., checkpoint_every: _Optional[int] = ..., validation_every: _Optional[int] = ..., validation_prompts: _Optional[_Iterable[str]] = ..., max_grad_norm: _Optional[float] = ..., epochs: _Optional[int] = ..., class_image_steps: _Optional[int] = ..., unmasked_weight: _Optional[float] = ..., spl_weight: _Optional[float] = ..., core_emb_weight: _Optional[float] = ..., core_attn_weight: _Optional[float] = ..., core_variant: _Optional[str] = ..., core_rescale_start: _Optional[int] = ..., core_rescale_end: _Optional[int] = ..., p3s_injection_lambda: _Optional[float] = ..., p3s_weight_schedule: _Optional[str] = ..., p3s_weight_alpha: _Optional[float] = ..., p3s_weight_beta: _Optional[float] = ..., p3s_weight_k: _Optional[float] = ..., p3s_consistency_weight: _Optional[float] = ..., p3s_consistency_layers: _Optional[str] = ..., p3s_fill: _Optional[str] = ..., p3s_inpainting_model: _Optional[str] = ..., class_image_guidance: _Optional[float] = ..., p3s_region: _Optional[str] = ...) -> None: ...

class StartTrainingRequest(_message.Message):
    __slots__ = ("subject_id", "base_model", "method", "regularizers", "captions", "options", "display_name", "parent_concept_id", "mode", "encoder")
    SUBJECT_ID_FIELD_NUMBER: _ClassVar[int]
    BASE_MODEL_FIELD_NUMBER: _ClassVar[int]
    METHOD_FIELD_NUMBER: _ClassVar[int]
    REGULARIZERS_FIELD_NUMBER: _ClassVar[int]
    CAPTIONS_FIELD_NUMBER: _ClassVar[int]
    OPTIONS_FIELD_NUMBER: _ClassVar[int]
    DISPLAY_NAME_FIELD_NUMBER: _ClassVar[int]
    PARENT_CONCEPT_ID_FIELD_NUMBER: _ClassVar[int]
    MODE_FIELD_NUMBER: _ClassVar[int]
    ENCODER_FIELD_NUMBER: _ClassVar[int]
    subject_id: str
    base_model: str
    method: str
    regularizers: _containers.RepeatedScalarFieldContainer[str]
    captions: str
    options: TrainingOptions
    display_name: str
    parent_concept_id: str
    mode: str
    encoder: str
    def __init__(self, subject_id: _Optional[str] = ..., base_model: _Optional[str] = ..., method: _Optional[str] = ..., regularizers: _Optional[_Iterable[str]] = ..., captions: _Optional[str] = ..., options: _Optional[_Union[TrainingOptions, _Mapping]] = ..., display_name: _Optional[str] = ..., parent_concept_id: _Optional[str] = ..., mode: _Optional[str] = ..., encoder: _Optional[str] = ...) -> None: ...

class TrainingCaption(_message.Message):
    __slots__ = ("image", "text", "source")
    IMAGE_FIELD_NUMBER: _ClassVar[int]
    TEXT_FIELD_NUMBER: _ClassVar[int]
    SOURCE_FIELD_NUMBER: _ClassVar[int]
    image: _common_pb2.ImageRef
    text: str
    source: str
    def __init__(self, image: _Optional[_Union[_common_pb2.ImageRef, _Mapping]] = ..., text: _Optional[str] = ..., source: _Optional[str] = ...) -> None: ...

class ConceptFile(_message.Message):
    __slots__ = ("path", "artifact_id", "size_bytes")
    PATH_FIELD_NUMBER: _ClassVar[int]
    ARTIFACT_ID_FIELD_NUMBER: _ClassVar[int]
    SIZE_BYTES_FIELD_NUMBER: _ClassVar[int]
    path: str
    artifact_id: str
    size_bytes: int
    def __init__(self, path: _Optional[str] = ..., artifact_id: _Optional[str] = ..., size_bytes: _Optional[int] = ...) -> None: ...

class ValidationImage(_message.Message):
    __slots__ = ("step", "prompt", "artifact_id")
    STEP_FIELD_NUMBER: _ClassVar[int]
    PROMPT_FIELD_NUMBER: _ClassVar[int]
    ARTIFACT_ID_FIELD_NUMBER: _ClassVar[int]
    step: int
    prompt: str
    artifact_id: str
    def __init__(self, step: _Optional[int] = ..., prompt: _Optional[str] = ..., artifact_id: _Optional[str] = ...) -> None: ...

class Concept(_message.Message):
    __slots__ = ("concept_id", "subject_id", "token", "class_name", "display_name", "state", "job_id", "base_model", "base_model_sha256", "base_model_family", "method", "regularizers", "captions", "options", "training_captions", "steps_done", "final_loss", "files", "validation_images", "parent_concept_id", "persona_version", "resolution", "created_at", "updated_at", "encoder")
    CONCEPT_ID_FIELD_NUMBER: _ClassVar[int]
    SUBJECT_ID_FIELD_NUMBER: _ClassVar[int]
    TOKEN_FIELD_NUMBER: _ClassVar[int]
    CLASS_NAME_FIELD_NUMBER: _ClassVar[int]
    DISPLAY_NAME_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    BASE_MODEL_FIELD_NUMBER: _ClassVar[int]
    BASE_MODEL_SHA256_FIELD_NUMBER: _ClassVar[int]
    BASE_MODEL_FAMILY_FIELD_NUMBER: _ClassVar[int]
    METHOD_FIELD_NUMBER: _ClassVar[int]
    REGULARIZERS_FIELD_NUMBER: _ClassVar[int]
    CAPTIONS_FIELD_NUMBER: _ClassVar[int]
    OPTIONS_FIELD_NUMBER: _ClassVar[int]
    TRAINING_CAPTIONS_FIELD_NUMBER: _ClassVar[int]
    STEPS_DONE_FIELD_NUMBER: _ClassVar[int]
    FINAL_LOSS_FIELD_NUMBER: _ClassVar[int]
    FILES_FIELD_NUMBER: _ClassVar[int]
    VALIDATION_IMAGES_FIELD_NUMBER: _ClassVar[int]
    PARENT_CONCEPT_ID_FIELD_NUMBER: _ClassVar[int]
    PERSONA_VERSION_FIELD_NUMBER: _ClassVar[int]
    RESOLUTION_FIELD_NUMBER: _ClassVar[int]
    CREATED_AT_FIELD_NUMBER: _ClassVar[int]
    UPDATED_AT_FIELD_NUMBER: _ClassVar[int]
    ENCODER_FIELD_NUMBER: _ClassVar[int]
    concept_id: str
    subject_id: str
    token: str
    class_name: str
    display_name: str
    state: ConceptState
    job_id: str
    base_model: str
    base_model_sha256: str
    base_model_family: str
    method: str
    regularizers: _containers.RepeatedScalarFieldContainer[str]
    captions: str
    options: TrainingOptions
    training_captions: _containers.RepeatedCompositeFieldContainer[TrainingCaption]
    steps_done: int
    final_loss: float
    files: _containers.RepeatedCompositeFieldContainer[ConceptFile]
    validation_images: _containers.RepeatedCompositeFieldContainer[ValidationImage]
    parent_concept_id: str
    persona_version: str
    resolution: int
    created_at: _timestamp_pb2.Timestamp
    updated_at: _timestamp_pb2.Timestamp
    encoder: str
    def __init__(self, concept_id: _Optional[str] = ..., subject_id: _Optional[str] = ..., token: _Optional[str] = ..., class_name: _Optional[str] = ..., display_name: _Optional[str] = ..., state: _Optional[_Union[ConceptState, str]] = ..., job_id: _Optional[str] = ..., base_model: _Optional[str] = ..., base_model_sha256: _Optional[str] = ..., base_model_family: _Optional[str] = ..., method: _Optional[str] = ..., regularizers: _Optional[_Iterable[str]] = ..., captions: _Optional[str] = ..., options: _Optional[_Union[TrainingOptions, _Mapping]] = ..., training_captions: _Optional[_Iterable[_Union[TrainingCaption, _Mapping]]] = ..., steps_done: _Optional[int] = ..., final_loss: _Optional[float] = ..., files: _Optional[_Iterable[_Union[ConceptFile, _Mapping]]] = ..., validation_images: _Optional[_Iterable[_Union[ValidationImage, _Mapping]]] = ..., parent_concept_id: _Optional[str] = ..., persona_version: _Optional[str] = ..., resolution: _Optional[int] = ..., created_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., updated_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., encoder: _Optional[str] = ...) -> None: ...

class GetConceptRequest(_message.Message):
    __slots__ = ("concept_id",)
    CONCEPT_ID_FIELD_NUMBER: _ClassVar[int]
    concept_id: str
    def __init__(self, concept_id: _Optional[str] = ...) -> None: ...

class ListConceptsRequest(_message.Message):
    __slots__ = ("page", "subject_id")
    PAGE_FIELD_NUMBER: _ClassVar[int]
    SUBJECT_ID_FIELD_NUMBER: _ClassVar[int]
    page: _common_pb2.PageRequest
    subject_id: str
    def __init__(self, page: _Optional[_Union[_common_pb2.PageRequest, _Mapping]] = ..., subject_id: _Optional[str] = ...) -> None: ...

class ListConceptsResponse(_message.Message):
    __slots__ = ("concepts", "page")
    CONCEPTS_FIELD_NUMBER: _ClassVar[int]
    PAGE_FIELD_NUMBER: _ClassVar[int]
    concepts: _containers.RepeatedCompositeFieldContainer[Concept]
    page: _common_pb2.PageResponse
    def __init__(self, concepts: _Optional[_Iterable[_Union[Concept, _Mapping]]] = ..., page: _Optional[_Union[_common_pb2.PageResponse, _Mapping]] = ...) -> None: ...

class DeleteConceptRequest(_message.Message):
    __slots__ = ("concept_id",)
    CONCEPT_ID_FIELD_NUMBER: _ClassVar[int]
    concept_id: str
    def __init__(self, concept_id: _Optional[str] = ...) -> None: ...

class DeleteConceptResponse(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ExportConceptRequest(_message.Message):
    __slots__ = ("concept_id", "format", "fp16")
    CONCEPT_ID_FIELD_NUMBER: _ClassVar[int]
    FORMAT_FIELD_NUMBER: _ClassVar[int]
    FP16_FIELD_NUMBER: _ClassVar[int]
    concept_id: str
    format: ExportFormat
    fp16: bool
    def __init__(self, concept_id: _Optional[str] = ..., format: _Optional[_Union[ExportFormat, str]] = ..., fp16: _Optional[bool] = ...) -> None: ...

class ConceptExport(_message.Message):
    __slots__ = ("concept_id", "format", "files", "fp16")
    CONCEPT_ID_FIELD_NUMBER: _ClassVar[int]
    FORMAT_FIELD_NUMBER: _ClassVar[int]
    FILES_FIELD_NUMBER: _ClassVar[int]
    FP16_FIELD_NUMBER: _ClassVar[int]
    concept_id: str
    format: ExportFormat
    files: _containers.RepeatedCompositeFieldContainer[ConceptFile]
    fp16: bool
    def __init__(self, concept_id: _Optional[str] = ..., format: _Optional[_Union[ExportFormat, str]] = ..., files: _Optional[_Iterable[_Union[ConceptFile, _Mapping]]] = ..., fp16: _Optional[bool] = ...) -> None: ...

class ReadConceptFileRequest(_message.Message):
    __slots__ = ("concept_id", "artifact_id")
    CONCEPT_ID_FIELD_NUMBER: _ClassVar[int]
    ARTIFACT_ID_FIELD_NUMBER: _ClassVar[int]
    concept_id: str
    artifact_id: str
    def __init__(self, concept_id: _Optional[str] = ..., artifact_id: _Optional[str] = ...) -> None: ...

class FileChunk(_message.Message):
    __slots__ = ("offset", "data", "total_size")
    OFFSET_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    TOTAL_SIZE_FIELD_NUMBER: _ClassVar[int]
    offset: int
    data: bytes
    total_size: int
    def __init__(self, offset: _Optional[int] = ..., data: _Optional[bytes] = ..., total_size: _Optional[int] = ...) -> None: ...

class StartEncoderTrainingRequest(_message.Message):
    __slots__ = ("dataset", "base_model", "image_encoder", "steps", "learning_rate", "batch_size", "seed", "no_textual_qformer", "no_cscl", "no_macl", "checkpoint_every")
    DATASET_FIELD_NUMBER: _ClassVar[int]
    BASE_MODEL_FIELD_NUMBER: _ClassVar[int]
    IMAGE_ENCODER_FIELD_NUMBER: _ClassVar[int]
    STEPS_FIELD_NUMBER: _ClassVar[int]
    LEARNING_RATE_FIELD_NUMBER: _ClassVar[int]
    BATCH_SIZE_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    NO_TEXTUAL_QFORMER_FIELD_NUMBER: _ClassVar[int]
    NO_CSCL_FIELD_NUMBER: _ClassVar[int]
    NO_MACL_FIELD_NUMBER: _ClassVar[int]
    CHECKPOINT_EVERY_FIELD_NUMBER: _ClassVar[int]
    dataset: str
    base_model: str
    image_encoder: str
    steps: int
    learning_rate: float
    batch_size: int
    seed: int
    no_textual_qformer: bool
    no_cscl: bool
    no_macl: bool
    checkpoint_every: int
    def __init__(self, dataset: _Optional[str] = ..., base_model: _Optional[str] = ..., image_encoder: _Optional[str] = ..., steps: _Optional[int] = ..., learning_rate: _Optional[float] = ..., batch_size: _Optional[int] = ..., seed: _Optional[int] = ..., no_textual_qformer: _Optional[bool] = ..., no_cscl: _Optional[bool] = ..., no_macl: _Optional[bool] = ..., checkpoint_every: _Optional[int] = ...) -> None: ...
