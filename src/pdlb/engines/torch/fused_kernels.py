"""Triton kernels of the Llama forward pass on CUDA: a few fused launches per layer instead of ~45.

At SmolLM2's size a decode step is bound by kernel count, not bytes: the weights are read in
~0.06 ms, while ~1,400 small torch kernels (float32 RMSNorm, rotary by concatenation, a gather of
every sequence's K/V into a padded tensor) took ~5 ms. Per layer the fused path runs:

- `add_rms_norm`: residual add and RMSNorm in one pass (the residual updated in place);
- `rotary_kv_write`: rotary embedding of Q and K, and K/V written into the pool at the step's slots;
- `paged_decode_attention`: one query token per sequence attending over its slots of the pool, read
  in place through the slot table (no gather, no mask tensor), grouped-query heads sharing each
  K/V load;
- `silu_mul`: SwiGLU's activation over the fused gate/up projection;

plus four cuBLAS GEMMs (fused QKV, output, fused gate/up, down). Each kernel rounds where the
reference implementation (Hugging Face `transformers`, in the model's dtype) rounds, so bfloat16
results match it up to summation order. Importing this module needs Triton (present with CUDA builds
of torch); `TRITON_INTERPRET=1` runs the same kernels on a CPU for tests.
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl


@triton.jit
def _add_rms_norm_kernel(x_ptr, delta_ptr, weight_ptr, out_ptr, dim, eps, HAS_DELTA: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    valid = cols < dim
    x = tl.load(x_ptr + row * dim + cols, mask=valid, other=0.0).to(tl.float32)
    if HAS_DELTA:
        delta = tl.load(delta_ptr + row * dim + cols, mask=valid, other=0.0).to(tl.float32)
        # rounded to the residual's dtype, as `x = x + delta` does, before the norm reads it
        x = (x + delta).to(x_ptr.dtype.element_ty)
        tl.store(x_ptr + row * dim + cols, x, mask=valid)
        x = x.to(tl.float32)
    rstd = 1.0 / tl.sqrt(tl.sum(x * x, axis=0) / dim + eps)
    normed = (x * rstd).to(out_ptr.dtype.element_ty).to(tl.float32)  # cast back before the weight
    weight = tl.load(weight_ptr + cols, mask=valid, other=0.0).to(tl.float32)
    tl.store(out_ptr + row * dim + cols, (weight * normed).to(out_ptr.dtype.element_ty), mask=valid)


def add_rms_norm(x: torch.Tensor, delta: torch.Tensor | None, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm of `x + delta` (or of `x`), computed in float32 and cast back before the weight.

    x, delta: [T, D] contiguous, same dtype; weight: [D]. With `delta`, `x` is updated in place to
    the sum (the residual stream). Returns the normalised [T, D] in x's dtype."""
    rows, dim = x.shape
    out = torch.empty_like(x)
    if rows:
        _add_rms_norm_kernel[(rows,)](
            x, x if delta is None else delta, weight, out, dim, eps,
            HAS_DELTA=delta is not None, BLOCK=triton.next_power_of_2(dim),
        )  # fmt: skip
    return out


@triton.jit
def _rotary_kv_write_kernel(
    qkv_ptr, cos_ptr, sin_ptr, slots_ptr, slots_stride, q_ptr, k_pool_ptr, v_pool_ptr,
    NUM_HEADS: tl.constexpr, NUM_KV_HEADS: tl.constexpr, HALF: tl.constexpr, BLOCK_H: tl.constexpr,
):  # fmt: skip
    token = tl.program_id(0).to(tl.int64)
    head_dim: tl.constexpr = 2 * HALF
    width: tl.constexpr = (NUM_HEADS + 2 * NUM_KV_HEADS) * head_dim
    heads = tl.arange(0, BLOCK_H)[:, None]  # Q heads, then K heads, then V heads
    cols = tl.arange(0, HALF)[None, :]
    rotated = heads < NUM_HEADS + NUM_KV_HEADS
    real = heads < NUM_HEADS + 2 * NUM_KV_HEADS
    row = qkv_ptr + token * width + heads * head_dim + cols
    x1 = tl.load(row, mask=real, other=0.0)
    x2 = tl.load(row + HALF, mask=real, other=0.0)
    dtype = x1.dtype
    # cos/sin rounded to the model's dtype and every product and sum rounded, as q * cos +
    # rotate_half(q) * sin does in that dtype
    cos = tl.load(cos_ptr + token * HALF + cols).to(dtype).to(tl.float32)
    sin = tl.load(sin_ptr + token * HALF + cols).to(dtype).to(tl.float32)
    a1, a2 = x1.to(tl.float32), x2.to(tl.float32)
    out1 = ((a1 * cos).to(dtype).to(tl.float32) - (a2 * sin).to(dtype).to(tl.float32)).to(dtype)
    out2 = ((a2 * cos).to(dtype).to(tl.float32) + (a1 * sin).to(dtype).to(tl.float32)).to(dtype)
    out1 = tl.where(rotated, out1, x1)  # V heads pass through
    out2 = tl.where(rotated, out2, x2)
    is_q = heads < NUM_HEADS
    q_row = q_ptr + token * NUM_HEADS * head_dim + heads * head_dim + cols
    tl.store(q_row, out1, mask=is_q)
    tl.store(q_row + HALF, out2, mask=is_q)
    slot = tl.load(slots_ptr + token * slots_stride).to(tl.int64)
    kv_width: tl.constexpr = NUM_KV_HEADS * head_dim
    is_k = (heads >= NUM_HEADS) & rotated
    k_row = k_pool_ptr + slot * kv_width + (heads - NUM_HEADS) * head_dim + cols
    tl.store(k_row, out1.to(k_pool_ptr.dtype.element_ty), mask=is_k)
    tl.store(k_row + HALF, out2.to(k_pool_ptr.dtype.element_ty), mask=is_k)
    is_v = (heads >= NUM_HEADS + NUM_KV_HEADS) & real
    v_row = v_pool_ptr + slot * kv_width + (heads - NUM_HEADS - NUM_KV_HEADS) * head_dim + cols
    tl.store(v_row, out1.to(v_pool_ptr.dtype.element_ty), mask=is_v)
    tl.store(v_row + HALF, out2.to(v_pool_ptr.dtype.element_ty), mask=is_v)


def rotary_kv_write(
    qkv: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    write_slots: torch.Tensor,
    k_pool: torch.Tensor,
    v_pool: torch.Tensor,
    num_heads: int,
    num_kv_heads: int,
) -> torch.Tensor:
    """Rotary embedding (rotate-half layout) of Q and K, K and V stored into the pool.

    qkv: [T, (H + 2 * Hkv) * hd], the fused projection's output; cos, sin: [T, hd / 2] float32 of
    each token's position; write_slots: [T] slot of each token (may be strided); k_pool, v_pool: one layer's pool,
    [slots, Hkv, hd], contiguous. Returns the rotated queries [T, H, hd]."""
    tokens = qkv.shape[0]
    head_dim = k_pool.shape[-1]
    q = torch.empty(tokens, num_heads, head_dim, dtype=qkv.dtype, device=qkv.device)
    if tokens:
        _rotary_kv_write_kernel[(tokens,)](
            qkv, cos, sin, write_slots, write_slots.stride(0), q, k_pool, v_pool,
            NUM_HEADS=num_heads, NUM_KV_HEADS=num_kv_heads, HALF=head_dim // 2,
            BLOCK_H=triton.next_power_of_2(num_heads + 2 * num_kv_heads),
        )  # fmt: skip
    return q


@triton.jit
def _paged_decode_attention_kernel(
    q_ptr, k_pool_ptr, v_pool_ptr, kv_index_ptr, index_stride, kv_lens_ptr, lens_stride, out_ptr, scale,
    part_acc_ptr, part_stats_ptr,
    NUM_KV_HEADS: tl.constexpr, GROUP: tl.constexpr, HEAD_DIM: tl.constexpr,
    BLOCK_G: tl.constexpr, BLOCK_N: tl.constexpr, SPLITS: tl.constexpr,
):  # fmt: skip
    seq = tl.program_id(0).to(tl.int64)
    kv_head = tl.program_id(1)
    split = tl.program_id(2)
    rows = tl.arange(0, BLOCK_G)[:, None]  # the query heads of this KV head (padded to BLOCK_G)
    dims = tl.arange(0, HEAD_DIM)[None, :]
    num_heads: tl.constexpr = NUM_KV_HEADS * GROUP
    q_at = q_ptr + seq * num_heads * HEAD_DIM + (kv_head * GROUP + rows) * HEAD_DIM + dims
    q = tl.load(q_at, mask=rows < GROUP, other=0.0)
    length = tl.load(kv_lens_ptr + seq * lens_stride)
    # this program's share of the context: whole tiles, split `SPLITS` ways (some may be empty)
    share = tl.cdiv(tl.cdiv(length, SPLITS), BLOCK_N) * BLOCK_N
    start = split * share
    stop = tl.minimum(start + share, length)
    best = tl.full((BLOCK_G,), float("-inf"), tl.float32)
    total = tl.zeros((BLOCK_G,), tl.float32)
    acc = tl.zeros((BLOCK_G, HEAD_DIM), tl.float32)
    kv_width: tl.constexpr = NUM_KV_HEADS * HEAD_DIM
    qk_scale = scale * 1.4426950408889634  # exp(x) = exp2(x * log2(e))
    while start < stop:
        cols = start + tl.arange(0, BLOCK_N)
        inside = cols < stop
        slots = tl.load(kv_index_ptr + seq * index_stride + cols, mask=inside, other=0).to(tl.int64)
        at = slots[:, None] * kv_width + kv_head * HEAD_DIM + dims  # [BLOCK_N, HEAD_DIM]
        keys = tl.load(k_pool_ptr + at, mask=inside[:, None], other=0.0)
        scores = tl.dot(q, tl.trans(keys), input_precision="ieee") * qk_scale  # [BLOCK_G, BLOCK_N], float32
        scores = tl.where(inside[None, :], scores, float("-inf"))
        new_best = tl.maximum(best, tl.max(scores, axis=1))
        weights = tl.exp2(scores - new_best[:, None])
        correction = tl.exp2(best - new_best)
        total = total * correction + tl.sum(weights, axis=1)
        values = tl.load(v_pool_ptr + at, mask=inside[:, None], other=0.0)
        acc = acc * correction[:, None] + tl.dot(weights.to(values.dtype), values, input_precision="ieee")
        best = new_best
        start += BLOCK_N
    head = seq * num_heads + kv_head * GROUP + rows  # [BLOCK_G, 1]
    if SPLITS == 1:
        tl.store(
            out_ptr + head * HEAD_DIM + dims, (acc / total[:, None]).to(out_ptr.dtype.element_ty), mask=rows < GROUP
        )
    else:
        # unnormalised partial results, merged by _merge_splits_kernel
        tl.store(part_acc_ptr + (head * SPLITS + split) * HEAD_DIM + dims, acc, mask=rows < GROUP)
        at_stats = part_stats_ptr + (head * SPLITS + split) * 2
        tl.store(at_stats, best[:, None], mask=rows < GROUP)
        tl.store(at_stats + 1, total[:, None], mask=rows < GROUP)


@triton.jit
def _merge_splits_kernel(part_acc_ptr, part_stats_ptr, out_ptr, SPLITS: tl.constexpr, BLOCK_S: tl.constexpr,
                         HEAD_DIM: tl.constexpr):  # fmt: skip
    head = tl.program_id(0).to(tl.int64)  # sequence * heads + head
    splits = tl.arange(0, BLOCK_S)
    valid = splits < SPLITS
    at_stats = part_stats_ptr + (head * SPLITS + splits) * 2
    best = tl.load(at_stats, mask=valid, other=float("-inf"))
    total = tl.load(at_stats + 1, mask=valid, other=0.0)
    weight = tl.exp2(best - tl.max(best, axis=0))  # an empty split (best -inf) weighs 0
    dims = tl.arange(0, HEAD_DIM)
    acc = tl.load(
        part_acc_ptr + (head * SPLITS + splits)[:, None] * HEAD_DIM + dims[None, :], mask=valid[:, None], other=0.0
    )
    out = tl.sum(acc * weight[:, None], axis=0) / tl.sum(total * weight, axis=0)
    tl.store(out_ptr + head * HEAD_DIM + dims, out.to(out_ptr.dtype.element_ty))


# Programs of the attention kernel wanted per multiprocessor: one per sequence and KV head leaves
# most of the GPU idle at long contexts (each walks its whole context alone), so the context is split.
# Measured on an H200 at batch 64: splitting 1,024-token contexts 5 ways cut SmolLM2's attention from
# 51 to 28 us per layer; splitting 129-token ones 2 ways cost the merge kernel more than it saved, hence
# at least SPLIT_MIN_TOKENS positions of the slot table per split.
PROGRAMS_PER_SM = 8
MAX_SPLITS = 16
SPLIT_MIN_TOKENS = 512


@functools.cache
def _multiprocessors(device: torch.device) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 16


def attention_splits(device: torch.device, programs: int, columns: int) -> int:
    """How many ways to split each sequence's context: enough programs to fill the GPU, at least
    SPLIT_MIN_TOKENS positions of the slot table per split, at most MAX_SPLITS."""
    wanted = PROGRAMS_PER_SM * _multiprocessors(device) // max(1, programs)
    return max(1, min(wanted, triton.cdiv(columns, SPLIT_MIN_TOKENS), MAX_SPLITS))


def paged_decode_attention(
    q: torch.Tensor,
    k_pool: torch.Tensor,
    v_pool: torch.Tensor,
    kv_index: torch.Tensor,
    kv_lens: torch.Tensor,
    scale: float | None = None,
    splits: int | None = None,
) -> torch.Tensor:
    """Attention of one query token per sequence over its K/V, read from the pool in place.

    q: [B, H, hd] contiguous; k_pool, v_pool: one layer's pool [slots, Hkv, hd], contiguous, same
    dtype as q; kv_index: [B, >= max(kv_lens)] slot of each position (rows may be a strided view);
    kv_lens: [B] positions each sequence attends (>= 1; its own token included; may be strided).
    H must be a multiple of Hkv (grouped-query attention). `splits`: parts each context is cut
    into, merged by a second kernel (None: attention_splits). Returns [B, H, hd] in q's dtype."""
    batch, num_heads, head_dim = q.shape
    num_kv_heads = k_pool.shape[1]
    group = num_heads // num_kv_heads
    out = torch.empty_like(q)
    if not batch:
        return out
    if splits is None:
        splits = attention_splits(q.device, batch * num_kv_heads, kv_index.shape[1])
    part_acc = part_stats = out  # unused with one split
    if splits > 1:
        part_acc = torch.empty(batch, num_heads, splits, head_dim, dtype=torch.float32, device=q.device)
        part_stats = torch.empty(batch, num_heads, splits, 2, dtype=torch.float32, device=q.device)
    _paged_decode_attention_kernel[(batch, num_kv_heads, splits)](
        q, k_pool, v_pool, kv_index, kv_index.stride(0), kv_lens, kv_lens.stride(0), out,
        head_dim**-0.5 if scale is None else scale, part_acc, part_stats,
        NUM_KV_HEADS=num_kv_heads, GROUP=group, HEAD_DIM=head_dim,
        BLOCK_G=max(16, triton.next_power_of_2(group)), BLOCK_N=64, SPLITS=splits,
    )  # fmt: skip
    if splits > 1:
        _merge_splits_kernel[(batch * num_heads,)](
            part_acc, part_stats, out, SPLITS=splits, BLOCK_S=triton.next_power_of_2(splits), HEAD_DIM=head_dim
        )
    return out


@triton.jit
def _silu_mul_kernel(gate_up_ptr, out_ptr, width, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    valid = cols < width
    gate = tl.load(gate_up_ptr + row * 2 * width + cols, mask=valid, other=0.0)
    up = tl.load(gate_up_ptr + row * 2 * width + width + cols, mask=valid, other=0.0)
    g = gate.to(tl.float32)
    activated = (g / (1.0 + tl.exp(-g))).to(gate.dtype).to(tl.float32)  # silu rounded, then the product
    tl.store(out_ptr + row * width + cols, (activated * up.to(tl.float32)).to(gate.dtype), mask=valid)


def silu_mul(gate_up: torch.Tensor) -> torch.Tensor:
    """SwiGLU's `silu(gate) * up` over the fused projection: [T, 2 * I] (gate then up) -> [T, I]."""
    rows, double = gate_up.shape
    width = double // 2
    out = torch.empty(rows, width, dtype=gate_up.dtype, device=gate_up.device)
    if rows:
        block = min(1024, triton.next_power_of_2(width))
        _silu_mul_kernel[(rows, triton.cdiv(width, block))](gate_up, out, width, BLOCK=block)
    return out
