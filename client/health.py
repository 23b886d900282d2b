"""The standard gRPC health check (grpc.health.v1.Health/Check), without its stubs.

grpcio-health-checking belongs to the worker extra; a client-only install has grpcio
and protobuf but not those stubs. The two messages are one field each, so they are
written and read here by hand (protobuf wire format: field 1, a string out, an enum back).
"""

from __future__ import annotations

CHECK_METHOD = "/grpc.health.v1.Health/Check"

# grpc.health.v1.HealthCheckResponse.ServingStatus, by number.
STATUS_NAMES = {0: "UNKNOWN", 1: "SERVING", 2: "NOT_SERVING", 3: "SERVICE_UNKNOWN"}


def _varint(value: int) -> bytes:
    out = bytearray()
    while True:
        byte = value & 0x7F
        value >>= 7
        if value:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def _read_varint(data: bytes, pos: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        if pos >= len(data) or shift > 63:
            raise ValueError("truncated varint in a health check reply")
        byte = data[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        shift += 7
        if not byte & 0x80:
            return value, pos


def encode_request(service: str = "") -> bytes:
    """A HealthCheckRequest for `service` ("" is the whole server)."""
    if not service:
        return b""  # proto3: the default value is not written
    name = service.encode("utf-8")
    return b"\x0a" + _varint(len(name)) + name


def decode_status(data: bytes) -> str:
    """The ServingStatus name in a HealthCheckResponse ("UNKNOWN" when absent);
    ValueError if the bytes are not one."""
    status, pos = 0, 0
    while pos < len(data):
        key, pos = _read_varint(data, pos)
        field, wire_type = key >> 3, key & 7
        if wire_type == 0:
            value, pos = _read_varint(data, pos)
            if field == 1:
                status = value
        elif wire_type == 2:  # a length-delimited field a newer server may add: skip it
            length, pos = _read_varint(data, pos)
            pos += length
        elif wire_type in (1, 5):
            pos += 8 if wire_type == 1 else 4
        else:
            raise ValueError(f"unexpected wire type {wire_type} in a health check reply")
        if pos > len(data):
            raise ValueError("truncated health check reply")
    return STATUS_NAMES.get(status, f"STATUS_{status}")
