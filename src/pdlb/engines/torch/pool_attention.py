"""Attention over the token-slot KV pool in plain torch operations, laid out once per step.

The plain-torch path of llama.py (the CPU's, and CUDA's where Triton is missing) used to gather every
sequence's K/V into one tensor padded to the longest context and run one masked attention over all
of them, prefill chunks and decode tokens alike. On a CPU that gather (advanced indexing) and the
padded, masked attention cost about as much as the decode step's GEMMs. Here each kind of row takes
the cheapest form instead:

- decode tokens (one new token each): one batched attention; their K/V read from the pool with
  `index_select` over the flattened slot table (4x faster than advanced indexing on a CPU), the query
  heads of a KV head as that head's query rows, a key-padding mask broadcast over heads; or, given a
  `decode_kernel` (paged_attention_cpu.py), one that reads the pool in place through the slot table;
- a prompt chunk from position 0: causal attention over its own new K/V (no pool read, no mask);
- a chunk that continues a cached prefix or an earlier chunk: its context's K/V read from the pool,
  an offset causal mask.

`AttentionLayout` is built on the host once per forward pass (index tensors, masks); `attend` runs
one layer. Shapes: q [T, H, hd] (T tokens of the step, in plan order), the layer's pool K/V
[slots, Hkv, hd]; the result [T, H * hd].
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch.nn import functional as F

# (q [Bd, H, hd], k_pool, v_pool [slots, Hkv, hd], slot table [Bd, L] int64, lengths [Bd] int64)
# -> [Bd, H * hd]: decode attention reading the pool in place (paged_attention_cpu.PagedDecodeAttention)
DecodeKernel = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class Segment:
    """One prefill chunk: rows offset .. offset+length-1 of the step, at positions start .. start+length-1.
    `slots` (positions 0 .. start+length-1) and `mask` [length, start+length] are set when the chunk
    attends to K/V already in the pool (start > 0); None when it attends only to itself."""

    offset: int
    length: int
    slots: torch.Tensor | None = None
    mask: torch.Tensor | None = None


class AttentionLayout:
    """Which rows of a step attend how, as index tensors on `device`.

    `spans`: (offset, new tokens, start position) per sequence in plan order; `kv_index`
    [sequences, max context] (host) slot table, padded with slot 0; `kv_lens` its lengths."""

    def __init__(
        self,
        spans: list[tuple[int, int, int]],
        kv_index: torch.Tensor,
        kv_lens: list[int],
        num_tokens: int,
        device: torch.device,
    ) -> None:
        self.num_tokens = num_tokens
        decode = [b for b, (_, n, _) in enumerate(spans) if n == 1]
        self.segments: list[Segment] = []
        for b, (offset, n, start) in enumerate(spans):
            if n == 1:
                continue
            if start == 0:
                self.segments.append(Segment(offset, n))
                continue
            context = start + n
            key_pos = torch.arange(context).view(1, -1)
            query_pos = torch.arange(start, context).view(-1, 1)
            self.segments.append(
                Segment(offset, n, kv_index[b, :context].to(device), (key_pos <= query_pos).to(device))
            )
        self.decode_count = len(decode)
        self.all_decode = self.decode_count == len(spans) and self.decode_count == num_tokens
        self.decode_rows: torch.Tensor | None = None
        self.decode_slots = self.decode_mask = self.decode_table = self.decode_lens = None
        self.decode_context = 0
        if decode:
            longest = max(kv_lens[b] for b in decode)
            rows = torch.tensor(decode)
            self.decode_context = longest
            self.decode_table = kv_index[rows, :longest].to(device)  # [Bd, L]
            self.decode_slots = self.decode_table.reshape(-1)
            lens = torch.tensor([kv_lens[b] for b in decode])
            self.decode_lens = lens.to(device)  # [Bd]
            key_pos = torch.arange(longest).view(1, 1, 1, -1)
            self.decode_mask = (key_pos < lens.view(-1, 1, 1, 1)).to(device)  # [Bd, 1, 1, L]
            if not self.all_decode:
                self.decode_rows = torch.tensor([spans[b][0] for b in decode], device=device)

    @classmethod
    def fixed_decode(cls, kv_index: torch.Tensor, mask: torch.Tensor, kv_lens: torch.Tensor) -> AttentionLayout:
        """A fixed-shape decode plan's layout (DecodePlan): kv_index [B, context], its key-padding
        mask [B, 1, 1, context] and lengths [B], all already on the device."""
        layout = cls.__new__(cls)
        batch, context = kv_index.shape
        layout.num_tokens, layout.segments, layout.decode_count = batch, [], batch
        layout.all_decode, layout.decode_rows = True, None
        layout.decode_slots, layout.decode_mask, layout.decode_context = kv_index.reshape(-1), mask, context
        layout.decode_table, layout.decode_lens = kv_index, kv_lens
        return layout


def attend(
    layout: AttentionLayout,
    q: torch.Tensor,
    k_new: torch.Tensor,
    v_new: torch.Tensor,
    k_pool: torch.Tensor,
    v_pool: torch.Tensor,
    decode_kernel: DecodeKernel | None = None,
) -> torch.Tensor:
    """One layer's attention. q [T, H, hd]; k_new, v_new [T, Hkv, hd] (this step's, already written
    to the pool); k_pool, v_pool [slots, Hkv, hd] (this layer's pool). Returns [T, H * hd] in q's dtype.
    `decode_kernel` (None: `index_select` and SDPA) attends the decode rows reading the pool in
    place; prompt chunks take SDPA either way."""
    tokens, heads, head_dim = q.shape
    kv_heads = k_pool.shape[1]
    group = heads // kv_heads
    width = heads * head_dim
    decoded = None
    if layout.decode_count:
        count, context = layout.decode_count, layout.decode_context
        rows = q if layout.decode_rows is None else q.index_select(0, layout.decode_rows)
        if decode_kernel is not None:
            decoded = decode_kernel(rows, k_pool, v_pool, layout.decode_table, layout.decode_lens)
        else:
            # the `group` query heads of a KV head are that head's query rows: K/V are never repeated
            queries = rows.view(count, kv_heads, group, head_dim)
            keys = k_pool.index_select(0, layout.decode_slots).view(count, context, kv_heads, head_dim)
            values = v_pool.index_select(0, layout.decode_slots).view(count, context, kv_heads, head_dim)
            keys, values = keys.transpose(1, 2).to(q.dtype), values.transpose(1, 2).to(q.dtype)
            decoded = F.scaled_dot_product_attention(queries, keys, values, attn_mask=layout.decode_mask)
            decoded = decoded.reshape(count, width)
        if layout.all_decode:
            return decoded
    out = torch.empty(tokens, width, dtype=q.dtype, device=q.device)
    for segment in layout.segments:
        span = slice(segment.offset, segment.offset + segment.length)
        queries = q[span].transpose(0, 1)  # [H, n, hd]
        if segment.slots is None:
            keys, values, mask = k_new[span], v_new[span], None
        else:
            keys, values = k_pool.index_select(0, segment.slots), v_pool.index_select(0, segment.slots)
            mask = segment.mask
        # 4-D with enable_gqa: SDPA's flash kernel on a CPU; 3-D inputs with enable_gqa fall back to
        # its unfused math path (about a second per 3,200 prompt tokens of SmolLM2)
        attended = F.scaled_dot_product_attention(
            queries.unsqueeze(0),
            keys.to(q.dtype).transpose(0, 1).unsqueeze(0),
            values.to(q.dtype).transpose(0, 1).unsqueeze(0),
            attn_mask=mask,
            is_causal=mask is None,
            enable_gqa=group > 1,
        )  # [1, H, n, hd]
        out[span] = attended[0].transpose(0, 1).reshape(segment.length, width)
    if decoded is not None:
        out.index_copy_(0, layout.decode_rows, decoded)
    return out
