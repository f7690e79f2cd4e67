"""A Llama-family decoder over the shared token-slot KV pool (the scheduler's real model).

RMSNorm, rotary embeddings (rotate-half layout, as Hugging Face checkpoints store Q/K), grouped-query
attention whose pool holds only the KV heads, a SwiGLU MLP and optionally tied embeddings. One
forward pass serves a mixed batch of prefill chunks and decode tokens (see model.py's batch plan).
"""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn import functional as F

from pdlb.engines.torch.model import BatchPlan, DecodePlan, KVPool, SeqChunk
from pdlb.models.config import LlamaConfig


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # computed in float32 like the reference implementations, then cast back
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * h.to(x.dtype)


class LlamaLayer(nn.Module):
    def __init__(self, c: LlamaConfig) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(c.hidden_size, c.rms_norm_eps)
        self.q_proj = nn.Linear(c.hidden_size, c.num_heads * c.head_dim, bias=c.attention_bias)
        self.k_proj = nn.Linear(c.hidden_size, c.num_kv_heads * c.head_dim, bias=c.attention_bias)
        self.v_proj = nn.Linear(c.hidden_size, c.num_kv_heads * c.head_dim, bias=c.attention_bias)
        self.o_proj = nn.Linear(c.num_heads * c.head_dim, c.hidden_size, bias=False)
        self.post_attention_layernorm = RMSNorm(c.hidden_size, c.rms_norm_eps)
        self.gate_proj = nn.Linear(c.hidden_size, c.intermediate_size, bias=False)
        self.up_proj = nn.Linear(c.hidden_size, c.intermediate_size, bias=False)
        self.down_proj = nn.Linear(c.intermediate_size, c.hidden_size, bias=False)


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
        self.register_buffer("inv_freq", rope_inv_freq(config), persistent=False)

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
        """Hugging Face names (`model.layers.0.self_attn.q_proj.weight`, `lm_head.weight`) or ours."""
        own = {}
        for name, tensor in weights.items():
            key = name.removeprefix("model.").replace("self_attn.", "").replace("mlp.", "")
            if key == "lm_head.weight" and self.lm_head is None:
                continue  # tied: some checkpoints store the copy anyway
            own[key] = tensor
        missing, unexpected = self.load_state_dict(own, strict=False)
        missing = [m for m in missing if m != "inv_freq"]
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
        decode plan with fixed shapes can be captured in a CUDA graph (see decode_graphs.py)."""
        c = self.config
        x = self.embed_tokens(plan.tokens)
        angles = plan.positions.float().unsqueeze(-1) * self.inv_freq  # [T, hd/2]
        cos = torch.cat((angles.cos(), angles.cos()), -1).to(x.dtype).unsqueeze(1)  # [T, 1, hd]
        sin = torch.cat((angles.sin(), angles.sin()), -1).to(x.dtype).unsqueeze(1)
        group = c.num_heads // c.num_kv_heads
        # Grouped-query attention without copying K/V per query head: the `group` query heads of a
        # KV head become extra query rows of that head (their mask rows repeat), which also keeps
        # the fused attention kernels eligible where enable_gqa would fall back to plain math.
        if plan.whole_prompt:
            mask = None  # causal attention over the prompt's own K/V needs none
        else:
            mask = plan.mask if group == 1 else plan.mask.repeat(1, 1, group, 1)
        for index, layer in enumerate(self.layers):
            h = layer.input_layernorm(x)
            q = layer.q_proj(h).view(-1, c.num_heads, c.head_dim)
            k = layer.k_proj(h).view(-1, c.num_kv_heads, c.head_dim)
            v = layer.v_proj(h).view(-1, c.num_kv_heads, c.head_dim)
            q, k = q * cos + _rotate_half(q) * sin, k * cos + _rotate_half(k) * sin
            pool.k[index, plan.write_slots] = k.to(pool.k.dtype)
            pool.v[index, plan.write_slots] = v.to(pool.v.dtype)
            if plan.whole_prompt:
                # one prompt from its first token: plain causal attention over its own K/V (no pool
                # gather, no mask), which lets SDPA pick its flash kernel
                attended = F.scaled_dot_product_attention(
                    q.transpose(0, 1).unsqueeze(0),
                    k.transpose(0, 1).unsqueeze(0),
                    v.transpose(0, 1).unsqueeze(0),
                    is_causal=True,
                    enable_gqa=group > 1,
                )  # [1, H, T, hd]
                x = x + layer.o_proj(attended[0].transpose(0, 1).reshape(-1, c.num_heads * c.head_dim))
            else:
                keys = pool.k[index, plan.kv_index].to(q.dtype).transpose(1, 2)  # [B, Hkv, maxk, hd]
                values = pool.v[index, plan.kv_index].to(q.dtype).transpose(1, 2)
                queries = q[plan.q_index]  # [B, maxn, H, hd]
                batch, max_new = queries.shape[:2]
                # [B, maxn, Hkv, group, hd] -> [B, Hkv, group * maxn, hd]
                queries = queries.view(batch, max_new, c.num_kv_heads, group, c.head_dim).permute(0, 2, 3, 1, 4)
                queries = queries.reshape(batch, c.num_kv_heads, group * max_new, c.head_dim)
                attended = F.scaled_dot_product_attention(queries, keys, values, attn_mask=mask)
                attended = attended.reshape(batch, c.num_heads, max_new, c.head_dim)  # back to [B, H, maxn, hd]
                x = x + layer.o_proj(plan.valid_rows(attended))
            h = layer.post_attention_layernorm(x)
            x = x + layer.down_proj(F.silu(layer.gate_proj(h)) * layer.up_proj(h))
        last = self.norm(x[plan.last_index])
        head = self.embed_tokens.weight if self.lm_head is None else self.lm_head.weight
        return F.linear(last, head).float()


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)
