from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class TextMaskMethod(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    TEXT_MASK_METHOD_UNSPECIFIED: _ClassVar[TextMaskMethod]
    TEXT_MASK_METHOD_GROUNDED_SAM: _ClassVar[TextMaskMethod]
    TEXT_MASK_METHOD_CLIPSEG: _ClassVar[TextMaskMethod]
TEXT_MASK_METHOD_UNSPECIFIED: TextMaskMethod
TEXT_MASK_METHOD_GROUNDED_SAM: TextMaskMethod
TEXT_MASK_METHOD_CLIPSEG: TextMaskMethod

class Point(_message.Message):
    __slots__ = ("x", "y")
    X_FIELD_NUMBER: _ClassVar[int]
    Y_FIELD_NUMBER: _ClassVar[int]
    x: int
    y: int
    def __init__(self, x: _Optional[int] = ..., y: _Optional[int] = ...) -> None: ...

class MaskFromPointsRequest(_message.Message):
    __slots__ = ("subject_id", "image_id", "positive", "negative", "model")
    SUBJECT_ID_FIELD_NUMBER: _ClassVar[int]
    IMAGE_ID_FIELD_NUMBER: _ClassVar[int]
    POSITIVE_FIELD_NUMBER: _ClassVar[int]
    NEGATIVE_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    subject_id: str
    image_id: str
    positive: _containers.RepeatedCompositeFieldContainer[Point]
    negative: _containers.RepeatedCompositeFieldContainer[Point]
    model: str
    def __init__(self, subject_id: _Optional[str] = ..., image_id: _Optional[str] = ..., positive: _Optional[_Iterable[_Union[Point, _Mapping]]] = ..., negative: _Optional[_Iterable[_Union[Point, _Mapping]]] = ..., model: _Optional[str] = ...) -> None: ...

class MaskFromTextRequest(_message.Message):
    __slots__ = ("subject_id", "image_id", "text", "method")
    SUBJECT_ID_FIELD_NUMBER: _ClassVar[int]
    IMAGE_ID_FIELD_NUMBER: _ClassVar[int]
    TEXT_FIELD_NUMBER: _ClassVar[int]
    METHOD_FIELD_NUMBER: _ClassVar[int]
    subject_id: str
    image_id: str
    text: str
    method: TextMaskMethod
    def __init__(self, subject_id: _Optional[str] = ..., image_id: _Optional[str] = ..., text: _Optional[str] = ..., method: _Optional[_Union[TextMaskMethod, str]] = ...) -> None: ...

class GetMaskRequest(_message.Message):
    __slots__ = ("subject_id", "image_id")
    SUBJECT_ID_FIELD_NUMBER: _ClassVar[int]
    IMAGE_ID_FIELD_NUMBER: _ClassVar[int]
    subject_id: str
    image_id: str
    def __init__(self, subject_id: _Optional[str] = ..., image_id: _Optional[str] = ...) -> None: ...

class Mask(_message.Message):
    __slots__ = ("subject_id", "image_id", "artifact_id", "width", "height", "method", "positive", "negative", "text", "models", "coverage", "created_at", "png")
    SUBJECT_ID_FIELD_NUMBER: _ClassVar[int]
    IMAGE_ID_FIELD_NUMBER: _ClassVar[int]
    ARTIFACT_ID_FIELD_NUMBER: _ClassVar[int]
    WIDTH_FIELD_NUMBER: _ClassVar[int]
    HEIGHT_FIELD_NUMBER: _ClassVar[int]
    METHOD_FIELD_NUMBER: _ClassVar[int]
    POSITIVE_FIELD_NUMBER: _ClassVar[int]
    NEGATIVE_FIELD_NUMBER: _ClassVar[int]
    TEXT_FIELD_NUMBER: _ClassVar[int]
    MODELS_FIELD_NUMBER: _ClassVar[int]
    COVERAGE_FIELD_NUMBER: _ClassVar[int]
    CREATED_AT_FIELD_NUMBER: _ClassVar[int]
    PNG_FIELD_NUMBER: _ClassVar[int]
    subject_id: str
    image_id: str
    artifact_id: str
    width: int
    height: int
    method: str
    positive: _containers.RepeatedCompositeFieldContainer[Point]
    negative: _containers.RepeatedCompositeFieldContainer[Point]
    text: str
    models: _containers.RepeatedScalarFieldContainer[str]
    coverage: float
    created_at: float
    png: bytes
    def __init__(self, subject_id: _Optional[str] = ..., image_id: _Optional[str] = ..., artifact_id: _Optional[str] = ..., width: _Optional[int] = ..., height: _Optional[int] = ..., method: _Optional[str] = ..., positive: _Optional[_Iterable[_Union[Point, _Mapping]]] = ..., negative: _Optional[_Iterable[_Union[Point, _Mapping]]] = ..., text: _Optional[str] = ..., models: _Optional[_Iterable[str]] = ..., coverage: _Optional[float] = ..., created_at: _Optional[float] = ..., png: _Optional[bytes] = ...) -> None: ...

class MaskFromTextResponse(_message.Message):
    __slots__ = ("masks",)
    MASKS_FIELD_NUMBER: _ClassVar[int]
    masks: _containers.RepeatedCompositeFieldContainer[Mask]
    def __init__(self, masks: _Optional[_Iterable[_Union[Mask, _Mapping]]] = ...) -> None: ...
