"""Decode attention that reads the KV pool in place on a CPU: pdlb's own C++ kernel (AVX2, FMA).

The default CPU decode path (pool_attention.py) copies every decode row's K and V out of the pool
with `index_select` at each layer, then runs SDPA over the copy: at batch 16 and ~230 tokens of
context in SmolLM2 that is ~170 MB copied and read again per step. vLLM's CPU attention reads its
paged cache in place; so does this kernel (`paged_attention_cpu.cpp`, beside this file): per
(sequence, KV head) it walks the sequence's slot list in blocks of 32 tokens, loads each K and V
row from its pool slot once for all the query heads of that KV head, and keeps a running maximum
and sum per query head (online softmax). float32 arithmetic; K/V, Q and the result in float32,
bfloat16 or float16, converted on load and store.

Threads: the kernel runs on the calling thread's OpenMP team of `torch.get_num_threads()` threads.
It is built against libgomp's soname, which torch has already loaded, so the team is torch's own:
the same thread count and, with --torch-bind-cpus, the same binding, and no second pool of threads
competing for the cores. ctypes releases the GIL for the call.

Built once per machine with the system C++ compiler (cxx_build.py: ~5 s on 2 cores, then cached);
`unavailable_reason()` says why it cannot run here (no compiler, no AVX2/FMA), `shared()` builds
and loads it. Shapes: q [B, H, hd] (one query token per row; strided rows and heads allowed), the
layer's pool K/V [slots, Hkv, hd], the slot table [B, L] int64 (row b's first lens[b] entries are
its context), lens [B] int64 (1 <= lens[b] <= L); the result [B, H * hd] in q's dtype.
"""

from __future__ import annotations

import ctypes
import functools
import math
from pathlib import Path

import torch

from pdlb.engines.torch import cxx_build

SOURCE = Path(__file__).with_suffix(".cpp")
FLAGS = ["-O3", "-march=native", "-std=c++17", "-fopenmp"]
DTYPE_CODES = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}
WHAT = "pdlb's paged decode attention kernel"

# the kernel's status codes (paged_attention_cpu.cpp)
_OK, _SLOT_OUT_OF_RANGE, _BAD_LENGTH, _BAD_SHAPE = 0, 1, 2, 3


class Unavailable(RuntimeError):
    """The kernel cannot run here or for this model; the message says why, in one line."""


def unavailable_reason() -> str | None:
    """Why the kernel cannot be built or run here (one line), or None when it can."""
    if (problem := cxx_build.compiler_problem()) is not None:
        return problem
    capability = torch.backends.cpu.get_cpu_capability()
    if capability not in ("AVX2", "AVX512"):
        return f"it needs an x86 CPU with AVX2 and FMA; torch reports {capability!r} here"
    return None


class PagedDecodeAttention:
    """The loaded kernel: `kernel(q, k_pool, v_pool, table, lens)` -> [B, H * hd] (module docstring).

    Raises ValueError for shapes or dtypes it does not take (head_dim not a multiple of 8 or above
    `max_head_dim`, more than `max_group` query heads per KV head, K and V of different layouts),
    IndexError for a slot outside the pool or a length outside 1..L (checked before any read)."""

    def __init__(self, library: Path) -> None:
        self.library = library
        lib = ctypes.CDLL(str(library))  # CDLL: the GIL is released during calls
        fn = lib.pdlb_paged_decode_attention
        i64, i32, ptr = ctypes.c_int64, ctypes.c_int, ctypes.c_void_p
        fn.argtypes = [ptr, i64, i64, i32, ptr, ptr, i64, i64, i64, i32, ptr, i64, i64, ptr, ptr, i64]
        fn.argtypes += [i32, i32, i32, i32, ctypes.c_float, i32]
        fn.restype = i32
        self._fn = fn
        head_dim, group = ctypes.c_int(), ctypes.c_int()
        lib.pdlb_paged_attention_limits(ctypes.byref(head_dim), ctypes.byref(group))
        self.max_head_dim, self.max_group = head_dim.value, group.value

    def supports(self, heads: int, kv_heads: int, head_dim: int) -> str | None:
        """Why a model of this attention shape cannot use the kernel, or None when it can."""
        if head_dim % 8 or not 8 <= head_dim <= self.max_head_dim:
            return f"head_dim {head_dim} is not a multiple of 8 in 8..{self.max_head_dim}"
        if heads % kv_heads or heads // kv_heads > self.max_group:
            return f"{heads} query heads over {kv_heads} KV heads (at most {self.max_group} per KV head)"
        return None

    def __call__(
        self, q: torch.Tensor, k_pool: torch.Tensor, v_pool: torch.Tensor, table: torch.Tensor, lens: torch.Tensor
    ) -> torch.Tensor:
        batch, heads, head_dim = q.shape
        slots, kv_heads, _ = k_pool.shape
        if (
            q.stride(2) != 1
            or k_pool.stride() != v_pool.stride()
            or k_pool.stride(2) != 1
            or k_pool.shape != v_pool.shape
            or k_pool.dtype != v_pool.dtype
            or k_pool.shape[2] != head_dim
            or q.dtype not in DTYPE_CODES
            or k_pool.dtype not in DTYPE_CODES
            or table.dtype != torch.int64
            or lens.dtype != torch.int64
            or table.dim() != 2
            or table.shape[0] != batch
            or lens.shape != (batch,)
            or q.device.type != "cpu"
            or k_pool.device.type != "cpu"
        ):
            raise ValueError(
                f"paged decode attention takes q [B, H, hd], K/V pools [slots, Hkv, hd] of one layout and a "
                f"CPU dtype, an int64 slot table [B, L] and lengths [B]; got q {tuple(q.shape)} {q.dtype}, "
                f"K {tuple(k_pool.shape)} {k_pool.dtype}, V {tuple(v_pool.shape)} {v_pool.dtype}, "
                f"table {tuple(table.shape)} {table.dtype}, lens {tuple(lens.shape)} {lens.dtype}"
            )
        out = torch.empty(batch, heads * head_dim, dtype=q.dtype)
        if batch == 0:
            return out
        # a fixed decode plan's table and lengths are strided views of one buffer: rows must be dense
        table = table if table.stride(1) == 1 else table.contiguous()
        lens = lens.contiguous()
        status = self._fn(
            q.data_ptr(),
            q.stride(0),
            q.stride(1),
            DTYPE_CODES[q.dtype],
            k_pool.data_ptr(),
            v_pool.data_ptr(),
            k_pool.stride(0),
            k_pool.stride(1),
            slots,
            DTYPE_CODES[k_pool.dtype],
            table.data_ptr(),
            table.stride(0),
            table.shape[1],
            lens.data_ptr(),
            out.data_ptr(),
            out.stride(0),
            batch,
            heads,
            kv_heads,
            head_dim,
            1.0 / math.sqrt(head_dim),
            torch.get_num_threads(),
        )
        if status == _OK:
            return out
        if status == _SLOT_OUT_OF_RANGE:
            raise IndexError(f"a slot of the table is outside the pool's {slots} slots")
        if status == _BAD_LENGTH:
            raise IndexError(f"a context length is outside 1..{table.shape[1]} (the slot table's width)")
        raise ValueError(f"paged decode attention: {self.supports(heads, kv_heads, head_dim) or 'unsupported shape'}")


MODES = ("auto", "sdpa", "paged")


def for_model(mode: str, heads: int, kv_heads: int, head_dim: int) -> tuple[PagedDecodeAttention | None, str]:
    """The kernel a CPU model of this attention shape uses under `mode` (--cpu-decode-attention),
    and why, in a few words. "sdpa": none; "paged": the kernel, or Unavailable naming why not;
    "auto": the kernel where it can be built and takes the shape, else none (the reason says why)."""
    if mode == "sdpa":
        return None, "asked for sdpa"
    if mode not in MODES:
        raise ValueError(f"unknown decode attention {mode!r}: one of {', '.join(MODES)}")
    try:
        kernel = shared()
        unsupported = kernel.supports(heads, kv_heads, head_dim)
        if unsupported:
            raise Unavailable(f"{WHAT} does not take this model: {unsupported}")
    except Unavailable as exc:
        if mode == "paged":
            raise
        return None, str(exc)
    return kernel, f"built at {kernel.library}"


@functools.cache
def shared() -> PagedDecodeAttention:
    """The kernel, built (or found in the cache) and loaded once per process. Raises Unavailable
    when this machine cannot build or run it."""
    return cxx_build.load(WHAT, SOURCE, FLAGS, PagedDecodeAttention, Unavailable, unavailable_reason())
