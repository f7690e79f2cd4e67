from pdlb.v1 import common_pb2 as _common_pb2
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class ReportRequest(_message.Message):
    __slots__ = ("worker", "incarnation", "load", "acked_dispatch_seq", "timestamp_ms", "dp_group")
    WORKER_FIELD_NUMBER: _ClassVar[int]
    INCARNATION_FIELD_NUMBER: _ClassVar[int]
    LOAD_FIELD_NUMBER: _ClassVar[int]
    ACKED_DISPATCH_SEQ_FIELD_NUMBER: _ClassVar[int]
    TIMESTAMP_MS_FIELD_NUMBER: _ClassVar[int]
    DP_GROUP_FIELD_NUMBER: _ClassVar[int]
    worker: _common_pb2.WorkerInfo
    incarnation: str
    load: _common_pb2.WorkerLoad
    acked_dispatch_seq: int
    timestamp_ms: int
    dp_group: _common_pb2.DPGroupState
    def __init__(self, worker: _Optional[_Union[_common_pb2.WorkerInfo, _Mapping]] = ..., incarnation: _Optional[str] = ..., load: _Optional[_Union[_common_pb2.WorkerLoad, _Mapping]] = ..., acked_dispatch_seq: _Optional[int] = ..., timestamp_ms: _Optional[int] = ..., dp_group: _Optional[_Union[_common_pb2.DPGroupState, _Mapping]] = ...) -> None: ...

class ReportResponse(_message.Message):
    __slots__ = ("dispatcher_id", "report_interval_ms", "start_wave")
    DISPATCHER_ID_FIELD_NUMBER: _ClassVar[int]
    REPORT_INTERVAL_MS_FIELD_NUMBER: _ClassVar[int]
    START_WAVE_FIELD_NUMBER: _ClassVar[int]
    dispatcher_id: str
    report_interval_ms: int
    start_wave: StartWave
    def __init__(self, dispatcher_id: _Optional[str] = ..., report_interval_ms: _Optional[int] = ..., start_wave: _Optional[_Union[StartWave, _Mapping]] = ...) -> None: ...

class StartWave(_message.Message):
    __slots__ = ("wave", "group_id")
    WAVE_FIELD_NUMBER: _ClassVar[int]
    GROUP_ID_FIELD_NUMBER: _ClassVar[int]
    wave: int
    group_id: str
    def __init__(self, wave: _Optional[int] = ..., group_id: _Optional[str] = ...) -> None: ...
