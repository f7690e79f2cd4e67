"""Decode attention that reads the KV pool in place on a CPU, compiled by inductor.

The plain-torch decode path (pool_attention.py) copies every decode row's K and V out of the pool
with `index_select` at each layer, then runs SDPA over the copy: at batch 16 and ~230 tokens of
context in SmolLM2 that is ~170 MB written and read again per step. vLLM's CPU attention reads its
paged cache in place. Here the same computation is written as element-wise products and reductions
over `pool[slot_table]`; inductor (torch.compile) fuses the gather into the reductions, so each K/V
row is loaded from its pool slot once, straight into the dot products, and nothing is copied.

Shapes: q [B, H, hd] (one query token per row), the layer's pool K/V [slots, Hkv, hd], the slot
table [B, L] (padded with slot 0) and the context lengths [B]; the result [B, H * hd] in q's dtype.
Inductor needs a C++ compiler at start (`c++`/`g++`, or `CXX`); `available()` says whether one is
found. Compiled once per process with dynamic batch and context sizes (about 10-30 s on 2 cores,
less when inductor's on-disk cache already holds the kernels), at the runner's start (`warm_up`).
"""

from __future__ import annotations

import functools
import os
import shutil

import torch


def gathered_decode_attention(
    q: torch.Tensor, k_pool: torch.Tensor, v_pool: torch.Tensor, table: torch.Tensor, lens: torch.Tensor
) -> torch.Tensor:
    """Softmax attention of each row's query heads over its context's K/V, read through the slot
    table. Eager, this materialises the gathered K/V (slow); compiled, the gather is fused away.
    q [B, H, hd]; k_pool, v_pool [slots, Hkv, hd]; table [B, L] int64; lens [B] int64 (>= 1)."""
    batch, heads, head_dim = q.shape
    kv_heads = k_pool.shape[1]
    group = heads // kv_heads
    keys = k_pool[table]  # [B, L, Hkv, hd]
    values = v_pool[table]
    queries = q.view(batch, 1, kv_heads, group, head_dim).float()
    # scores [B, L, Hkv, group]: keeping L outside the head axes lets inductor vectorise over hd
    # (scores laid out [B, Hkv, group, L] compiled ~8x slower)
    scores = (queries * keys.unsqueeze(3).float()).sum(-1) * head_dim**-0.5
    valid = torch.arange(table.shape[1], device=table.device).view(1, -1, 1, 1) < lens.view(-1, 1, 1, 1)
    weights = torch.softmax(scores.masked_fill(~valid, float("-inf")), dim=1)
    attended = (weights.unsqueeze(-1) * values.unsqueeze(3).float()).sum(1)  # [B, Hkv, group, hd]
    return attended.reshape(batch, heads * head_dim).to(q.dtype)


def available() -> bool:
    """Whether inductor can build CPU kernels here: a C++ compiler on PATH (or named by CXX)."""
    return any(shutil.which(name) for name in (os.environ.get("CXX", ""), "c++", "g++", "clang++") if name)


class CompiledDecodeAttention:
    """`gathered_decode_attention` compiled once for any batch and context size.

    torch.compile with dynamic shapes still specialises a size of 1, so a batch of one row or a
    context of one token would compile a second time; those are padded to 2 (slot 0, masked out)."""

    def __init__(self) -> None:
        self._compiled = torch.compile(gathered_decode_attention, dynamic=True, fullgraph=True)

    def __call__(
        self, q: torch.Tensor, k_pool: torch.Tensor, v_pool: torch.Tensor, table: torch.Tensor, lens: torch.Tensor
    ) -> torch.Tensor:
        batch, context = table.shape
        if batch == 1 or context == 1:
            table = torch.nn.functional.pad(table, (0, 1 if context == 1 else 0, 0, 1 if batch == 1 else 0))
            lens = torch.nn.functional.pad(lens, (0, 1 if batch == 1 else 0), value=1)
            q = torch.nn.functional.pad(q, (0, 0, 0, 0, 0, 1 if batch == 1 else 0))
        out = self._compiled(q.contiguous(), k_pool, v_pool, table, lens)
        return out[:batch]

    def warm_up(self, k_pool: torch.Tensor, v_pool: torch.Tensor, num_heads: int) -> None:
        """Compile now (on the thread and with the thread count that will run it) rather than at the
        first decode step. Reads the pool's padding slot only."""
        head_dim = k_pool.shape[-1]
        q = torch.zeros(3, num_heads, head_dim, dtype=k_pool.dtype, device=k_pool.device)
        table = torch.zeros(3, 5, dtype=torch.long, device=k_pool.device)
        lens = torch.tensor([5, 3, 1], device=k_pool.device)
        self(q, k_pool, v_pool, table, lens)


@functools.cache
def shared() -> CompiledDecodeAttention:
    """One compiled instance per process (inductor's guards then cover every runner's pool)."""
    return CompiledDecodeAttention()
