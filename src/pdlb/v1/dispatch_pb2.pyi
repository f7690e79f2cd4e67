from pdlb.v1 import common_pb2 as _common_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class MemberState(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    MEMBER_STATE_UNSPECIFIED: _ClassVar[MemberState]
    MEMBER_STATE_LIVE: _ClassVar[MemberState]
    MEMBER_STATE_STALE: _ClassVar[MemberState]
    MEMBER_STATE_GONE: _ClassVar[MemberState]
MEMBER_STATE_UNSPECIFIED: MemberState
MEMBER_STATE_LIVE: MemberState
MEMBER_STATE_STALE: MemberState
MEMBER_STATE_GONE: MemberState

class RouteRequest(_message.Message):
    __slots__ = ("request",)
    REQUEST_FIELD_NUMBER: _ClassVar[int]
    request: _common_pb2.InferenceRequest
    def __init__(self, request: _Optional[_Union[_common_pb2.InferenceRequest, _Mapping]] = ...) -> None: ...

class RouteResponse(_message.Message):
    __slots__ = ("request_id", "dp_rank", "worker", "method", "dispatch_seq", "dispatcher_id", "dp_wave", "predicted_ms")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    DP_RANK_FIELD_NUMBER: _ClassVar[int]
    WORKER_FIELD_NUMBER: _ClassVar[int]
    METHOD_FIELD_NUMBER: _ClassVar[int]
    DISPATCH_SEQ_FIELD_NUMBER: _ClassVar[int]
    DISPATCHER_ID_FIELD_NUMBER: _ClassVar[int]
    DP_WAVE_FIELD_NUMBER: _ClassVar[int]
    PREDICTED_MS_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    dp_rank: int
    worker: _common_pb2.WorkerInfo
    method: str
    dispatch_seq: int
    dispatcher_id: str
    dp_wave: int
    predicted_ms: float
    def __init__(self, request_id: _Optional[str] = ..., dp_rank: _Optional[int] = ..., worker: _Optional[_Union[_common_pb2.WorkerInfo, _Mapping]] = ..., method: _Optional[str] = ..., dispatch_seq: _Optional[int] = ..., dispatcher_id: _Optional[str] = ..., dp_wave: _Optional[int] = ..., predicted_ms: _Optional[float] = ...) -> None: ...

class GenerateRequest(_message.Message):
    __slots__ = ("request",)
    REQUEST_FIELD_NUMBER: _ClassVar[int]
    request: _common_pb2.InferenceRequest
    def __init__(self, request: _Optional[_Union[_common_pb2.InferenceRequest, _Mapping]] = ...) -> None: ...

class GenerateResponse(_message.Message):
    __slots__ = ("request_id", "token_ids", "text", "finish_reason", "dp_rank", "worker_id", "prompt_tokens", "cached_tokens", "predicted_ms", "logprobs")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    TEXT_FIELD_NUMBER: _ClassVar[int]
    FINISH_REASON_FIELD_NUMBER: _ClassVar[int]
    DP_RANK_FIELD_NUMBER: _ClassVar[int]
    WORKER_ID_FIELD_NUMBER: _ClassVar[int]
    PROMPT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    CACHED_TOKENS_FIELD_NUMBER: _ClassVar[int]
    PREDICTED_MS_FIELD_NUMBER: _ClassVar[int]
    LOGPROBS_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    token_ids: _containers.RepeatedScalarFieldContainer[int]
    text: str
    finish_reason: _common_pb2.FinishReason
    dp_rank: int
    worker_id: str
    prompt_tokens: int
    cached_tokens: int
    predicted_ms: float
    logprobs: _containers.RepeatedCompositeFieldContainer[_common_pb2.TokenLogprob]
    def __init__(self, request_id: _Optional[str] = ..., token_ids: _Optional[_Iterable[int]] = ..., text: _Optional[str] = ..., finish_reason: _Optional[_Union[_common_pb2.FinishReason, str]] = ..., dp_rank: _Optional[int] = ..., worker_id: _Optional[str] = ..., prompt_tokens: _Optional[int] = ..., cached_tokens: _Optional[int] = ..., predicted_ms: _Optional[float] = ..., logprobs: _Optional[_Iterable[_Union[_common_pb2.TokenLogprob, _Mapping]]] = ...) -> None: ...

class WatchLoadRequest(_message.Message):
    __slots__ = ("interval_ms",)
    INTERVAL_MS_FIELD_NUMBER: _ClassVar[int]
    interval_ms: int
    def __init__(self, interval_ms: _Optional[int] = ...) -> None: ...

class WorkerLoadEntry(_message.Message):
    __slots__ = ("worker", "reported", "inflight_requests", "inflight_tokens", "report_age_ms", "state", "dispatched_total", "dp_group", "kv_index_blocks")
    WORKER_FIELD_NUMBER: _ClassVar[int]
    REPORTED_FIELD_NUMBER: _ClassVar[int]
    INFLIGHT_REQUESTS_FIELD_NUMBER: _ClassVar[int]
    INFLIGHT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    REPORT_AGE_MS_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    DISPATCHED_TOTAL_FIELD_NUMBER: _ClassVar[int]
    DP_GROUP_FIELD_NUMBER: _ClassVar[int]
    KV_INDEX_BLOCKS_FIELD_NUMBER: _ClassVar[int]
    worker: _common_pb2.WorkerInfo
    reported: _common_pb2.WorkerLoad
    inflight_requests: int
    inflight_tokens: int
    report_age_ms: int
    state: MemberState
    dispatched_total: int
    dp_group: _common_pb2.DPGroupState
    kv_index_blocks: int
    def __init__(self, worker: _Optional[_Union[_common_pb2.WorkerInfo, _Mapping]] = ..., reported: _Optional[_Union[_common_pb2.WorkerLoad, _Mapping]] = ..., inflight_requests: _Optional[int] = ..., inflight_tokens: _Optional[int] = ..., report_age_ms: _Optional[int] = ..., state: _Optional[_Union[MemberState, str]] = ..., dispatched_total: _Optional[int] = ..., dp_group: _Optional[_Union[_common_pb2.DPGroupState, _Mapping]] = ..., kv_index_blocks: _Optional[int] = ...) -> None: ...

class WatchLoadResponse(_message.Message):
    __slots__ = ("timestamp_ms", "role", "method", "workers", "flow")
    TIMESTAMP_MS_FIELD_NUMBER: _ClassVar[int]
    ROLE_FIELD_NUMBER: _ClassVar[int]
    METHOD_FIELD_NUMBER: _ClassVar[int]
    WORKERS_FIELD_NUMBER: _ClassVar[int]
    FLOW_FIELD_NUMBER: _ClassVar[int]
    timestamp_ms: int
    role: _common_pb2.Role
    method: str
    workers: _containers.RepeatedCompositeFieldContainer[WorkerLoadEntry]
    flow: FlowControlState
    def __init__(self, timestamp_ms: _Optional[int] = ..., role: _Optional[_Union[_common_pb2.Role, str]] = ..., method: _Optional[str] = ..., workers: _Optional[_Iterable[_Union[WorkerLoadEntry, _Mapping]]] = ..., flow: _Optional[_Union[FlowControlState, _Mapping]] = ...) -> None: ...

class FlowControlState(_message.Message):
    __slots__ = ("enabled", "queued_requests", "queued_tokens", "tenants", "admitted_total", "shed_total", "wait_p50_ms", "wait_p99_ms", "shed_by_reason")
    class ShedByReasonEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: int
        def __init__(self, key: _Optional[str] = ..., value: _Optional[int] = ...) -> None: ...
    ENABLED_FIELD_NUMBER: _ClassVar[int]
    QUEUED_REQUESTS_FIELD_NUMBER: _ClassVar[int]
    QUEUED_TOKENS_FIELD_NUMBER: _ClassVar[int]
    TENANTS_FIELD_NUMBER: _ClassVar[int]
    ADMITTED_TOTAL_FIELD_NUMBER: _ClassVar[int]
    SHED_TOTAL_FIELD_NUMBER: _ClassVar[int]
    WAIT_P50_MS_FIELD_NUMBER: _ClassVar[int]
    WAIT_P99_MS_FIELD_NUMBER: _ClassVar[int]
    SHED_BY_REASON_FIELD_NUMBER: _ClassVar[int]
    enabled: bool
    queued_requests: int
    queued_tokens: int
    tenants: int
    admitted_total: int
    shed_total: int
    wait_p50_ms: float
    wait_p99_ms: float
    shed_by_reason: _containers.ScalarMap[str, int]
    def __init__(self, enabled: _Optional[bool] = ..., queued_requests: _Optional[int] = ..., queued_tokens: _Optional[int] = ..., tenants: _Optional[int] = ..., admitted_total: _Optional[int] = ..., shed_total: _Optional[int] = ..., wait_p50_ms: _Optional[float] = ..., wait_p99_ms: _Optional[float] = ..., shed_by_reason: _Optional[_Mapping[str, int]] = ...) -> None: ...

class ListWorkersRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ListWorkersResponse(_message.Message):
    __slots__ = ("workers",)
    WORKERS_FIELD_NUMBER: _ClassVar[int]
    workers: _containers.RepeatedCompositeFieldContainer[_common_pb2.WorkerInfo]
    def __init__(self, workers: _Optional[_Iterable[_Union[_common_pb2.WorkerInfo, _Mapping]]] = ...) -> None: ...
