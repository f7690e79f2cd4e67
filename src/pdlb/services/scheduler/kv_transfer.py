"""PD KV hand-off: a prefill worker's held KV as a PullKV stream, and its reassembly on decode.

Each layer's K and V travel as [num_heads, seq_len, head_dim] tensors (the documented wire shape),
split into chunks of at most CHUNK_BYTES raw little-endian bytes.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator

import torch

from pdlb.v1 import scheduler_pb2 as pb

CHUNK_BYTES = 1 << 20
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


def _wire_bytes(layer_tensor: torch.Tensor) -> bytes:
    # Reinterpret as bytes (works for bfloat16, which numpy lacks).
    return layer_tensor.transpose(0, 1).contiguous().view(torch.uint8).numpy().tobytes()


async def decode_kv(
    stream: AsyncIterator[pb.PullKVResponse],
) -> tuple[pb.KVHeader, torch.Tensor, torch.Tensor]:
    """Reassemble (header, k, v) with k, v shaped [num_layers, seq_len, num_heads, head_dim]."""
    header: pb.KVHeader | None = None
    buffers: dict[tuple[int, bool], bytearray] = {}
    chunks = 0
    async for message in stream:
        if message.HasField("header"):
            header = message.header
            continue
        if header is None:
            raise TransferError("KV stream sent a chunk before its header")
        chunk = message.chunk
        if chunk.layer >= header.num_layers:
            raise TransferError(f"KV chunk for layer {chunk.layer} of {header.num_layers}")
        buf = buffers.setdefault((chunk.layer, chunk.is_value), bytearray())
        if chunk.offset != len(buf):
            raise TransferError(f"KV chunk at offset {chunk.offset}, expected {len(buf)}")
        buf.extend(chunk.data)
        chunks += 1
    if header is None or chunks != header.num_chunks:
        raise TransferError(f"KV stream ended after {chunks} of {header.num_chunks if header else '?'} chunks")
    dtype = _FROM_WIRE.get(header.dtype)
    if dtype is None or len(header.shape) != 3:
        raise TransferError("KV header has an unknown dtype or a shape that is not [heads, seq_len, head_dim]")
    heads, seq_len, head_dim = header.shape
    tensors = []
    for is_value in (False, True):
        layers = []
        for layer in range(header.num_layers):
            raw = buffers.get((layer, is_value), bytearray())
            expected = heads * seq_len * head_dim * torch.empty(0, dtype=dtype).element_size()
            if len(raw) != expected:
                raise TransferError(f"layer {layer} {'V' if is_value else 'K'}: {len(raw)} bytes, expected {expected}")
            t = torch.frombuffer(bytearray(raw), dtype=torch.uint8).view(dtype).view(heads, seq_len, head_dim)
            layers.append(t.transpose(0, 1))
        tensors.append(torch.stack(layers))
    if len(header.input_ids) != seq_len:
        raise TransferError(f"KV covers {seq_len} tokens but the header lists {len(header.input_ids)}")
    return header, tensors[0], tensors[1]
