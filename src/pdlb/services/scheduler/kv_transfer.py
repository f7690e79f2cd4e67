"""PD KV hand-off: a prefill worker's held KV as a PullKV stream, and its reassembly on decode.

Each layer's K and V travel as [num_heads, seq_len, head_dim] tensors (the documented wire shape),
split into chunks of at most CHUNK_BYTES raw little-endian bytes. Engines that move KV through
their own connector (vLLM) send the header alone, naming the connector and the decode request's
`kv_transfer_params` (JSON, at most MAX_TRANSFER_PARAMS_BYTES).
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Iterator

import numpy as np
import torch

from pdlb.common.plurals import counted
from pdlb.v1 import scheduler_pb2 as pb

CHUNK_BYTES = 1 << 20
# K and V of one token over all layers; far above any dense model's (Llama 3 405B: about 0.5 MiB),
# it bounds what a malformed header can make the decode side allocate
MAX_KV_BYTES_PER_TOKEN = 1 << 22
MAX_TRANSFER_PARAMS_BYTES = 64 << 10  # a connector's kv_transfer_params (NIXL's: block ids, host, port)
_DTYPES = {
    torch.float32: pb.TENSOR_D_TYPE_FLOAT32,
    torch.float16: pb.TENSOR_D_TYPE_FLOAT16,
    torch.bfloat16: pb.TENSOR_D_TYPE_BFLOAT16,
}
_FROM_WIRE = {v: k for k, v in _DTYPES.items()}


class TransferError(Exception):
    """The stream was malformed or incomplete."""


def encode_kv(prompt: list[int], first_token: int, k: torch.Tensor, v: torch.Tensor) -> Iterator[pb.PullKVResponse]:
    """k, v: [num_layers, seq_len, num_heads, head_dim] on the CPU."""
    layers, seq_len, heads, head_dim = k.shape
    per_tensor = [
        (layer, is_value, _wire_bytes(t[layer])) for layer in range(layers) for is_value, t in ((False, k), (True, v))
    ]
    num_chunks = sum(max(1, -(-len(data) // CHUNK_BYTES)) for _, _, data in per_tensor)
    yield pb.PullKVResponse(
        header=pb.KVHeader(
            input_ids=prompt,
            first_token_id=first_token,
            num_layers=layers,
            shape=[heads, seq_len, head_dim],
            dtype=_DTYPES[k.dtype],
            num_chunks=num_chunks,
        )
    )
    for layer, is_value, data in per_tensor:
        for offset in range(0, max(len(data), 1), CHUNK_BYTES):
            yield pb.PullKVResponse(
                chunk=pb.KVChunk(
                    layer=layer, is_value=is_value, offset=offset, data=data[offset : offset + CHUNK_BYTES]
                )
            )


def encode_connector(prompt: list[int], first_token: int, connector: str, params: dict | None) -> pb.PullKVResponse:
    """The one message of a hand-off whose KV went through the engines' own `connector`: the
    header, with `params` (the prefill's kv_transfer_params) as JSON."""
    return pb.PullKVResponse(
        header=pb.KVHeader(
            input_ids=prompt,
            first_token_id=first_token,
            kv_connector=connector,
            kv_transfer_params=json.dumps(params) if params is not None else "",
        )
    )


def transfer_params(header: pb.KVHeader) -> dict | None:
    """The kv_transfer_params of a connector hand-off's header (None: the connector returned none);
    raises TransferError when they are not a JSON object."""
    if not header.kv_transfer_params:
        return None
    if len(header.kv_transfer_params) > MAX_TRANSFER_PARAMS_BYTES:
        raise TransferError(
            f"kv_transfer_params of {len(header.kv_transfer_params)} bytes (at most {MAX_TRANSFER_PARAMS_BYTES})"
        )
    try:
        params = json.loads(header.kv_transfer_params)
    except ValueError as exc:
        raise TransferError(f"kv_transfer_params are not JSON: {exc}") from None
    if not isinstance(params, dict):
        raise TransferError("kv_transfer_params are not a JSON object")
    return params


def _wire_bytes(layer_tensor: torch.Tensor) -> bytes:
    # Reinterpret as bytes (works for bfloat16, which numpy lacks).
    return layer_tensor.transpose(0, 1).contiguous().view(torch.uint8).numpy().tobytes()


async def decode_kv(
    stream: AsyncIterator[pb.PullKVResponse],
) -> tuple[pb.KVHeader, torch.Tensor | None, torch.Tensor | None]:
    """Reassemble (header, k, v) with k, v shaped [num_layers, seq_len, num_heads, head_dim] (views of
    one buffer that every chunk is copied into once, at its place). A connector hand-off (the
    header names `kv_connector`) has no tensors: (header, None, None)."""
    header: pb.KVHeader | None = None
    buffer: np.ndarray | None = None
    received: dict[tuple[int, bool], int] = {}
    per_tensor = chunks = 0
    async for message in stream:
        if message.HasField("header"):
            if header is not None:
                raise TransferError("KV stream sent a second header")
            header = message.header
            if header.kv_connector:
                transfer_params(header)  # checked here, before the decode request is sent
                continue
            per_tensor = _check_header(header)
            buffer = np.empty(2 * header.num_layers * per_tensor, dtype=np.uint8)
            continue
        if header is not None and header.kv_connector:
            raise TransferError(f"KV stream sent a chunk after a {header.kv_connector} hand-off's header")
        if header is None or buffer is None:
            raise TransferError("KV stream sent a chunk before its header")
        chunk = message.chunk
        if chunk.layer >= header.num_layers:
            raise TransferError(f"KV chunk for layer {chunk.layer} of {header.num_layers}")
        key = (chunk.layer, chunk.is_value)
        done = received.get(key, 0)
        if chunk.offset != done:
            raise TransferError(f"KV chunk at offset {chunk.offset}, expected {done}")
        if done + len(chunk.data) > per_tensor:
            raise TransferError(f"layer {chunk.layer}: more than the {per_tensor} bytes its header announces")
        start = (int(chunk.is_value) * header.num_layers + chunk.layer) * per_tensor + done
        buffer[start : start + len(chunk.data)] = np.frombuffer(chunk.data, dtype=np.uint8)
        received[key] = done + len(chunk.data)
        chunks += 1
    if header is not None and header.kv_connector:
        return header, None, None
    if header is None or buffer is None or chunks != header.num_chunks:
        raise TransferError(f"KV stream ended after {chunks} of {header.num_chunks if header else '?'} chunks")
    for layer in range(header.num_layers):
        for is_value in (False, True):
            got = received.get((layer, is_value), 0)
            if got != per_tensor:
                raise TransferError(f"layer {layer} {'V' if is_value else 'K'}: {got} bytes, expected {per_tensor}")
    heads, seq_len, head_dim = header.shape
    wire = torch.from_numpy(buffer).view(_FROM_WIRE[header.dtype])
    both = wire.view(2, header.num_layers, heads, seq_len, head_dim).transpose(2, 3)
    return header, both[0], both[1]


def _check_header(header: pb.KVHeader) -> int:
    """Bytes of one layer's K (or V); the header is checked before anything is allocated for it."""
    dtype = _FROM_WIRE.get(header.dtype)
    if dtype is None or len(header.shape) != 3:
        raise TransferError("KV header has an unknown dtype or a shape that is not [heads, seq_len, head_dim]")
    heads, seq_len, head_dim = header.shape
    if len(header.input_ids) != seq_len:
        raise TransferError(f"KV covers {counted(seq_len, 'token')} but the header lists {len(header.input_ids)}")
    per_token = 2 * header.num_layers * heads * head_dim * dtype.itemsize
    if not 0 < per_token <= MAX_KV_BYTES_PER_TOKEN:
        raise TransferError(f"KV header announces {per_token} bytes per token (at most {MAX_KV_BYTES_PER_TOKEN})")
    return heads * seq_len * head_dim * dtype.itemsize
