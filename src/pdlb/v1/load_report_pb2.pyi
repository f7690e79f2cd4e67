from pdlb.v1 import common_pb2 as _common_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class ReportRequest(_message.Message):
    __slots__ = ("worker", "incarnation", "load", "acked_dispatch_seq", "timestamp_ms", "dp_group", "kv_events")
    WORKER_FIELD_NUMBER: _ClassVar[int]
    INCARNATION_FIELD_NUMBER: _ClassVar[int]
    LOAD_FIELD_NUMBER: _ClassVar[int]
    ACKED_DISPATCH_SEQ_FIELD_NUMBER: _ClassVar[int]
    TIMESTAMP_MS_FIELD_NUMBER: _ClassVar[int]
    DP_GROUP_FIELD_NUMBER: _ClassVar[int]
    KV_EVENTS_FIELD_NUMBER: _ClassVar[int]
    worker: _common_pb2.WorkerInfo
    incarnation: str
    load: _common_pb2.WorkerLoad
    acked_dispatch_seq: int
    timestamp_ms: int
    dp_group: _common_pb2.DPGroupState
    kv_events: KVEvents
    def __init__(self, worker: _Optional[_Union[_common_pb2.WorkerInfo, _Mapping]] = ..., incarnation: _Optional[str] = ..., load: _Optional[_Union[_common_pb2.WorkerLoad, _Mapping]] = ..., acked_dispatch_seq: _Optional[int] = ..., timestamp_ms: _Optional[int] = ..., dp_group: _Optional[_Union[_common_pb2.DPGroupState, _Mapping]] = ..., kv_events: _Optional[_Union[KVEvents, _Mapping]] = ...) -> None: ...

class KVEvents(_message.Message):
    __slots__ = ("first_seq", "last_seq", "snapshot", "stored", "removed")
    FIRST_SEQ_FIELD_NUMBER: _ClassVar[int]
    LAST_SEQ_FIELD_NUMBER: _ClassVar[int]
    SNAPSHOT_FIELD_NUMBER: _ClassVar[int]
    STORED_FIELD_NUMBER: _ClassVar[int]
    REMOVED_FIELD_NUMBER: _ClassVar[int]
    first_seq: int
    last_seq: int
    snapshot: bool
    stored: _containers.RepeatedScalarFieldContainer[int]
    removed: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, first_seq: _Optional[int] = ..., last_seq: _Optional[int] = ..., snapshot: _Optional[bool] = ..., stored: _Optional[_Iterable[int]] = ..., removed: _Optional[_Iterable[int]] = ...) -> None: ...

class ReportResponse(_message.Message):
    __slots__ = ("dispatcher_id", "report_interval_ms", "start_wave", "want_kv_snapshot")
    DISPATCHER_ID_FIELD_NUMBER: _ClassVar[int]
    REPORT_INTERVAL_MS_FIELD_NUMBER: _ClassVar[int]
    START_WAVE_FIELD_NUMBER: _ClassVar[int]
    WANT_KV_SNAPSHOT_FIELD_NUMBER: _ClassVar[int]
    dispatcher_id: str
    report_interval_ms: int
    start_wave: StartWave
    want_kv_snapshot: bool
    def __init__(self, dispatcher_id: _Optional[str] = ..., report_interval_ms: _Optional[int] = ..., start_wave: _Optional[_Union[StartWave, _Mapping]] = ..., want_kv_snapshot: _Optional[bool] = ...) -> None: ...

class StartWave(_message.Message):
    __slots__ = ("wave", "group_id")
    WAVE_FIELD_NUMBER: _ClassVar[int]
    GROUP_ID_FIELD_NUMBER: _ClassVar[int]
    wave: int
    group_id: str
    def __init__(self, wave: _Optional[int] = ..., group_id: _Optional[str] = ...) -> None: ...
