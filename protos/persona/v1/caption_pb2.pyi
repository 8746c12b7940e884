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

class DescriptionCase(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    DESCRIPTION_CASE_UNSPECIFIED: _ClassVar[DescriptionCase]
    DESCRIPTION_CASE_1: _ClassVar[DescriptionCase]
    DESCRIPTION_CASE_2: _ClassVar[DescriptionCase]
    DESCRIPTION_CASE_3: _ClassVar[DescriptionCase]
    DESCRIPTION_CASE_4: _ClassVar[DescriptionCase]

class CaptionMode(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    CAPTION_MODE_UNSPECIFIED: _ClassVar[CaptionMode]
    CAPTION_MODE_OBJECT: _ClassVar[CaptionMode]
    CAPTION_MODE_STYLE: _ClassVar[CaptionMode]
    CAPTION_MODE_EXPRESSION: _ClassVar[CaptionMode]

class CaptionSource(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    CAPTION_SOURCE_UNSPECIFIED: _ClassVar[CaptionSource]
    CAPTION_SOURCE_TEMPLATE: _ClassVar[CaptionSource]
    CAPTION_SOURCE_VLM: _ClassVar[CaptionSource]
    CAPTION_SOURCE_USER: _ClassVar[CaptionSource]
DESCRIPTION_CASE_UNSPECIFIED: DescriptionCase
DESCRIPTION_CASE_1: DescriptionCase
DESCRIPTION_CASE_2: DescriptionCase
DESCRIPTION_CASE_3: DescriptionCase
DESCRIPTION_CASE_4: DescriptionCase
CAPTION_MODE_UNSPECIFIED: CaptionMode
CAPTION_MODE_OBJECT: CaptionMode
CAPTION_MODE_STYLE: CaptionMode
CAPTION_MODE_EXPRESSION: CaptionMode
CAPTION_SOURCE_UNSPECIFIED: CaptionSource
CAPTION_SOURCE_TEMPLATE: CaptionSource
CAPTION_SOURCE_VLM: CaptionSource
CAPTION_SOURCE_USER: CaptionSource

class Caption(_message.Message):
    __slots__ = ("image", "text", "case", "mode", "source", "instruction_version", "model", "attempts", "failure", "updated_at")
    IMAGE_FIELD_NUMBER: _ClassVar[int]
    TEXT_FIELD_NUMBER: _ClassVar[int]
    CASE_FIELD_NUMBER: _ClassVar[int]
    MODE_FIELD_NUMBER: _ClassVar[int]
    SOURCE_FIELD_NUMBER: _ClassVar[int]
    INSTRUCTION_VERSION_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    ATTEMPTS_FIELD_NUMBER: _ClassVar[int]
    FAILURE_FIELD_NUMBER: _ClassVar[int]
    UPDATED_AT_FIELD_NUMBER: _ClassVar[int]
    image: _common_pb2.ImageRef
    text: str
    case: DescriptionCase
    mode: CaptionMode
    source: CaptionSource
    instruction_version: str
    model: str
    attempts: int
    failure: str
    updated_at: _timestamp_pb2.Timestamp
    def __init__(self, image: _Optional[_Union[_common_pb2.ImageRef, _Mapping]] = ..., text: _Optional[str] = ..., case: _Optional[_Union[DescriptionCase, str]] = ..., mode: _Optional[_Union[CaptionMode, str]] = ..., source: _Optional[_Union[CaptionSource, str]] = ..., instruction_version: _Optional[str] = ..., model: _Optional[str] = ..., attempts: _Optional[int] = ..., failure: _Optional[str] = ..., updated_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ...) -> None: ...

class StartCaptioningRequest(_message.Message):
    __slots__ = ("subject_id", "case", "mode", "image_ids", "overwrite_user_captions")
    SUBJECT_ID_FIELD_NUMBER: _ClassVar[int]
    CASE_FIELD_NUMBER: _ClassVar[int]
    MODE_FIELD_NUMBER: _ClassVar[int]
    IMAGE_IDS_FIELD_NUMBER: _ClassVar[int]
    OVERWRITE_USER_CAPTIONS_FIELD_NUMBER: _ClassVar[int]
    subject_id: str
    case: DescriptionCase
    mode: CaptionMode
    image_ids: _containers.RepeatedScalarFieldContainer[str]
    overwrite_user_captions: bool
    def __init__(self, subject_id: _Optional[str] = ..., case: _Optional[_Union[DescriptionCase, str]] = ..., mode: _Optional[_Union[CaptionMode, str]] = ..., image_ids: _Optional[_Iterable[str]] = ..., overwrite_user_captions: _Optional[bool] = ...) -> None: ...

class ListCaptionsRequest(_message.Message):
    __slots__ = ("subject_id",)
    SUBJECT_ID_FIELD_NUMBER: _ClassVar[int]
    subject_id: str
    def __init__(self, subject_id: _Optional[str] = ...) -> None: ...

class ListCaptionsResponse(_message.Message):
    __slots__ = ("captions",)
    CAPTIONS_FIELD_NUMBER: _ClassVar[int]
    captions: _containers.RepeatedCompositeFieldContainer[Caption]
    def __init__(self, captions: _Optional[_Iterable[_Union[Caption, _Mapping]]] = ...) -> None: ...

class GetCaptionRequest(_message.Message):
    __slots__ = ("image",)
    IMAGE_FIELD_NUMBER: _ClassVar[int]
    image: _common_pb2.ImageRef
    def __init__(self, image: _Optional[_Union[_common_pb2.ImageRef, _Mapping]] = ...) -> None: ...

class SetCaptionRequest(_message.Message):
    __slots__ = ("image", "text")
    IMAGE_FIELD_NUMBER: _ClassVar[int]
    TEXT_FIELD_NUMBER: _ClassVar[int]
    image: _common_pb2.ImageRef
    text: str
    def __init__(self, image: _Optional[_Union[_common_pb2.ImageRef, _Mapping]] = ..., text: _Optional[str] = ...) -> None: ...
