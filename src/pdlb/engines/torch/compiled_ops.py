"""The Llama layer's element-wise ops on a CPU, each group fused into one inductor-compiled kernel.

Eager, a layer runs about ten element-wise torch ops between its GEMMs (residual adds, RMSNorm,
rotary's multiply, roll and add, SiLU and the multiply), each a pass over its tensor and a dispatch
(~10-30 us at a decode batch of 16). vLLM's CPU build compiles its model for the same reason. Here
three groups are compiled (torch.compile, inductor, dynamic shapes), the GEMMs left to oneDNN:

- `add_rms_norm(x, delta, weight, eps)` -> (x + delta, RMSNorm(x + delta)): [T, D] each;
- `rotary(qk, cos, sin)`: [T, H + Hkv, hd] rotated (rotate-half layout; cos, sin [T, 1, hd] with
  sin's first half negated, as llama.py builds them);
- `silu_mul(gate_up)`: [T, 2 * I] -> [T, I].

RMSNorm is computed in float32 and cast back before the weight, as llama.RMSNorm does. llama.py calls
them only in steps of at least COMPILED_OPS_MIN_TOKENS tokens (prefill): on a few rows a compiled
call's guards cost more than the fusion saves. `warm_up` compiles them at start, so no compile
happens while serving. Needs a C++ compiler (cxx_build.available()).
"""

from __future__ import annotations

import functools

import torch
from torch.nn import functional as F


def _add_rms_norm(
    x: torch.Tensor, delta: torch.Tensor, weight: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    total = x + delta
    h = total.float()
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    return total, weight * h.to(x.dtype)


def _rotary(qk: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    return torch.addcmul(qk * cos, qk.roll(qk.shape[-1] // 2, -1), sin)


def _silu_mul(gate_up: torch.Tensor) -> torch.Tensor:
    gate, up = gate_up.chunk(2, -1)
    return F.silu(gate) * up


class CompiledOps:
    """The three groups, compiled on first use (warm_up compiles them up front)."""

    def __init__(self) -> None:
        compile_ = functools.partial(torch.compile, dynamic=True, fullgraph=True)
        self.add_rms_norm = compile_(_add_rms_norm)
        self.rotary = compile_(_rotary)
        self.silu_mul = compile_(_silu_mul)

    def warm_up(self, hidden: int, heads: int, kv_heads: int, head_dim: int, intermediate: int, dtype) -> None:
        """Compile every group for any token count above 1 (torch.compile specialises a size of 1
        even with dynamic shapes; llama.py never passes fewer than COMPILED_OPS_MIN_TOKENS)."""
        for tokens in (3,):
            x = torch.zeros(tokens, hidden, dtype=dtype)
            self.add_rms_norm(x, x, torch.ones(hidden, dtype=dtype), 1e-5)
            trig = torch.zeros(tokens, 1, head_dim, dtype=dtype)
            # as llama.py passes it: Q and K heads, a view of the fused QKV projection's rows
            qkv = torch.zeros(tokens, (heads + 2 * kv_heads) * head_dim, dtype=dtype)
            qk = qkv[:, : (heads + kv_heads) * head_dim].view(tokens, heads + kv_heads, head_dim)
            self.rotary(qk, trig, trig)
            self.silu_mul(torch.zeros(tokens, 2 * intermediate, dtype=dtype))


@functools.cache
def shared() -> CompiledOps:
    """One instance per process: its compiled code serves every runner's model."""
    return CompiledOps()
