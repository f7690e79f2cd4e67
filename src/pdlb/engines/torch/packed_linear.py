"""Linear layers whose weights oneDNN has reordered once into its blocked GEMM layout (CPU only).

`F.linear` on a CPU multiplies by the weight in its checkpoint layout, which the GEMM repacks into
cache-sized blocks on every call. For a decode step's few rows that repacking is a large share of the
work: on 2 AVX2 cores (SmolLM2's four per-layer GEMMs at 16 rows, float32) the packed weights take
1.27 ms per layer against 1.88 ms, while 512-row prefill GEMMs are unchanged (25.7 vs 25.8 ms). This
is the same reordering torch's own compiler applies to frozen CPU linears (`mkldnn._linear_pointwise`
over `mkldnn._reorder_linear_weight`).

A packed weight is opaque (an MKL-DNN tensor): it cannot be moved or cast, so models are packed
last, after `.to(device, dtype)`, and only for inference.
"""

from __future__ import annotations

import logging

import torch
from torch import nn
from torch.nn import functional as F

log = logging.getLogger(__name__)

DECODE_ROWS_HINT = 16  # the batch the reordering is tuned for; other row counts run correctly


def supported(dtype: torch.dtype) -> bool:
    """Whether this torch build and CPU can pack weights of `dtype`: float32 wherever oneDNN is
    built in, bfloat16 only where the CPU multiplies bfloat16 natively (AVX512-BF16 or AMX)."""
    if not torch.backends.mkldnn.is_available() or not hasattr(torch.ops.mkldnn, "_reorder_linear_weight"):
        return False
    if dtype == torch.float32:
        return True
    return dtype == torch.bfloat16 and bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())


class PackedLinear(nn.Module):
    """`y = x @ W.T + b` over oneDNN's reordered W. x [..., in_features] -> [..., out_features]."""

    def __init__(
        self, weight: torch.Tensor, bias: torch.Tensor | None = None, rows_hint: int = DECODE_ROWS_HINT
    ) -> None:
        """`weight` [out_features, in_features] and `bias` [out_features], as nn.Linear holds them."""
        super().__init__()
        self.out_features, self.in_features = weight.shape
        # plain attributes, not parameters or buffers: nn.Module.to() cannot move an opaque tensor
        self.packed = torch.ops.mkldnn._reorder_linear_weight(weight.detach(), rows_hint)
        self.bias_value = None if bias is None else bias.detach().clone()

    def matches(self, weight: torch.Tensor, bias: torch.Tensor | None = None) -> bool:
        """Whether this layer gives F.linear's result on a probe input, within float rounding."""
        probe = torch.randn(3, self.in_features, generator=torch.Generator().manual_seed(0)).to(weight.dtype)
        with torch.no_grad():
            expected, got = F.linear(probe, weight, bias).float(), self(probe).float()
        tolerance = 1e-3 if weight.dtype == torch.float32 else 5e-2
        return torch.allclose(got, expected, rtol=tolerance, atol=tolerance)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.ops.mkldnn._linear_pointwise(x, self.packed, self.bias_value, "none", [], "")

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, packed=oneDNN"


def pack_linears(model: nn.Module) -> int:
    """Replace every nn.Linear of a CPU model by a PackedLinear, each checked first to give
    F.linear's result (PackedLinear.matches); returns how many were packed (0 where `supported` says
    no, or a check fails: the model then stays as it was). A model with a `pack_tied_head` method
    (tied embeddings: the logits GEMM is no nn.Linear) has it called too."""
    linears = [(name, m) for name, m in model.named_modules() if type(m) is nn.Linear]
    if not linears or linears[0][1].weight.device.type != "cpu" or not supported(linears[0][1].weight.dtype):
        return 0
    packed = {}
    for name, linear in linears:
        candidate = PackedLinear(linear.weight, linear.bias)
        if not candidate.matches(linear.weight, linear.bias):
            log.warning("oneDNN's packed %s differs from F.linear; weights left unpacked", name)
            return 0
        packed[name] = candidate
    for name, candidate in packed.items():
        owner, _, leaf = name.rpartition(".")
        setattr(model.get_submodule(owner) if owner else model, leaf, candidate)
    if hasattr(model, "pack_tied_head"):
        model.pack_tied_head()
    return len(packed)
