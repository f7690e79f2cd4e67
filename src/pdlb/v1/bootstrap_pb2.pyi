from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class RoomRecord(_message.Message):
    __slots__ = ("bootstrap_room", "prefill_dp_rank", "prefill_worker_id", "prefill_address", "expires_at_ms")
    BOOTSTRAP_ROOM_FIELD_NUMBER: _ClassVar[int]
    PREFILL_DP_RANK_FIELD_NUMBER: _ClassVar[int]
    PREFILL_WORKER_ID_FIELD_NUMBER: _ClassVar[int]
    PREFILL_ADDRESS_FIELD_NUMBER: _ClassVar[int]
    EXPIRES_AT_MS_FIELD_NUMBER: _ClassVar[int]
    bootstrap_room: int
    prefill_dp_rank: int
    prefill_worker_id: str
    prefill_address: str
    expires_at_ms: int
    def __init__(self, bootstrap_room: _Optional[int] = ..., prefill_dp_rank: _Optional[int] = ..., prefill_worker_id: _Optional[str] = ..., prefill_address: _Optional[str] = ..., expires_at_ms: _Optional[int] = ...) -> None: ...

class RegisterRoomRequest(_message.Message):
    __slots__ = ("record",)
    RECORD_FIELD_NUMBER: _ClassVar[int]
    record: RoomRecord
    def __init__(self, record: _Optional[_Union[RoomRecord, _Mapping]] = ...) -> None: ...

class RegisterRoomResponse(_message.Message):
    __slots__ = ("record", "created")
    RECORD_FIELD_NUMBER: _ClassVar[int]
    CREATED_FIELD_NUMBER: _ClassVar[int]
    record: RoomRecord
    created: bool
    def __init__(self, record: _Optional[_Union[RoomRecord, _Mapping]] = ..., created: _Optional[bool] = ...) -> None: ...

class LookupRoomRequest(_message.Message):
    __slots__ = ("bootstrap_room", "wait_ms")
    BOOTSTRAP_ROOM_FIELD_NUMBER: _ClassVar[int]
    WAIT_MS_FIELD_NUMBER: _ClassVar[int]
    bootstrap_room: int
    wait_ms: int
    def __init__(self, bootstrap_room: _Optional[int] = ..., wait_ms: _Optional[int] = ...) -> None: ...

class LookupRoomResponse(_message.Message):
    __slots__ = ("record",)
    RECORD_FIELD_NUMBER: _ClassVar[int]
    record: RoomRecord
    def __init__(self, record: _Optional[_Union[RoomRecord, _Mapping]] = ...) -> None: ...

class PrefillEndpoint(_message.Message):
    __slots__ = ("worker_id", "dp_rank", "address")
    WORKER_ID_FIELD_NUMBER: _ClassVar[int]
    DP_RANK_FIELD_NUMBER: _ClassVar[int]
    ADDRESS_FIELD_NUMBER: _ClassVar[int]
    worker_id: str
    dp_rank: int
    address: str
    def __init__(self, worker_id: _Optional[str] = ..., dp_rank: _Optional[int] = ..., address: _Optional[str] = ...) -> None: ...

class RegisterPrefillEndpointRequest(_message.Message):
    __slots__ = ("endpoint",)
    ENDPOINT_FIELD_NUMBER: _ClassVar[int]
    endpoint: PrefillEndpoint
    def __init__(self, endpoint: _Optional[_Union[PrefillEndpoint, _Mapping]] = ...) -> None: ...

class RegisterPrefillEndpointResponse(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ListPrefillEndpointsRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ListPrefillEndpointsResponse(_message.Message):
    __slots__ = ("endpoints",)
    ENDPOINTS_FIELD_NUMBER: _ClassVar[int]
    endpoints: _containers.RepeatedCompositeFieldContainer[PrefillEndpoint]
    def __init__(self, endpoints: _Optional[_Iterable[_Union[PrefillEndpoint, _Mapping]]] = ...) -> None: ...
