"""The element-wise ops of a CPU decode step, fused: pdlb's own C++ kernels (AVX2, FMA, float32).

Between its GEMMs an eager Llama layer runs about twenty small torch ops (residual adds, RMSNorm's
pow, mean, rsqrt and multiplies, rotary's multiply, roll and add, the K/V index_put into the pool,
SiLU and the multiply), each a dispatch and a pass over its tensor. At a decode batch of 16 on 2
cores they take ~12 ms of a ~90 ms SmolLM2 step, mostly dispatch; vLLM's compiled CPU model fuses
them. torch.compile's versions (compiled_ops.py) cost more in guards than they save at that size.
Prefill and mixed steps take the same ops (--cpu-prefill-ops): at thousands of rows the passes,
not the dispatch, are the cost.
Here three calls per layer, through ctypes into `decode_ops_cpu.cpp` beside this file:

- `add_rms_norm(x, delta, weight, eps)` -> h: x += delta in place (delta None: no add), h =
  RMSNorm(x) * weight; x [T, D] (rows may be strided), delta [T, D], weight [D], h [T, D] new;
- `rotary_kv_write(qkv, cos, sin, slots, k_pool, v_pool, heads, kv_heads)`: the fused QKV
  projection's output [T, (H + 2 Hkv) * hd] with Q and K rotated in place (rotate-half layout; cos,
  sin [T, hd / 2] float32, as llama.py's `_rotary_tables` returns them), then each row's K and V
  heads written to pool slot `slots[t]` (int64 [T]) of k_pool, v_pool [slots, Hkv, hd];
- `silu_mul(gate_up)` -> [T, I]: SiLU(gate) * up of the fused gate/up projection's output [T, 2 I].

Only float32 tensors (the CPU's default dtype where it has no native bfloat16; llama.py keeps the
eager ops otherwise). Threads: torch's own OpenMP team of `torch.get_num_threads()`, as in
paged_attention_cpu.py; calls over fewer than 65,536 elements run on the calling thread alone.
Built once per machine with the system C++ compiler into the same cache as the paged kernel
(cxx_build.py, ~3 s on 2 cores). Bad shapes and dtypes raise ValueError; a slot outside the pool
raises IndexError before anything is written.
"""

from __future__ import annotations

import ctypes
import functools
from pathlib import Path

import torch

from pdlb.engines.torch import cxx_build, paged_attention_cpu

SOURCE = Path(__file__).with_suffix(".cpp")
FLAGS = paged_attention_cpu.FLAGS
WHAT = "pdlb's fused decode element-wise ops"
MODES = ("auto", "eager", "fused")

# the kernels' status codes (decode_ops_cpu.cpp)
_OK, _SLOT_OUT_OF_RANGE = 0, 1


class Unavailable(paged_attention_cpu.Unavailable):
    """The ops cannot run here; the message says why, in one line."""


def _f32_rows(name: str, t: torch.Tensor) -> None:
    if t.dtype != torch.float32 or t.device.type != "cpu" or t.dim() != 2 or t.stride(1) != 1:
        raise ValueError(
            f"{name} must be a float32 CPU matrix with dense rows; got {tuple(t.shape)} {t.dtype} on "
            f"{t.device} with strides {t.stride()}"
        )


class DecodeOps:
    """The loaded library's three ops (module docstring)."""

    def __init__(self, library: Path) -> None:
        self.library = library
        lib = ctypes.CDLL(str(library))  # CDLL: the GIL is released during calls
        i64, i32, ptr, f32 = ctypes.c_int64, ctypes.c_int, ctypes.c_void_p, ctypes.c_float
        self._add_rms_norm = lib.pdlb_add_rms_norm
        self._add_rms_norm.argtypes = [ptr, i64, ptr, i64, ptr, ptr, i64, i64, i64, f32, i32]
        self._rotary_kv_write = lib.pdlb_rotary_kv_write
        self._rotary_kv_write.argtypes = [ptr, i64, ptr, ptr, i64, ptr, ptr, ptr, i64, i64, i32, i32, i32, i32]
        self._silu_mul = lib.pdlb_silu_mul
        self._silu_mul.argtypes = [ptr, i64, ptr, i64, i64, i64, i32]
        for fn in (self._add_rms_norm, self._rotary_kv_write, self._silu_mul):
            fn.restype = i32

    def add_rms_norm(
        self, x: torch.Tensor, delta: torch.Tensor | None, weight: torch.Tensor, eps: float
    ) -> torch.Tensor:
        """x += delta in place (unless delta is None); returns RMSNorm(x) * weight as a new [T, D]."""
        _f32_rows("x", x)
        rows, dim = x.shape
        if delta is not None:
            _f32_rows("delta", delta)
            if delta.shape != x.shape:
                raise ValueError(f"delta {tuple(delta.shape)} does not match x {tuple(x.shape)}")
        if weight.dtype != torch.float32 or weight.shape != (dim,) or not weight.is_contiguous():
            raise ValueError(f"weight must be float32 [{dim}], dense; got {tuple(weight.shape)} {weight.dtype}")
        out = torch.empty(rows, dim)
        self._check(
            self._add_rms_norm(
                x.data_ptr(),
                x.stride(0),
                None if delta is None else delta.data_ptr(),
                0 if delta is None else delta.stride(0),
                weight.data_ptr(),
                out.data_ptr(),
                out.stride(0),
                rows,
                dim,
                eps,
                torch.get_num_threads(),
            ),
            "add_rms_norm",
        )
        return out

    def rotary_kv_write(
        self,
        qkv: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        slots: torch.Tensor,
        k_pool: torch.Tensor,
        v_pool: torch.Tensor,
        heads: int,
        kv_heads: int,
    ) -> None:
        """Rotates qkv's Q and K heads in place and writes its K and V heads to the pool slots."""
        _f32_rows("qkv", qkv)
        rows = qkv.shape[0]
        num_slots, pool_heads, head_dim = k_pool.shape
        ok = (
            pool_heads == kv_heads
            and heads >= 1
            and head_dim % 2 == 0
            and qkv.shape[1] == (heads + 2 * kv_heads) * head_dim
            and all(t.dtype == torch.float32 and t.device.type == "cpu" for t in (cos, sin, k_pool, v_pool))
            and cos.shape == sin.shape == (rows, head_dim // 2)
            and cos.stride() == sin.stride()
            and cos.stride(1) == 1
            and k_pool.is_contiguous()
            and v_pool.is_contiguous()
            and v_pool.shape == k_pool.shape
            and slots.dtype == torch.int64
            and slots.shape == (rows,)
        )
        if not ok:
            raise ValueError(
                f"rotary_kv_write takes float32 qkv [T, (H + 2 Hkv) * hd], cos/sin [T, hd / 2], int64 slots [T] "
                f"and dense pools [slots, Hkv, hd]; got qkv {tuple(qkv.shape)} with H={heads}, Hkv={kv_heads}, "
                f"cos {tuple(cos.shape)} {cos.dtype}, slots {tuple(slots.shape)} {slots.dtype}, "
                f"pools {tuple(k_pool.shape)} {k_pool.dtype}"
            )
        slots = slots.contiguous()
        status = self._rotary_kv_write(
            qkv.data_ptr(),
            qkv.stride(0),
            cos.data_ptr(),
            sin.data_ptr(),
            cos.stride(0),
            slots.data_ptr(),
            k_pool.data_ptr(),
            v_pool.data_ptr(),
            num_slots,
            rows,
            heads,
            kv_heads,
            head_dim,
            torch.get_num_threads(),
        )
        if status == _SLOT_OUT_OF_RANGE:
            raise IndexError(f"a write slot is outside the pool's {num_slots} slots")
        self._check(status, "rotary_kv_write")

    def silu_mul(self, gate_up: torch.Tensor) -> torch.Tensor:
        """SiLU(gate_up[:, :I]) * gate_up[:, I:] as a new [T, I]."""
        _f32_rows("gate_up", gate_up)
        rows, width = gate_up.shape
        if width % 2:
            raise ValueError(f"gate_up's width {width} is not even (gate and up side by side)")
        out = torch.empty(rows, width // 2)
        self._check(
            self._silu_mul(
                gate_up.data_ptr(),
                gate_up.stride(0),
                out.data_ptr(),
                out.stride(0),
                rows,
                width // 2,
                torch.get_num_threads(),
            ),
            "silu_mul",
        )
        return out

    @staticmethod
    def _check(status: int, name: str) -> None:
        if status != _OK:
            raise ValueError(f"{name}: the kernel refused the shapes (status {status})")


def unavailable_reason() -> str | None:
    """Why the ops cannot be built or run here (one line), or None when they can (the paged kernel's
    conditions: a C++ compiler and an AVX2/FMA CPU)."""
    return paged_attention_cpu.unavailable_reason()


def for_model(mode: str) -> tuple[DecodeOps | None, str]:
    """The ops a CPU Llama model uses under `mode` (--cpu-decode-ops) and why, in a few words.
    "eager": none; "fused": the ops, or Unavailable naming why not; "auto": the ops where they
    can be built, else none (the reason says why)."""
    if mode == "eager":
        return None, "asked for eager"
    if mode not in MODES:
        raise ValueError(f"unknown decode ops {mode!r}: one of {', '.join(MODES)}")
    try:
        ops = shared()
    except Unavailable as exc:
        if mode == "fused":
            raise
        return None, str(exc)
    return ops, f"built at {ops.library}"


@functools.cache
def shared() -> DecodeOps:
    """The ops, built (or found in the cache) and loaded once per process. Raises Unavailable when
    this machine cannot build or run them."""
    return cxx_build.load(WHAT, SOURCE, FLAGS, DecodeOps, Unavailable, unavailable_reason())
