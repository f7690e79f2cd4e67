"""Attention over the KV pool (pool_attention.py) against a plain reference: each sequence alone,
its K/V repeated per query head, explicit causal softmax, in float64."""

from __future__ import annotations

import math
import os
import subprocess
import sys

import pytest
import torch

from pdlb.engines.torch import compiled_attention
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


needs_compiler = pytest.mark.skipif(not compiled_attention.available(), reason="torch.compile needs a C++ compiler")
# decode rows through index_select + SDPA, or through the compiled kernel that reads the pool in place
KERNELS = pytest.mark.parametrize(
    "kernel", [None, pytest.param("compiled", marks=needs_compiler)], ids=["sdpa", "compiled"]
)


def decode_kernel(name: str | None):
    return compiled_attention.shared() if name == "compiled" else None


@KERNELS
def test_a_mixed_step_attends_like_each_sequence_alone(kernel):
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
    got = attend(plan.attention_layout(), q, k_new, v_new, k_pool, v_pool, decode_kernel(kernel))
    assert got.shape == (tokens, HEADS * HEAD_DIM)
    offset = 0
    for chunk in chunks:
        n = len(chunk.new_tokens)
        context = torch.tensor(chunk.slots[: chunk.start_pos + n])
        want = reference(q[offset : offset + n], k_pool[context], v_pool[context], chunk.start_pos)
        assert torch.allclose(got[offset : offset + n].double(), want, atol=1e-5), chunk.start_pos
        offset += n


@KERNELS
def test_a_fixed_shape_decode_plan_reads_only_each_rows_context(kernel):
    """DecodePlan (padded rows, a slot table longer than every context): the padding slots and the
    pool's other slots do not change any row's result."""
    torch.manual_seed(1)
    k_pool, v_pool = torch.randn(SLOTS + 1, KV_HEADS, HEAD_DIM), torch.randn(SLOTS + 1, KV_HEADS, HEAD_DIM)
    chunks = [SeqChunk([1], 6, list(range(10, 17))), SeqChunk([1], 2, list(range(50, 53)))]
    plan = DecodePlan(batch=4, context=16, device=torch.device("cpu"))
    plan.fill(chunks)
    plan.refresh_mask()
    q = torch.randn(4, HEADS, HEAD_DIM)
    got = attend(plan.attention_layout(), q, k_pool[:4], v_pool[:4], k_pool, v_pool, decode_kernel(kernel))
    for row, chunk in enumerate(chunks):
        context = torch.tensor(chunk.slots)
        want = reference(q[row : row + 1], k_pool[context], v_pool[context], chunk.start_pos)
        assert torch.allclose(got[row : row + 1].double(), want, atol=1e-5)


@needs_compiler
@pytest.mark.parametrize("contexts", [[7], [1, 9], [3, 3, 200]], ids=["one-row", "one-token-context", "long"])
def test_the_compiled_kernel_reads_each_rows_context_in_place(contexts):
    """The compiled kernel alone, at the sizes it pads (one row, a one-token context) and beside a
    long context: every row equals the reference over its own slots; the pool is not written."""
    torch.manual_seed(2)
    k_pool, v_pool = torch.randn(SLOTS + 1, KV_HEADS, HEAD_DIM), torch.randn(SLOTS + 1, KV_HEADS, HEAD_DIM)
    before = k_pool.clone(), v_pool.clone()
    perm = (torch.randperm(SLOTS) + 1).tolist()
    longest = max(contexts)
    table = torch.zeros(len(contexts), longest, dtype=torch.long)
    for row, n in enumerate(contexts):
        table[row, :n] = torch.tensor(perm[:n])
        perm = perm[n:] + perm[:n]
    q = torch.randn(len(contexts), HEADS, HEAD_DIM)
    got = compiled_attention.shared()(q, k_pool, v_pool, table, torch.tensor(contexts))
    assert got.shape == (len(contexts), HEADS * HEAD_DIM)
    for row, n in enumerate(contexts):
        slots = table[row, :n]
        want = reference(q[row : row + 1], k_pool[slots], v_pool[slots], n - 1)
        assert torch.allclose(got[row : row + 1].double(), want, atol=1e-5), (row, n)
    assert torch.equal(k_pool, before[0]) and torch.equal(v_pool, before[1])


@pytest.mark.parametrize("flags", [["--cpu-attention", "compiled"], ["--cpu-compiled-ops"]])
def test_the_scheduler_refuses_compiling_without_a_cpp_compiler(tmp_path, flags):
    """No C++ compiler on PATH (and no CXX): one line naming the flags and what to install, exit 2,
    before any model loads (torch.compile would otherwise fail at the first step)."""
    env = {k: v for k, v in os.environ.items() if k != "CXX"} | {"PATH": str(tmp_path)}
    run = subprocess.run(
        [sys.executable, "-m", "pdlb.services.scheduler.main", "--port", "0", "--runner", "torch", *flags],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
    )
    assert run.returncode == 2, run.stdout + run.stderr
    said = "pdlb-scheduler: --cpu-attention compiled and --cpu-compiled-ops need a C++ compiler"
    assert run.stderr.startswith(said), run.stderr
    assert "apt-get install g++" in run.stderr and len(run.stderr.strip().splitlines()) == 1, run.stderr
