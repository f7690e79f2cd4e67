from pdlb.v1 import common_pb2 as _common_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class TensorDType(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    TENSOR_D_TYPE_UNSPECIFIED: _ClassVar[TensorDType]
    TENSOR_D_TYPE_FLOAT32: _ClassVar[TensorDType]
    TENSOR_D_TYPE_FLOAT16: _ClassVar[TensorDType]
    TENSOR_D_TYPE_BFLOAT16: _ClassVar[TensorDType]
TENSOR_D_TYPE_UNSPECIFIED: TensorDType
TENSOR_D_TYPE_FLOAT32: TensorDType
TENSOR_D_TYPE_FLOAT16: TensorDType
TENSOR_D_TYPE_BFLOAT16: TensorDType

class SchedulerGenerateRequest(_message.Message):
    __slots__ = ("request", "dispatch_seq", "dispatcher_id", "prefill_address", "dp_wave")
    REQUEST_FIELD_NUMBER: _ClassVar[int]
    DISPATCH_SEQ_FIELD_NUMBER: _ClassVar[int]
    DISPATCHER_ID_FIELD_NUMBER: _ClassVar[int]
    PREFILL_ADDRESS_FIELD_NUMBER: _ClassVar[int]
    DP_WAVE_FIELD_NUMBER: _ClassVar[int]
    request: _common_pb2.InferenceRequest
    dispatch_seq: int
    dispatcher_id: str
    prefill_address: str
    dp_wave: int
    def __init__(self, request: _Optional[_Union[_common_pb2.InferenceRequest, _Mapping]] = ..., dispatch_seq: _Optional[int] = ..., dispatcher_id: _Optional[str] = ..., prefill_address: _Optional[str] = ..., dp_wave: _Optional[int] = ...) -> None: ...

class SchedulerGenerateResponse(_message.Message):
    __slots__ = ("request_id", "token_ids", "finish_reason", "prompt_tokens", "cached_tokens", "logprobs")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    FINISH_REASON_FIELD_NUMBER: _ClassVar[int]
    PROMPT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    CACHED_TOKENS_FIELD_NUMBER: _ClassVar[int]
    LOGPROBS_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    token_ids: _containers.RepeatedScalarFieldContainer[int]
    finish_reason: _common_pb2.FinishReason
    prompt_tokens: int
    cached_tokens: int
    logprobs: _containers.RepeatedCompositeFieldContainer[_common_pb2.TokenLogprob]
    def __init__(self, request_id: _Optional[str] = ..., token_ids: _Optional[_Iterable[int]] = ..., finish_reason: _Optional[_Union[_common_pb2.FinishReason, str]] = ..., prompt_tokens: _Optional[int] = ..., cached_tokens: _Optional[int] = ..., logprobs: _Optional[_Iterable[_Union[_common_pb2.TokenLogprob, _Mapping]]] = ...) -> None: ...

class AbortRequest(_message.Message):
    __slots__ = ("request_id",)
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    def __init__(self, request_id: _Optional[str] = ...) -> None: ...

class AbortResponse(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class GetLoadRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class GetLoadResponse(_message.Message):
    __slots__ = ("worker", "load")
    WORKER_FIELD_NUMBER: _ClassVar[int]
    LOAD_FIELD_NUMBER: _ClassVar[int]
    worker: _common_pb2.WorkerInfo
    load: _common_pb2.WorkerLoad
    def __init__(self, worker: _Optional[_Union[_common_pb2.WorkerInfo, _Mapping]] = ..., load: _Optional[_Union[_common_pb2.WorkerLoad, _Mapping]] = ...) -> None: ...

class PullKVRequest(_message.Message):
    __slots__ = ("bootstrap_room", "request_id")
    BOOTSTRAP_ROOM_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    bootstrap_room: int
    request_id: str
    def __init__(self, bootstrap_room: _Optional[int] = ..., request_id: _Optional[str] = ...) -> None: ...

class KVHeader(_message.Message):
    __slots__ = ("input_ids", "first_token_id", "num_layers", "shape", "dtype", "num_chunks", "kv_connector", "kv_transfer_params")
    INPUT_IDS_FIELD_NUMBER: _ClassVar[int]
    FIRST_TOKEN_ID_FIELD_NUMBER: _ClassVar[int]
    NUM_LAYERS_FIELD_NUMBER: _ClassVar[int]
    SHAPE_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    NUM_CHUNKS_FIELD_NUMBER: _ClassVar[int]
    KV_CONNECTOR_FIELD_NUMBER: _ClassVar[int]
    KV_TRANSFER_PARAMS_FIELD_NUMBER: _ClassVar[int]
    input_ids: _containers.RepeatedScalarFieldContainer[int]
    first_token_id: int
    num_layers: int
    shape: _containers.RepeatedScalarFieldContainer[int]
    dtype: TensorDType
    num_chunks: int
    kv_connector: str
    kv_transfer_params: str
    def __init__(self, input_ids: _Optional[_Iterable[int]] = ..., first_token_id: _Optional[int] = ..., num_layers: _Optional[int] = ..., shape: _Optional[_Iterable[int]] = ..., dtype: _Optional[_Union[TensorDType, str]] = ..., num_chunks: _Optional[int] = ..., kv_connector: _Optional[str] = ..., kv_transfer_params: _Optional[str] = ...) -> None: ...

class KVChunk(_message.Message):
    __slots__ = ("layer", "is_value", "offset", "data")
    LAYER_FIELD_NUMBER: _ClassVar[int]
    IS_VALUE_FIELD_NUMBER: _ClassVar[int]
    OFFSET_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    layer: int
    is_value: bool
    offset: int
    data: bytes
    def __init__(self, layer: _Optional[int] = ..., is_value: _Optional[bool] = ..., offset: _Optional[int] = ..., data: _Optional[bytes] = ...) -> None: ...

class PullKVResponse(_message.Message):
    __slots__ = ("header", "chunk")
    HEADER_FIELD_NUMBER: _ClassVar[int]
    CHUNK_FIELD_NUMBER: _ClassVar[int]
    header: KVHeader
    chunk: KVChunk
    def __init__(self, header: _Optional[_Union[KVHeader, _Mapping]] = ..., chunk: _Optional[_Union[KVChunk, _Mapping]] = ...) -> None: ...
