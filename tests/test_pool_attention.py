"""Attention over the KV pool (pool_attention.py) against a plain reference: each sequence alone,
its K/V repeated per query head, explicit causal softmax, in float64."""

from __future__ import annotations

import math

import torch

from pdlb.engines.torch.model import BatchPlan, DecodePlan, SeqChunk
from pdlb.engines.torch.pool_attention import attend

HEADS, KV_HEADS, HEAD_DIM, SLOTS = 6, 2, 8, 200


def reference(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, start: int) -> torch.Tensor:
    """q [n, H, hd] at positions start..start+n-1 over keys/values [start+n, Hkv, hd] -> [n, H * hd]."""
    group = HEADS // KV_HEADS
    keys, values = keys.repeat_interleave(group, 1).double(), values.repeat_interleave(group, 1).double()
    scores = torch.einsum("qhd,khd->hqk", q.double(), keys) / math.sqrt(HEAD_DIM)
    query_pos = torch.arange(start, start + q.shape[0]).view(-1, 1)
    scores = scores.masked_fill(torch.arange(keys.shape[0]).view(1, -1) > query_pos, float("-inf"))
    return torch.einsum("hqk,khd->qhd", scores.softmax(-1), values).reshape(q.shape[0], -1)


def test_a_mixed_step_attends_like_each_sequence_alone():
    """A step with a prompt from position 0, a chunk continuing a cached context, and two decode
    tokens of different context lengths: every row as its sequence alone would attend."""
    torch.manual_seed(0)
    k_pool, v_pool = torch.randn(SLOTS + 1, KV_HEADS, HEAD_DIM), torch.randn(SLOTS + 1, KV_HEADS, HEAD_DIM)
    # slots out of order on purpose: the pool is read through each sequence's slot list
    perm = (torch.randperm(SLOTS) + 1).tolist()
    chunks = [
        SeqChunk([1] * 5, 0, perm[0:5]),  # a whole prompt
        SeqChunk([1], 30, perm[5:36]),  # decode, context 31
        SeqChunk([1] * 4, 9, perm[36:49]),  # a continued chunk: 9 cached + 4 new
        SeqChunk([1], 3, perm[49:53]),  # decode, context 4
    ]
    plan = BatchPlan(chunks, torch.device("cpu"))
    tokens = plan.tokens.shape[0]
    q = torch.randn(tokens, HEADS, HEAD_DIM)
    k_new, v_new = k_pool[plan.write_slots], v_pool[plan.write_slots]  # written before attention
    got = attend(plan.attention_layout(), q, k_new, v_new, k_pool, v_pool)
    assert got.shape == (tokens, HEADS * HEAD_DIM)
    offset = 0
    for chunk in chunks:
        n = len(chunk.new_tokens)
        context = torch.tensor(chunk.slots[: chunk.start_pos + n])
        want = reference(q[offset : offset + n], k_pool[context], v_pool[context], chunk.start_pos)
        assert torch.allclose(got[offset : offset + n].double(), want, atol=1e-5), chunk.start_pos
        offset += n


def test_a_fixed_shape_decode_plan_reads_only_each_rows_context():
    """DecodePlan (padded rows, a slot table longer than every context): the padding slots and the
    pool's other slots do not change any row's result."""
    torch.manual_seed(1)
    k_pool, v_pool = torch.randn(SLOTS + 1, KV_HEADS, HEAD_DIM), torch.randn(SLOTS + 1, KV_HEADS, HEAD_DIM)
    chunks = [SeqChunk([1], 6, list(range(10, 17))), SeqChunk([1], 2, list(range(50, 53)))]
    plan = DecodePlan(batch=4, context=16, device=torch.device("cpu"))
    plan.fill(chunks)
    plan.refresh_mask()
    q = torch.randn(4, HEADS, HEAD_DIM)
    got = attend(plan.attention_layout(), q, k_pool[:4], v_pool[:4], k_pool, v_pool)
    for row, chunk in enumerate(chunks):
        context = torch.tensor(chunk.slots)
        want = reference(q[row : row + 1], k_pool[context], v_pool[context], chunk.start_pos)
        assert torch.allclose(got[row : row + 1].double(), want, atol=1e-5)
