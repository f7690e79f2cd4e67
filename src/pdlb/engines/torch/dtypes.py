"""The torch engine's model and KV dtype: by name, or `auto` (bfloat16 where the CPU multiplies it natively).

A CPU with AVX512-BF16 or AMX runs bfloat16 GEMMs natively: half the weight and KV bytes of float32
and more multiplies per cycle. Elsewhere torch emulates them: on AVX2 cores (this project's CI
machine, AMD EPYC) a bfloat16 linear layer ran 8x slower than float32 (17 against 140 GFLOP/s at 512
rows), so `auto` keeps float32 there. On CUDA `auto` is float32 too (pass `--dtype bfloat16`).
"""

from __future__ import annotations

import torch

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
AUTO = "auto"
CHOICES = [AUTO, *sorted(DTYPES)]


def cpu_has_native_bf16() -> bool:
    """AVX512-BF16 or AMX (torch's own CPU probes, the ones vLLM's CPU backend uses too)."""
    probes = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
    return any(bool(getattr(torch.cpu, probe, lambda: False)()) for probe in probes)


def resolve(name: str, device: str) -> torch.dtype:
    """The dtype for `--dtype name` on `device` ("cpu", "cuda", "cuda:1"). Raises ValueError for an
    unknown name, listing the known ones."""
    if name == AUTO:
        return torch.bfloat16 if device == "cpu" and cpu_has_native_bf16() else torch.float32
    if name not in DTYPES:
        raise ValueError(f"unknown dtype {name!r}: one of {', '.join(CHOICES)}")
    return DTYPES[name]


def emulated_on(dtype: torch.dtype, device: str) -> bool:
    """Whether `dtype` would run emulated (slowly) on `device`: bfloat16 on a CPU without native
    bfloat16 support."""
    return device == "cpu" and dtype == torch.bfloat16 and not cpu_has_native_bf16()
