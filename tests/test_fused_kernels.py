"""The fused Triton kernels of the CUDA forward pass against plain torch (fused_kernels.py).

On a CUDA machine the kernels run compiled; elsewhere, where Triton is installed, under Triton's
interpreter (TRITON_INTERPRET=1, the same kernel code executed on the CPU), in float32 and float16
(the interpreter does not round bfloat16 as the GPU does). Without Triton the module is skipped.
"""

from __future__ import annotations

import os

import pytest
import torch
from torch.nn import functional as F

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # read when the kernels are defined
pytest.importorskip("triton")

from pdlb.engines.torch import fused_kernels as kernels
from pdlb.engines.torch.decode_graphs import DecodeGraphs
from pdlb.engines.torch.llama import LlamaModel
from pdlb.engines.torch.model import KVPool, SeqChunk
from pdlb.models.config import LlamaConfig

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
DTYPES = [torch.float32, torch.float16] + ([torch.bfloat16] if DEVICE == "cuda" else [])
# Rounding to the dtype at the same points as the reference: equal up to the dtype's last bit
# (float32: summation order only).
TOLERANCE = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 2e-2}


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    """The reference rotary helper (Llama's, as in transformers): (x1, x2) -> (-x2, x1) on the last dim."""
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def randn(*shape: int, dtype: torch.dtype, scale: float = 1.0) -> torch.Tensor:
    return (torch.randn(*shape) * scale).to(DEVICE, dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_add_rms_norm_updates_the_residual_and_normalises_as_the_reference(dtype):
    torch.manual_seed(1)
    x, delta, weight = randn(7, 96, dtype=dtype), randn(7, 96, dtype=dtype), randn(96, dtype=dtype)
    expected_x = x + delta

    def reference(t: torch.Tensor) -> torch.Tensor:
        h = t.float()
        return weight * (h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + 1e-5)).to(dtype)

    residual = x.clone()
    out = kernels.add_rms_norm(residual, delta, weight, 1e-5)
    assert torch.equal(residual, expected_x)  # the residual stream holds the rounded sum
    assert (out - reference(expected_x)).abs().max().item() <= TOLERANCE[dtype] * 4
    untouched = x.clone()
    out = kernels.add_rms_norm(untouched, None, weight, 1e-5)
    assert torch.equal(untouched, x) and (out - reference(x)).abs().max().item() <= TOLERANCE[dtype] * 4


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_rotary_kv_write_rotates_q_and_k_and_stores_k_and_v_at_the_slots(dtype):
    torch.manual_seed(2)
    tokens, heads, kv_heads, head_dim = 5, 6, 2, 16
    qkv = randn(tokens, (heads + 2 * kv_heads) * head_dim, dtype=dtype)
    positions = torch.tensor([0, 3, 4, 100, 4095])
    inv_freq = 1.0 / (10000.0 ** (torch.arange(0, head_dim, 2).float() / head_dim))
    angles = positions.float()[:, None] * inv_freq
    # the slots as a strided column of a wider table, as decode plans hold them
    table = torch.tensor([[9, 3], [9, 7], [9, 1], [9, 12], [9, 15]]).to(DEVICE)
    k_pool = torch.full((16, kv_heads, head_dim), float("nan"), dtype=dtype, device=DEVICE)
    v_pool = k_pool.clone()
    q = kernels.rotary_kv_write(
        qkv, angles.cos().to(DEVICE), angles.sin().to(DEVICE), table[:, 1], k_pool, v_pool, heads, kv_heads
    )
    cos = torch.cat((angles.cos(), angles.cos()), -1).to(DEVICE, dtype).unsqueeze(1)
    sin = torch.cat((angles.sin(), angles.sin()), -1).to(DEVICE, dtype).unsqueeze(1)
    q_ref, k_ref, v_ref = qkv.split((heads * head_dim, kv_heads * head_dim, kv_heads * head_dim), -1)
    q_ref, k_ref = q_ref.view(tokens, heads, head_dim), k_ref.view(tokens, kv_heads, head_dim)
    q_ref, k_ref = q_ref * cos + _rotate_half(q_ref) * sin, k_ref * cos + _rotate_half(k_ref) * sin
    slots = table[:, 1]
    tol = TOLERANCE[dtype]
    assert (q - q_ref).abs().max().item() <= tol
    assert (k_pool[slots] - k_ref).abs().max().item() <= tol
    assert torch.equal(v_pool[slots], v_ref.reshape(tokens, kv_heads, head_dim))
    others = [s for s in range(16) if s not in slots.tolist()]
    assert k_pool[others].isnan().all() and v_pool[others].isnan().all()  # nothing else written


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("heads,kv_heads,splits", [(6, 2, 1), (4, 4, 1), (9, 3, 1), (9, 3, 3), (4, 2, 4)])
def test_paged_decode_attention_reads_each_sequence_through_its_slot_table(dtype, heads, kv_heads, splits):
    """One program per sequence and KV head, or the context split and the parts merged (short rows
    leave some parts empty)."""
    torch.manual_seed(3)
    head_dim, slots = 64, 400
    k_pool, v_pool = randn(slots, kv_heads, head_dim, dtype=dtype), randn(slots, kv_heads, head_dim, dtype=dtype)
    lengths = [1, 63, 64, 65, 200]  # block edges of the kernel's 64-slot tiles
    index = torch.zeros(len(lengths), 256, dtype=torch.long)
    for row, length in enumerate(lengths):
        index[row, :length] = torch.randperm(slots - 1)[:length] + 1  # scattered, as a pool's slots are
    q = randn(len(lengths), heads, head_dim, dtype=dtype)
    out = kernels.paged_decode_attention(
        q, k_pool, v_pool, index.to(DEVICE), torch.tensor(lengths).to(DEVICE), splits=splits
    )
    for row, length in enumerate(lengths):
        taken = index[row, :length].to(DEVICE)
        expected = F.scaled_dot_product_attention(
            q[row].float().unsqueeze(1),  # [H, 1, hd]
            k_pool[taken].float().transpose(0, 1),
            v_pool[taken].float().transpose(0, 1),
            enable_gqa=True,
        ).squeeze(1)
        assert (out[row].float() - expected).abs().max().item() <= TOLERANCE[dtype] * 2, (row, length)


def test_attention_splits_fill_the_gpu_only_where_contexts_are_long():
    device = torch.device("cpu")  # 16 multiprocessors assumed off CUDA
    assert kernels.attention_splits(device, programs=8, columns=256) == 1  # short: not worth a merge
    assert kernels.attention_splits(device, programs=8, columns=2048) == 2048 // kernels.SPLIT_MIN_TOKENS
    assert kernels.attention_splits(device, programs=64, columns=1 << 20) == 2  # 8 per multiprocessor
    assert kernels.attention_splits(device, programs=1, columns=1 << 20) == kernels.MAX_SPLITS
    assert kernels.attention_splits(device, programs=4096, columns=8192) == 1  # enough programs already


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_silu_mul_is_swiglu_over_the_fused_gate_up_rows(dtype):
    torch.manual_seed(4)
    gate_up = randn(3, 2 * 1500, dtype=dtype, scale=3.0)  # wider than one block of the kernel
    gate, up = gate_up.chunk(2, -1)
    assert (kernels.silu_mul(gate_up) - F.silu(gate) * up).abs().max().item() <= TOLERANCE[dtype] * 16


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_fused_forward_matches_the_torch_forward(dtype):
    """The whole model, fused against plain torch on the same weights and pool: prefill of a whole
    prompt, a mixed step (a chunk and a decode token), eager decode steps and the fixed-shape decode
    plans the CUDA graphs replay."""
    config = LlamaConfig(300, 64, 96, 2, 4, 2, 16, max_position=512, attention_bias=True)
    fused, plain = LlamaModel.random(config, seed=5), LlamaModel.random(config, seed=5)
    fused.fused, plain.fused = True, False
    pools = []
    for model in (fused, plain):
        model.to(DEVICE, dtype)
        pools.append(KVPool(model.kv_shape(), 256, torch.device(DEVICE), dtype))
    prompts = [[(7 * i + j) % 300 for j in range(n)] for i, n in enumerate((20, 33, 70))]
    slots = [list(range(1 + 80 * i, 1 + 80 * i + 75)) for i in range(3)]
    tol = {torch.float32: 1e-4, torch.float16: 3e-2, torch.bfloat16: 1e-1}[dtype]

    def both(chunks: list[SeqChunk]) -> torch.Tensor:
        got, expected = fused(chunks, pools[0]), plain(chunks, pools[1])
        assert (got - expected).abs().max().item() <= tol
        if dtype != torch.bfloat16:  # bfloat16's 8-bit mantissa can swap near-tied tokens
            assert torch.equal(got.argmax(-1), expected.argmax(-1))
        return got

    both([SeqChunk(prompts[0], 0, slots[0])])  # whole prompt: causal SDPA
    both([SeqChunk(prompts[1][:10], 0, slots[1])])
    both([SeqChunk(prompts[1][10:], 10, slots[1]), SeqChunk(prompts[2], 0, slots[2])])  # mixed
    tokens = [prompts[i][-1] for i in range(3)]
    lengths = [len(p) for p in prompts]
    graphs = [DecodeGraphs(m, p, 8, 512, capture=False) for m, p in zip((fused, plain), pools, strict=True)]
    for step in range(4):  # decode: eager, then fixed-shape plans padded to a bucket
        chunks = [SeqChunk([tokens[i]], lengths[i], slots[i]) for i in range(3)]
        if step % 2:
            key = graphs[0].bucket(chunks)
            got, expected = graphs[0].run(chunks, key), graphs[1].run(chunks, key)
            assert (got - expected).abs().max().item() <= tol
        else:
            got = both(chunks)
        tokens = got.argmax(-1).tolist()
        lengths = [n + 1 for n in lengths]
    assert torch.allclose(pools[0].k.float(), pools[1].k.float(), atol=tol)  # the same K/V written
