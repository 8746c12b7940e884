import datetime

from google.protobuf import timestamp_pb2 as _timestamp_pb2
from persona.v1 import common_pb2 as _common_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class ImageUpload(_message.Message):
    __slots__ = ("data", "filename")
    DATA_FIELD_NUMBER: _ClassVar[int]
    FILENAME_FIELD_NUMBER: _ClassVar[int]
    data: bytes
    filename: str
    def __init__(self, data: _Optional[bytes] = ..., filename: _Optional[str] = ...) -> None: ...

class SubjectImage(_message.Message):
    __slots__ = ("image_id", "index", "filename", "width", "height", "media_type", "sha256", "size_bytes")
    IMAGE_ID_FIELD_NUMBER: _ClassVar[int]
    INDEX_FIELD_NUMBER: _ClassVar[int]
    FILENAME_FIELD_NUMBER: _ClassVar[int]
    WIDTH_FIELD_NUMBER: _ClassVar[int]
    HEIGHT_FIELD_NUMBER: _ClassVar[int]
    MEDIA_TYPE_FIELD_NUMBER: _ClassVar[int]
    SHA256_FIELD_NUMBER: _ClassVar[int]
    SIZE_BYTES_FIELD_NUMBER: _ClassVar[int]
    image_id: str
    index: int
    filename: str
    width: int
    height: int
    media_type: str
    sha256: str
    size_bytes: int
    def __init__(self, image_id: _Optional[str] = ..., index: _Optional[int] = ..., filename: _Optional[str] = ..., width: _Optional[int] = ..., height: _Optional[int] = ..., media_type: _Optional[str] = ..., sha256: _Optional[str] = ..., size_bytes: _Optional[int] = ...) -> None: ...

class Subject(_message.Message):
    __slots__ = ("subject_id", "class_name", "token", "display_name", "images", "created_at")
    SUBJECT_ID_FIELD_NUMBER: _ClassVar[int]
    CLASS_NAME_FIELD_NUMBER: _ClassVar[int]
    TOKEN_FIELD_NUMBER: _ClassVar[int]
    DISPLAY_NAME_FIELD_NUMBER: _ClassVar[int]
    IMAGES_FIELD_NUMBER: _ClassVar[int]
    CREATED_AT_FIELD_NUMBER: _ClassVar[int]
    subject_id: str
    class_name: str
    token: str
    display_name: str
    images: _containers.RepeatedCompositeFieldContainer[SubjectImage]
    created_at: _timestamp_pb2.Timestamp
    def __init__(self, subject_id: _Optional[str] = ..., class_name: _Optional[str] = ..., token: _Optional[str] = ..., display_name: _Optional[str] = ..., images: _Optional[_Iterable[_Union[SubjectImage, _Mapping]]] = ..., created_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ...) -> None: ...

class CreateSubjectRequest(_message.Message):
    __slots__ = ("class_name", "token", "display_name", "images")
    CLASS_NAME_FIELD_NUMBER: _ClassVar[int]
    TOKEN_FIELD_NUMBER: _ClassVar[int]
    DISPLAY_NAME_FIELD_NUMBER: _ClassVar[int]
    IMAGES_FIELD_NUMBER: _ClassVar[int]
    class_name: str
    token: str
    display_name: str
    images: _containers.RepeatedCompositeFieldContainer[ImageUpload]
    def __init__(self, class_name: _Optional[str] = ..., token: _Optional[str] = ..., display_name: _Optional[str] = ..., images: _Optional[_Iterable[_Union[ImageUpload, _Mapping]]] = ...) -> None: ...

class GetSubjectRequest(_message.Message):
    __slots__ = ("subject_id",)
    SUBJECT_ID_FIELD_NUMBER: _ClassVar[int]
    subject_id: str
    def __init__(self, subject_id: _Optional[str] = ...) -> None: ...

class ListSubjectsRequest(_message.Message):
    __slots__ = ("page",)
    PAGE_FIELD_NUMBER: _ClassVar[int]
    page: _common_pb2.PageRequest
    def __init__(self, page: _Optional[_Union[_common_pb2.PageRequest, _Mapping]] = ...) -> None: ...

class ListSubjectsResponse(_message.Message):
    __slots__ = ("subjects", "page")
    SUBJECTS_FIELD_NUMBER: _ClassVar[int]
    PAGE_FIELD_NUMBER: _ClassVar[int]
    subjects: _containers.RepeatedCompositeFieldContainer[Subject]
    page: _common_pb2.PageResponse
    def __init__(self, subjects: _Optional[_Iterable[_Union[Subject, _Mapping]]] = ..., page: _Optional[_Union[_common_pb2.PageResponse, _Mapping]] = ...) -> None: ...

class DeleteSubjectRequest(_message.Message):
    __slots__ = ("subject_id",)
    SUBJECT_ID_FIELD_NUMBER: _ClassVar[int]
    subject_id: str
    def __init__(self, subject_id: _Optional[str] = ...) -> None: ...

class DeleteSubjectResponse(_message.Message):
    __slots__ = ("subject_id",)
    SUBJECT_ID_FIELD_NUMBER: _ClassVar[int]
    subject_id: str
    def __init__(self, subject_id: _Optional[str] = ...) -> None: ...

class GetSubjectImageRequest(_message.Message):
    __slots__ = ("image",)
    IMAGE_FIELD_NUMBER: _ClassVar[int]
    image: _common_pb2.ImageRef
    def __init__(self, image: _Optional[_Union[_common_pb2.ImageRef, _Mapping]] = ...) -> None: ...

class GetSubjectImageResponse(_message.Message):
    __slots__ = ("image", "data")
    IMAGE_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    image: SubjectImage
    data: bytes
    def __init__(self, image: _Optional[_Union[SubjectImage, _Mapping]] = ..., data: _Optional[bytes] = ...) -> None: ...
