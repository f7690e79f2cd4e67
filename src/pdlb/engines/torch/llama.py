"""A Llama-family decoder over the shared token-slot KV pool (the scheduler's real model).

RMSNorm, rotary embeddings (rotate-half layout, as Hugging Face checkpoints store Q/K), grouped-query
attention whose pool holds only the KV heads, a SwiGLU MLP and optionally tied embeddings. One
forward pass serves a mixed batch of prefill chunks and decode tokens (see model.py's batch plan).
"""

from __future__ import annotations

import functools
import math

import torch
from torch import nn
from torch.nn import functional as F

from pdlb.engines.torch import pool_attention
from pdlb.engines.torch.compiled_ops import CompiledOps
from pdlb.engines.torch.decode_ops_cpu import DecodeOps
from pdlb.engines.torch.model import BatchPlan, DecodePlan, KVPool, SeqChunk
from pdlb.models.config import LlamaConfig

# Steps of fewer tokens run the element-wise ops eagerly even with compiled_ops set: at a decode batch
# of 16 on 2 cores the ~120 compiled calls' guards and dispatch cost ~15 ms a step more than eager ops
# (engine_bench, 2026-12-01), while a 2,048-token prefill step gained.
COMPILED_OPS_MIN_TOKENS = 256


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype == torch.float32 and self.weight.dtype == torch.float32:
            return F.rms_norm(x, self.weight.shape, self.weight, self.eps)  # one op instead of six
        # computed in float32 like the reference implementations, then cast back
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * h.to(x.dtype)


class LlamaLayer(nn.Module):
    """Q, K and V projections stacked in one matrix (rows: Q heads, K heads, V heads), and gate and
    up in another (rows: gate, up), so each is one GEMM; checkpoints' separate matrices are stacked
    on load (see LlamaModel.load_weights)."""

    def __init__(self, c: LlamaConfig) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(c.hidden_size, c.rms_norm_eps)
        qkv_width = (c.num_heads + 2 * c.num_kv_heads) * c.head_dim
        self.qkv_proj = nn.Linear(c.hidden_size, qkv_width, bias=c.attention_bias)
        self.o_proj = nn.Linear(c.num_heads * c.head_dim, c.hidden_size, bias=False)
        self.post_attention_layernorm = RMSNorm(c.hidden_size, c.rms_norm_eps)
        self.gate_up_proj = nn.Linear(c.hidden_size, 2 * c.intermediate_size, bias=False)
        self.down_proj = nn.Linear(c.intermediate_size, c.hidden_size, bias=False)


# Checkpoint matrices stacked into one of ours, in this order along the output dimension.
STACKED = {"qkv_proj": ("q_proj", "k_proj", "v_proj"), "gate_up_proj": ("gate_proj", "up_proj")}


def rope_inv_freq(c: LlamaConfig) -> torch.Tensor:
    inv = 1.0 / (c.rope_theta ** (torch.arange(0, c.head_dim, 2, dtype=torch.float64) / c.head_dim))
    if c.rope_llama3 is not None:
        # Llama 3.1 long-context scaling: long wavelengths are slowed by `factor`, short ones kept,
        # the band between interpolated smoothly.
        factor, low, high, original = c.rope_llama3
        wavelen = 2 * math.pi / inv
        smooth = ((original / wavelen) - low) / (high - low)
        scaled = torch.where(wavelen > original / low, inv / factor, inv)
        mid = (wavelen <= original / low) & (wavelen >= original / high)
        scaled = torch.where(mid, (1 - smooth) * inv / factor + smooth * inv, scaled)
        inv = scaled
    return inv.float()


class LlamaModel(nn.Module):
    """Parameter names follow Hugging Face's LlamaForCausalLM (without the `model.` prefix)."""

    def __init__(self, config: LlamaConfig) -> None:
        super().__init__()
        self.config = config
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(LlamaLayer(config) for _ in range(config.num_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.lm_head = None if config.tie_embeddings else nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.tied_head: nn.Module | None = None  # the tied embeddings packed for the logits GEMM (CPU)
        self.register_buffer("inv_freq", rope_inv_freq(config), persistent=False)

    def _apply(self, fn, recurse: bool = True):
        """Moves and casts as nn.Module does, except the rotary frequencies, which stay float32:
        rounded to bfloat16 they would be off by up to 0.4%, a whole radian by position ~400."""
        super()._apply(fn, recurse)
        self.inv_freq = rope_inv_freq(self.config).to(self.inv_freq.device)
        return self

    @classmethod
    def random(cls, config: LlamaConfig, seed: int = 0) -> LlamaModel:
        """Deterministic random weights (benchmarks and tests of mechanics; speed does not depend on values)."""
        generator = torch.Generator().manual_seed(seed)
        model = cls(config)
        with torch.no_grad():
            for name, param in sorted(model.named_parameters()):
                if "norm" in name:
                    param.fill_(1.0)
                elif name.endswith("bias"):
                    param.zero_()
                else:
                    param.copy_(torch.randn(param.shape, generator=generator) * 0.5 / param.shape[-1] ** 0.5)
        return model

    def load_weights(self, weights: dict[str, torch.Tensor]) -> None:
        """Hugging Face names (`model.layers.0.self_attn.q_proj.weight`, `lm_head.weight`) or ours.

        Separate q/k/v and gate/up matrices (and q/k/v biases) are stacked into qkv_proj and
        gate_up_proj; a part missing from the checkpoint is reported as missing."""
        own: dict[str, torch.Tensor] = {}
        parts: dict[str, torch.Tensor] = {}
        for name, tensor in weights.items():
            key = name.removeprefix("model.").replace("self_attn.", "").replace("mlp.", "")
            if key == "lm_head.weight" and self.lm_head is None:
                continue  # tied: some checkpoints store the copy anyway
            (parts if any(f".{p}." in key for ps in STACKED.values() for p in ps) else own)[key] = tensor
        missing_parts = []
        for prefix in {k.rsplit(".", 2)[0] for k in parts}:  # "layers.N"
            for stacked, names in STACKED.items():
                for kind in ("weight", "bias"):
                    found = [parts.pop(f"{prefix}.{n}.{kind}", None) for n in names]
                    if all(t is None for t in found):
                        continue
                    missing_parts += [f"{prefix}.{n}.{kind}" for n, t in zip(names, found, strict=True) if t is None]
                    if all(t is not None for t in found):
                        own[f"{prefix}.{stacked}.{kind}"] = torch.cat(found, 0)
        missing, unexpected = self.load_state_dict(own, strict=False)
        missing = missing_parts + [m for m in missing if m != "inv_freq"]
        unexpected = unexpected + sorted(parts)
        if missing or unexpected:
            raise ValueError(
                f"checkpoint does not match the architecture: missing {missing[:5]}, unexpected {unexpected[:5]}"
            )

    def kv_shape(self) -> tuple[int, int, int]:
        c = self.config
        return c.num_layers, c.num_kv_heads, c.head_dim

    @torch.no_grad()
    def forward(self, chunks: list[SeqChunk], pool: KVPool) -> torch.Tensor:
        """Logits of the last new token of every chunk: [len(chunks), vocab] (float32)."""
        return self.run_plan(BatchPlan(chunks, self.embed_tokens.weight.device), pool)

    def run_plan(self, plan: BatchPlan | DecodePlan, pool: KVPool) -> torch.Tensor:
        """The forward pass over a plan's index tensors: no host work and no host sync, so a
        decode plan with fixed shapes can be captured in a CUDA graph (see decode_graphs.py).

        On CUDA it runs the fused kernels (fused_kernels.py), elsewhere plain torch operations;
        `self.fused` chooses (None: fused wherever the weights are on CUDA and Triton imports)."""
        if self.uses_fused():
            return self._run_fused(plan, pool)
        return self._run_torch(plan, pool)

    fused: bool | None = None  # None: decided by where the weights are (uses_fused)
    # the plain-torch path's element-wise ops compiled in groups (compiled_ops.CompiledOps); None: eager
    compiled_ops: CompiledOps | None = None
    compiled_ops_min_tokens = COMPILED_OPS_MIN_TOKENS  # smaller steps run them eagerly
    # the plain-torch path's decode attention reading the pool in place (paged_attention_cpu.py);
    # None: index_select + SDPA
    decode_attention: pool_attention.DecodeKernel | None = None
    # the plain-torch path's element-wise ops of float32 decode steps fused in C++ (decode_ops_cpu.py);
    # None: eager
    decode_ops: DecodeOps | None = None
    # the same kernels for float32 prefill and mixed steps (any step with a prompt chunk); None: eager
    prefill_ops: DecodeOps | None = None

    def uses_fused(self) -> bool:
        if self.fused is not None:
            return self.fused
        return self.embed_tokens.weight.is_cuda and _triton_available()

    def _rotary_tables(self, plan: BatchPlan | DecodePlan) -> tuple[torch.Tensor, torch.Tensor]:
        """cos and sin of every token's rotary angles, [T, head_dim / 2] float32."""
        angles = plan.positions.float().unsqueeze(-1) * self.inv_freq
        return angles.cos(), angles.sin()

    def _attention_torch(
        self,
        plan: BatchPlan | DecodePlan,
        pool: KVPool,
        index: int,
        q: torch.Tensor,
        mask: torch.Tensor | None,
        new_kv: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> torch.Tensor:
        """Attention over the pool through SDPA: q [T, H, hd] of this layer, its K/V already
        written to the pool (`new_kv`: the new tokens' K and V [T, Hkv, hd], if at hand); returns
        [T, H * hd]."""
        c = self.config
        group = c.num_heads // c.num_kv_heads
        if plan.whole_prompt:
            # one prompt from its first token: plain causal attention over its own K/V (no pool
            # gather, no mask), which lets SDPA pick its flash kernel
            if new_kv is None:
                new_kv = pool.k[index, plan.write_slots], pool.v[index, plan.write_slots]
            keys, values = new_kv[0].to(q.dtype), new_kv[1].to(q.dtype)
            attended = F.scaled_dot_product_attention(
                q.transpose(0, 1).unsqueeze(0),
                keys.transpose(0, 1).unsqueeze(0),
                values.transpose(0, 1).unsqueeze(0),
                is_causal=True,
                enable_gqa=group > 1,
            )  # [1, H, T, hd]
            return attended[0].transpose(0, 1).reshape(-1, c.num_heads * c.head_dim)
        keys = pool.k[index, plan.kv_index].to(q.dtype).transpose(1, 2)  # [B, Hkv, maxk, hd]
        values = pool.v[index, plan.kv_index].to(q.dtype).transpose(1, 2)
        queries = q[plan.q_index]  # [B, maxn, H, hd]
        batch, max_new = queries.shape[:2]
        # [B, maxn, Hkv, group, hd] -> [B, Hkv, group * maxn, hd]
        queries = queries.view(batch, max_new, c.num_kv_heads, group, c.head_dim).permute(0, 2, 3, 1, 4)
        queries = queries.reshape(batch, c.num_kv_heads, group * max_new, c.head_dim)
        attended = F.scaled_dot_product_attention(queries, keys, values, attn_mask=mask)
        attended = attended.reshape(batch, c.num_heads, max_new, c.head_dim)  # back to [B, H, maxn, hd]
        return plan.valid_rows(attended)

    def _run_torch(self, plan: BatchPlan | DecodePlan, pool: KVPool) -> torch.Tensor:
        c = self.config
        x = self.embed_tokens(plan.tokens)
        element_ops = self.decode_ops if plan.decode_only else self.prefill_ops
        if element_ops is not None and x.dtype == pool.k.dtype == torch.float32:
            return self._run_cpu_fused(plan, pool, x, element_ops)
        cos, sin = self._rotary_tables(plan)
        # rotate_half(x) * sin == roll(x, half) * (-sin, sin): one roll instead of a neg and a cat
        cos = torch.cat((cos, cos), -1).to(x.dtype).unsqueeze(1)  # [T, 1, hd]
        sin = torch.cat((-sin, sin), -1).to(x.dtype).unsqueeze(1)
        layout = plan.attention_layout()
        heads, kv_heads, half = c.num_heads, c.num_kv_heads, c.head_dim // 2
        qk_width = (heads + kv_heads) * c.head_dim
        ops = self.compiled_ops
        if ops is not None and plan.tokens.shape[0] < self.compiled_ops_min_tokens:
            ops = None  # a compiled call's guards cost more than it saves on a few rows (decode steps)
        h = self.layers[0].input_layernorm(x) if ops is not None else None
        for index, layer in enumerate(self.layers):
            qkv = layer.qkv_proj(h if ops is not None else layer.input_layernorm(x))
            # Q and K rotated together: [T, H + Hkv, hd]
            qk = qkv[:, :qk_width].view(-1, heads + kv_heads, c.head_dim)
            qk = ops.rotary(qk, cos, sin) if ops is not None else torch.addcmul(qk * cos, qk.roll(half, -1), sin)
            q, k = qk[:, :heads], qk[:, heads:]
            v = qkv[:, qk_width:].view(-1, kv_heads, c.head_dim)
            k_pool, v_pool = pool.k[index], pool.v[index]
            k_pool[plan.write_slots] = k.to(k_pool.dtype)
            v_pool[plan.write_slots] = v.to(v_pool.dtype)
            attended = pool_attention.attend(layout, q, k, v, k_pool, v_pool, self.decode_attention)
            if ops is None:
                x = x + layer.o_proj(attended)
                gate, up = layer.gate_up_proj(layer.post_attention_layernorm(x)).chunk(2, -1)
                x = x + layer.down_proj(F.silu(gate).mul_(up))
                continue
            # the residual add fused into the next RMSNorm, as the CUDA path does
            x, h = ops.add_rms_norm(x, layer.o_proj(attended), layer.post_attention_layernorm.weight, c.rms_norm_eps)
            following = self.layers[index + 1].input_layernorm if index + 1 < len(self.layers) else self.norm
            x, h = ops.add_rms_norm(
                x, layer.down_proj(ops.silu_mul(layer.gate_up_proj(h))), following.weight, c.rms_norm_eps
            )
        if ops is not None:
            return self._logits(h[plan.last_index])
        return self._logits(self.norm(x[plan.last_index]))

    def _run_cpu_fused(
        self, plan: BatchPlan | DecodePlan, pool: KVPool, x: torch.Tensor, ops: DecodeOps
    ) -> torch.Tensor:
        """A float32 step on a CPU (decode, prefill or mixed) with the element-wise ops in pdlb's C++
        kernels (decode_ops_cpu.py): per layer three calls between the GEMMs and attention instead of
        ~20 torch ops. `x` [T, D] is the step's embeddings, added to in place as the residual stream."""
        c = self.config
        cos, sin = self._rotary_tables(plan)  # [T, hd / 2] each
        layout = plan.attention_layout()
        h = ops.add_rms_norm(x, None, self.layers[0].input_layernorm.weight, c.rms_norm_eps)
        q_width, kv_width = c.num_heads * c.head_dim, c.num_kv_heads * c.head_dim
        for index, layer in enumerate(self.layers):
            qkv = layer.qkv_proj(h)
            k_pool, v_pool = pool.k[index], pool.v[index]
            ops.rotary_kv_write(qkv, cos, sin, plan.write_slots, k_pool, v_pool, c.num_heads, c.num_kv_heads)
            # views of the rotated rows: prompt chunks attend to their own K/V through them, decode
            # rows read the pool
            q = qkv[:, :q_width].view(-1, c.num_heads, c.head_dim)
            k = qkv[:, q_width : q_width + kv_width].view(-1, c.num_kv_heads, c.head_dim)
            v = qkv[:, q_width + kv_width :].view(-1, c.num_kv_heads, c.head_dim)
            attended = pool_attention.attend(layout, q, k, v, k_pool, v_pool, self.decode_attention)
            h = ops.add_rms_norm(x, layer.o_proj(attended), layer.post_attention_layernorm.weight, c.rms_norm_eps)
            following = self.layers[index + 1].input_layernorm if index + 1 < len(self.layers) else self.norm
            h = ops.add_rms_norm(
                x, layer.down_proj(ops.silu_mul(layer.gate_up_proj(h))), following.weight, c.rms_norm_eps
            )
        return self._logits(h[plan.last_index])

    def _run_fused(self, plan: BatchPlan | DecodePlan, pool: KVPool) -> torch.Tensor:
        """The same computation in fewer kernels: the residual add fused into the next RMSNorm,
        rotary and the K/V write in one kernel, decode attention reading the pool in place."""
        from pdlb.engines.torch import fused_kernels as kernels

        c = self.config
        x = self.embed_tokens(plan.tokens)
        cos, sin = self._rotary_tables(plan)
        decode = plan.decode_only
        mask = None
        if not decode and not plan.whole_prompt:
            group = c.num_heads // c.num_kv_heads
            mask = plan.mask if group == 1 else plan.mask.repeat(1, 1, group, 1)
        h = kernels.add_rms_norm(x, None, self.layers[0].input_layernorm.weight, c.rms_norm_eps)
        for index, layer in enumerate(self.layers):
            k_pool, v_pool = pool.k[index], pool.v[index]
            q = kernels.rotary_kv_write(
                layer.qkv_proj(h), cos, sin, plan.write_slots, k_pool, v_pool, c.num_heads, c.num_kv_heads
            )
            if decode:
                attended = kernels.paged_decode_attention(q, k_pool, v_pool, plan.kv_index, plan.kv_lens)
                attended = attended.view(-1, c.num_heads * c.head_dim)
            else:
                attended = self._attention_torch(plan, pool, index, q, mask)
            h = kernels.add_rms_norm(x, layer.o_proj(attended), layer.post_attention_layernorm.weight, c.rms_norm_eps)
            mlp = layer.down_proj(kernels.silu_mul(layer.gate_up_proj(h)))
            following = self.layers[index + 1].input_layernorm if index + 1 < len(self.layers) else self.norm
            h = kernels.add_rms_norm(x, mlp, following.weight, c.rms_norm_eps)
        return self._logits(h[plan.last_index])

    def pack_tied_head(self) -> None:
        """With tied embeddings, keep a oneDNN-packed copy of them for the logits GEMM (packed_linear.py):
        on 2 AVX2 cores SmolLM2's head at 16 rows takes ~17 ms packed against ~100 ms through F.linear.
        Costs a second copy of the embeddings (113 MB for SmolLM2 in float32)."""
        from pdlb.engines.torch.packed_linear import PackedLinear

        if self.lm_head is not None:
            return
        weight = self.embed_tokens.weight
        head = PackedLinear(weight)
        if head.matches(weight):
            self.tied_head = head

    def _logits(self, last: torch.Tensor) -> torch.Tensor:
        if self.lm_head is None:
            if self.tied_head is not None:
                return self.tied_head(last).float()
            return F.linear(last, self.embed_tokens.weight).float()
        return self.lm_head(last).float()  # an nn.Linear, or its packed form on a CPU


@functools.cache
def _triton_available() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True
