"""The PD hand-off's wire format: round trips and malformed streams (pure logic, no processes)."""

from __future__ import annotations

import pytest
import torch

from pdlb.services.scheduler import kv_transfer
from pdlb.services.scheduler.kv_transfer import TransferError, decode_kv, encode_kv
from pdlb.v1 import scheduler_pb2 as pb


async def _stream(messages):
    for message in messages:
        yield message


def _kv(layers: int, tokens: int, heads: int, head_dim: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(layers * 100 + tokens)
    shape = (layers, tokens, heads, head_dim)
    return torch.randn(shape, generator=generator).to(dtype), torch.randn(shape, generator=generator).to(dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("chunk_bytes", [7, 64, 1 << 20])
async def test_round_trip_is_exact_at_any_chunking(monkeypatch, dtype, chunk_bytes):
    monkeypatch.setattr(kv_transfer, "CHUNK_BYTES", chunk_bytes)
    k, v = _kv(3, 5, 2, 4, dtype)
    messages = list(encode_kv([9, 8, 7, 6, 5], 42, k, v))
    header, k2, v2 = await decode_kv(_stream(messages))
    assert header.first_token_id == 42 and list(header.input_ids) == [9, 8, 7, 6, 5]
    assert k2.shape == k.shape and k2.dtype == dtype
    assert torch.equal(k2, k) and torch.equal(v2, v)


async def test_malformed_streams_fail_with_what_is_wrong(monkeypatch):
    monkeypatch.setattr(kv_transfer, "CHUNK_BYTES", 16)
    k, v = _kv(2, 3, 1, 4, torch.float32)
    good = list(encode_kv([1, 2, 3], 0, k, v))
    header, chunks = good[0], good[1:]

    async def fails(messages, words: str) -> None:
        with pytest.raises(TransferError, match=words):
            await decode_kv(_stream(messages))

    await fails(chunks, "chunk before its header")
    await fails([header, header, *chunks], "second header")
    await fails([header, *chunks[:-1]], "ended after")
    await fails([header, chunks[1], chunks[0], *chunks[2:]], "offset")
    late = pb.PullKVResponse(chunk=pb.KVChunk(layer=5, data=b"x"))
    await fails([header, late], "layer 5 of 2")
    extra = pb.PullKVResponse(chunk=pb.KVChunk(layer=0, offset=48, data=b"x"))
    await fails([header, *chunks, extra], "more than the 48 bytes")
    wrong_len = pb.PullKVResponse()
    wrong_len.header.CopyFrom(header.header)
    del wrong_len.header.input_ids[:]
    await fails([wrong_len], "covers 3 tokens but the header lists 0")
    huge = pb.PullKVResponse()
    huge.header.CopyFrom(header.header)
    huge.header.shape[:] = [1 << 20, 3, 1 << 10]  # a header claiming terabytes: refused before allocating
    await fails([huge], "bytes per token")


async def test_a_connector_hand_off_is_one_header_with_the_params_and_nothing_else():
    """Engines that move KV through their own connector (vLLM) send the header alone: the decode
    side gets the prompt, first token, connector and kv_transfer_params back, no tensors; a chunk
    after such a header, or params that are not a JSON object, fail naming what is wrong."""
    params = {"do_remote_prefill": True, "remote_block_ids": [3, 4], "remote_host": "10.0.0.2"}
    message = kv_transfer.encode_connector([5, 6, 7], 42, "ExampleConnector", params)
    header, k, v = await decode_kv(_stream([message]))
    assert (list(header.input_ids), header.first_token_id, header.kv_connector) == ([5, 6, 7], 42, "ExampleConnector")
    assert k is None and v is None and kv_transfer.transfer_params(header) == params
    none = kv_transfer.encode_connector([5], 1, "ExampleConnector", None)
    assert kv_transfer.transfer_params(none.header) is None  # vLLM's ExampleConnector returns none
    chunk = pb.PullKVResponse(chunk=pb.KVChunk(layer=0, data=b"x"))
    with pytest.raises(TransferError, match="chunk after a ExampleConnector hand-off"):
        await decode_kv(_stream([message, chunk]))
    for bad, why in (("[1, 2]", "not a JSON object"), ("{nope", "not JSON")):
        message.header.kv_transfer_params = bad
        with pytest.raises(TransferError, match=why):
            await decode_kv(_stream([message]))
