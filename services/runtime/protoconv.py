"""Small conversions between domain values and protobuf types shared by every servicer."""
from __future__ import annotations

from google.protobuf import struct_pb2, timestamp_pb2


def timestamp(seconds: float) -> timestamp_pb2.Timestamp:
    ts = timestamp_pb2.Timestamp()
    ts.FromNanoseconds(int(seconds * 1e9))
    return ts


def struct(data: dict) -> struct_pb2.Struct:
    message = struct_pb2.Struct()
    message.update(data or {})
    return message
