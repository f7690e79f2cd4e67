"""Mapping between the protobuf Role enum and role names used in flags and etcd keys."""

from __future__ import annotations

from pdlb.v1 import common_pb2

ROLE_NAMES = ("mixed", "prefill", "decode")
_TO_PROTO = {
    "mixed": common_pb2.ROLE_MIXED,
    "prefill": common_pb2.ROLE_PREFILL,
    "decode": common_pb2.ROLE_DECODE,
}
_FROM_PROTO = {v: k for k, v in _TO_PROTO.items()}


def role_to_proto(name: str) -> int:
    return _TO_PROTO[name]


def role_from_proto(value: int) -> str | None:
    """The role's name, or None for ROLE_UNSPECIFIED and unknown values."""
    return _FROM_PROTO.get(value)
