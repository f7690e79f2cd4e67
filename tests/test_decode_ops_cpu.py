"""pdlb's fused decode element-wise ops (decode_ops_cpu.py) against the unfused torch ops they
replace: residual add + RMSNorm against `x + delta` and `F.rms_norm`, rotary + the K/V write against
rotate-half by `torch.cat` and index assignment into the pool, SiLU-mul against `F.silu(gate) * up`;
random and odd shapes, torch's thread count of 1 and 2 (shapes on both sides of the kernels'
single-thread cut-off). Then the selection (--cpu-decode-ops) and a mistyped $CXX."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
from torch.nn import functional as F

from pdlb.engines.torch import cxx_build, decode_ops_cpu

MISSING = decode_ops_cpu.unavailable_reason()
NEEDS_OPS = pytest.mark.skipif(MISSING is not None, reason=f"fused decode ops: {MISSING}")
TOLERANCE = {"atol": 1e-5, "rtol": 1e-5}


@pytest.fixture
def threads(request):
    before = torch.get_num_threads()
    torch.set_num_threads(request.param)
    yield request.param
    torch.set_num_threads(before)


@NEEDS_OPS
@pytest.mark.parametrize("threads", [1, 2], indirect=True)
@pytest.mark.parametrize("rows, dim", [(1, 8), (3, 7), (16, 576), (5, 1001), (64, 2048)])
@pytest.mark.parametrize("with_delta", [True, False], ids=["add", "norm-only"])
def test_add_rms_norm_equals_the_add_then_torchs_rms_norm(threads, rows, dim, with_delta):
    ops = decode_ops_cpu.shared()
    generator = torch.Generator().manual_seed(rows * dim + threads)
    wide = torch.randn(rows, dim + 3, generator=generator) * 3
    x = wide[:, :dim]  # strided rows, as a view of a wider tensor
    delta = torch.randn(rows, dim, generator=generator) if with_delta else None
    weight = torch.randn(dim, generator=generator)
    expected_x = x + delta if with_delta else x.clone()
    expected = F.rms_norm(expected_x, (dim,), weight, 1e-5)
    untouched = wide[:, dim:].clone()
    h = ops.add_rms_norm(x, delta, weight, 1e-5)
    torch.testing.assert_close(x, expected_x, **TOLERANCE)  # the residual stream, added in place
    torch.testing.assert_close(h, expected, **TOLERANCE)
    assert torch.equal(wide[:, dim:], untouched)


@NEEDS_OPS
@pytest.mark.parametrize("threads", [1, 2], indirect=True)
@pytest.mark.parametrize("rows, inter", [(1, 1), (3, 13), (16, 1536), (7, 4099), (48, 2048)])
def test_silu_mul_equals_torchs_silu_times_up(threads, rows, inter):
    ops = decode_ops_cpu.shared()
    generator = torch.Generator().manual_seed(rows * inter + threads)
    gate_up = torch.randn(rows, 2 * inter, generator=generator) * 6  # far into both tails of SiLU
    gate_up[0, 0] = -100.0  # e^100 past float32's range in the kernel's exp: clamped, SiLU ~ 0
    gate, up = gate_up.chunk(2, -1)
    torch.testing.assert_close(ops.silu_mul(gate_up), F.silu(gate) * up, **TOLERANCE)
    with pytest.raises(ValueError, match="not even"):
        ops.silu_mul(gate_up[:, :-1])


def rotate_half_reference(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Hugging Face's rotary: x * cos + rotate_half(x) * sin, with the tables doubled by cat."""
    half = x.shape[-1] // 2
    cos2, sin2 = torch.cat((cos, cos), -1).unsqueeze(1), torch.cat((sin, sin), -1).unsqueeze(1)
    return x * cos2 + torch.cat((-x[..., half:], x[..., :half]), -1) * sin2


@NEEDS_OPS
@pytest.mark.parametrize("threads", [1, 2], indirect=True)
@pytest.mark.parametrize(
    "rows, heads, kv_heads, head_dim",
    [(16, 9, 3, 64), (1, 4, 4, 8), (5, 7, 1, 18), (3, 6, 2, 128), (200, 16, 8, 64)],
    ids=["smollm2", "mha", "odd-hd18", "llama-1b", "parallel"],
)
def test_rotary_kv_write_equals_rotate_half_and_the_pool_writes(threads, rows, heads, kv_heads, head_dim):
    ops = decode_ops_cpu.shared()
    generator = torch.Generator().manual_seed(rows * heads * head_dim + threads)
    qkv = torch.randn(rows, (heads + 2 * kv_heads) * head_dim, generator=generator)
    positions = torch.randint(0, 4000, (rows,), generator=generator).float()
    inv_freq = 1.0 / (10000.0 ** (torch.arange(0, head_dim, 2).float() / head_dim))
    angles = positions.unsqueeze(-1) * inv_freq
    cos, sin = angles.cos(), angles.sin()
    slots = torch.randperm(rows + 20, generator=generator)[:rows] + 1
    k_pool = torch.full((rows + 21, kv_heads, head_dim), float("nan"))
    v_pool = torch.full_like(k_pool, float("nan"))
    q_width, k_width = heads * head_dim, kv_heads * head_dim
    qk = qkv[:, : q_width + k_width].view(rows, heads + kv_heads, head_dim)
    rotated = rotate_half_reference(qk, cos, sin)
    v = qkv[:, q_width + k_width :].view(rows, kv_heads, head_dim).clone()
    ops.rotary_kv_write(qkv, cos, sin, slots, k_pool, v_pool, heads, kv_heads)
    torch.testing.assert_close(qkv[:, : q_width + k_width].view_as(rotated), rotated, **TOLERANCE)
    torch.testing.assert_close(k_pool[slots], rotated[:, heads:], **TOLERANCE)
    assert torch.equal(v_pool[slots], v)
    others = torch.ones(k_pool.shape[0], dtype=torch.bool)
    others[slots] = False
    assert k_pool[others].isnan().all() and v_pool[others].isnan().all()  # no other slot written


@NEEDS_OPS
def test_a_slot_outside_the_pool_or_a_bad_dtype_is_refused_before_anything_is_written():
    ops = decode_ops_cpu.shared()
    qkv = torch.randn(2, 6 * 8)
    cos, sin = torch.ones(2, 4), torch.zeros(2, 4)
    k_pool, v_pool = torch.zeros(4, 1, 8), torch.zeros(4, 1, 8)
    before = qkv.clone()
    with pytest.raises(IndexError, match="outside the pool's 4 slots"):
        ops.rotary_kv_write(qkv, cos, sin, torch.tensor([1, 4]), k_pool, v_pool, 4, 1)
    assert torch.equal(qkv, before) and not k_pool.any() and not v_pool.any()
    with pytest.raises(IndexError):
        ops.rotary_kv_write(qkv, cos, sin, torch.tensor([-1, 2]), k_pool, v_pool, 4, 1)
    with pytest.raises(ValueError, match="int64 slots"):
        ops.rotary_kv_write(qkv, cos, sin, torch.tensor([1, 2], dtype=torch.int32), k_pool, v_pool, 4, 1)
    with pytest.raises(ValueError, match="float32 CPU matrix"):
        ops.add_rms_norm(torch.zeros(2, 8, dtype=torch.bfloat16), None, torch.ones(8), 1e-5)
    with pytest.raises(ValueError, match="does not match"):
        ops.add_rms_norm(torch.zeros(2, 8), torch.zeros(3, 8), torch.ones(8), 1e-5)


def test_auto_falls_back_to_eager_where_the_ops_cannot_build_and_fused_says_why(monkeypatch, tmp_path):
    """--cpu-decode-ops: auto takes the ops where they build, else none with the reason; fused raises
    Unavailable naming it; eager never loads them. A $CXX naming nothing is that reason, not passed
    over for another compiler."""
    assert decode_ops_cpu.for_model("eager")[0] is None
    if MISSING is None:
        assert decode_ops_cpu.for_model("auto")[0] is decode_ops_cpu.shared()
    monkeypatch.setenv("CXX", "g++-does-not-exist")
    decode_ops_cpu.shared.cache_clear()
    try:
        assert cxx_build.compiler() is None and not cxx_build.available()
        ops, why = decode_ops_cpu.for_model("auto")
        assert ops is None and "$CXX='g++-does-not-exist' names no executable" in why
        with pytest.raises(decode_ops_cpu.Unavailable, match="g\\+\\+-does-not-exist"):
            decode_ops_cpu.for_model("fused")
    finally:
        decode_ops_cpu.shared.cache_clear()  # later callers load the built ops again


@pytest.mark.parametrize(
    "flags",
    [
        ["--cpu-decode-ops", "fused"],
        ["--cpu-prefill-ops", "fused"],
        ["--cpu-decode-attention", "paged"],
        ["--cpu-compiled-ops"],
    ],
    ids=["ops", "prefill-ops", "paged", "compiled"],
)
def test_the_scheduler_refuses_a_mistyped_cxx_in_one_line(flags):
    """CXX naming no executable: refused at start (exit 2), the line naming the flag and $CXX, before
    any model loads; it used to fall through to c++ on PATH unnoticed."""
    env = {**os.environ, "CXX": "clang++-typo"}
    argv = [sys.executable, "-m", "pdlb.services.scheduler.main", "--port", "0", *flags]
    run = subprocess.run(argv, capture_output=True, text=True, timeout=120, env=env)
    assert run.returncode == 2, run.stdout + run.stderr
    assert run.stderr.startswith(f"pdlb-scheduler: {' '.join(flags)} needs a C++ compiler"), run.stderr
    assert "$CXX='clang++-typo' names no executable" in run.stderr, run.stderr
    assert len(run.stderr.strip().splitlines()) == 1, run.stderr


@pytest.mark.parametrize(
    "flags",
    [["--cpu-decode-ops", "fused"], ["--cpu-prefill-ops", "fused"], ["--cpu-decode-attention", "paged"]],
    ids=["ops", "prefill-ops", "paged"],
)
def test_the_scheduler_refuses_kernels_for_the_tiny_model_instead_of_ignoring_them(flags):
    """tiny-random has its own attention and layers: an explicit paged/fused is refused in one line
    (it used to be ignored without a word)."""
    if MISSING is not None:
        pytest.skip(f"refused earlier for the missing kernel: {MISSING}")
    argv = [sys.executable, "-m", "pdlb.services.scheduler.main", "--port", "0", "--model", "tiny-random", *flags]
    run = subprocess.run(argv, capture_output=True, text=True, timeout=120)
    assert run.returncode == 2, run.stdout + run.stderr
    assert run.stderr.startswith(f"pdlb-scheduler: {' '.join(flags)}: tiny-random has its own"), run.stderr
    assert len(run.stderr.strip().splitlines()) == 1, run.stderr
