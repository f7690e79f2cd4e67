"""A small decoder-only transformer whose KV cache lives in a shared token-slot pool.

One forward pass serves a mixed batch: each sequence brings new tokens (a prefill chunk, or one
decode token) and attends over its cached slots plus the new ones. K/V of the new tokens are
written into the pool at the slots the scheduler allocated, so a request's KV is real memory that
the KV-token budget accounts for.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from pdlb.common.tokenizer import MIN_VOCAB_SIZE
from pdlb.engines.torch.pool_attention import AttentionLayout


@dataclass(frozen=True)
class ModelConfig:
    vocab_size: int = 320
    hidden_size: int = 64
    num_layers: int = 2
    num_heads: int = 4
    max_position: int = 4096
    seed: int = 0

    def __post_init__(self) -> None:
        if self.vocab_size < MIN_VOCAB_SIZE:
            raise ValueError(f"vocab_size must be >= {MIN_VOCAB_SIZE} (bytes and EOS)")
        if self.hidden_size % self.num_heads:
            raise ValueError("hidden_size must be a multiple of num_heads")

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads


class KVPool:
    """K and V for `num_slots` tokens per layer; slot 0 is padding and never handed out."""

    def __init__(
        self, kv_shape: tuple[int, int, int], num_slots: int, device: torch.device, dtype: torch.dtype
    ) -> None:
        """`kv_shape`: (layers, KV heads, head dim); grouped-query models keep only their KV heads."""
        num_layers, num_kv_heads, head_dim = kv_shape
        shape = (num_layers, num_slots + 1, num_kv_heads, head_dim)
        self.k = torch.zeros(shape, device=device, dtype=dtype)
        self.v = torch.zeros(shape, device=device, dtype=dtype)
        self.capacity = num_slots
        self._free = list(range(num_slots, 0, -1))  # a stack: pop() hands out low slots first

    @property
    def free(self) -> int:
        return len(self._free)

    @property
    def used(self) -> int:
        return self.capacity - len(self._free)

    def allocate(self, n: int) -> list[int]:
        if n > len(self._free):
            raise MemoryError(f"KV pool has {len(self._free)} free slots, {n} asked")
        taken = self._free[-n:] if n else []
        del self._free[len(self._free) - n :]
        return taken[::-1]

    def release(self, slots: list[int]) -> None:
        self._free.extend(slots)


@dataclass
class SeqChunk:
    """One sequence's part of a forward pass."""

    new_tokens: list[int]
    start_pos: int  # position of new_tokens[0] in the sequence
    slots: list[int]  # KV slots of positions 0 .. start_pos + len(new_tokens) - 1


class TinyTransformer(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        d = config.hidden_size
        self.embed = nn.Embedding(config.vocab_size, d)
        self.pos = nn.Embedding(config.max_position, d)
        self.layers = nn.ModuleList(_Block(d) for _ in range(config.num_layers))
        self.norm = nn.LayerNorm(d)
        self.lm_head = nn.Linear(d, config.vocab_size, bias=False)

    @classmethod
    def random(cls, config: ModelConfig) -> TinyTransformer:
        """Deterministic random weights from config.seed (the same on every machine and run)."""
        generator = torch.Generator().manual_seed(config.seed)
        model = cls(config)
        with torch.no_grad():
            for name, param in sorted(model.named_parameters()):
                if name.endswith("bias"):
                    param.zero_()
                elif "norm" in name:
                    param.fill_(1.0)
                else:
                    param.copy_(torch.randn(param.shape, generator=generator) * 0.5 / param.shape[-1] ** 0.5)
        return model

    def kv_shape(self) -> tuple[int, int, int]:
        return self.config.num_layers, self.config.num_heads, self.config.head_dim

    @torch.no_grad()
    def forward(self, chunks: list[SeqChunk], pool: KVPool) -> torch.Tensor:
        """Logits of the last new token of every chunk: [len(chunks), vocab]."""
        device = self.embed.weight.device
        plan = BatchPlan(chunks, device)
        x = self.embed(plan.tokens) + self.pos(plan.positions)
        heads, head_dim = self.config.num_heads, self.config.head_dim
        for index, layer in enumerate(self.layers):
            q, k, v = layer.qkv(layer.norm1(x)).view(-1, 3, heads, head_dim).unbind(1)
            pool.k[index, plan.write_slots] = k.to(pool.k.dtype)
            pool.v[index, plan.write_slots] = v.to(pool.v.dtype)
            keys = pool.k[index, plan.kv_index].to(q.dtype).transpose(1, 2)  # [B, H, maxk, hd]
            values = pool.v[index, plan.kv_index].to(q.dtype).transpose(1, 2)
            queries = q[plan.q_index].transpose(1, 2)  # [B, H, maxn, hd]
            attended = F.scaled_dot_product_attention(queries, keys, values, attn_mask=plan.mask)
            flat = plan.valid_rows(attended)
            x = x + layer.out(flat)
            x = x + layer.mlp(layer.norm2(x))
        return self.lm_head(self.norm(x[plan.last_index])).float()


class _Block(nn.Module):
    def __init__(self, d: int) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(d)
        self.qkv = nn.Linear(d, 3 * d)
        self.out = nn.Linear(d, d)
        self.norm2 = nn.LayerNorm(d)
        self.mlp = nn.Sequential(nn.Linear(d, 4 * d), nn.GELU(), nn.Linear(4 * d, d))


class BatchPlan:
    """Index tensors that turn a list of chunks into one padded attention call."""

    def __init__(self, chunks: list[SeqChunk], device: torch.device) -> None:
        tokens, positions, write_slots, last, spans = [], [], [], [], []
        new_lens = [len(c.new_tokens) for c in chunks]
        kv_lens = [c.start_pos + n for c, n in zip(chunks, new_lens, strict=True)]
        max_new, max_kv = max(new_lens), max(kv_lens)
        q_index = torch.zeros(len(chunks), max_new, dtype=torch.long)
        kv_index = torch.zeros(len(chunks), max_kv, dtype=torch.long)
        offset = 0
        for b, chunk in enumerate(chunks):
            n = new_lens[b]
            tokens.extend(chunk.new_tokens)
            positions.extend(range(chunk.start_pos, chunk.start_pos + n))
            write_slots.extend(chunk.slots[chunk.start_pos : chunk.start_pos + n])
            q_index[b, :n] = torch.arange(offset, offset + n)
            kv_index[b, : kv_lens[b]] = torch.tensor(chunk.slots[: kv_lens[b]], dtype=torch.long)
            spans.append((offset, n, chunk.start_pos))
            offset += n
            last.append(offset - 1)
        q_valid = torch.arange(max_new).view(1, -1) < torch.tensor(new_lens).view(-1, 1)
        self.tokens = torch.tensor(tokens, dtype=torch.long, device=device)
        self.positions = torch.tensor(positions, dtype=torch.long, device=device)
        self.write_slots = torch.tensor(write_slots, dtype=torch.long, device=device)
        self.q_index = q_index.to(device)
        self.kv_index = kv_index.to(device)
        self.q_valid = q_valid.to(device)
        # rows of the real (unpadded) queries, found here on the host: a boolean mask applied on
        # the device would make every layer wait for the GPU to count it
        self.q_rows = torch.nonzero(q_valid.flatten()).flatten().to(device)
        self._mask_args = ([c.start_pos for c in chunks], kv_lens, q_valid, max_kv, device)
        self.last_index = torch.tensor(last, dtype=torch.long, device=device)
        self.kv_lens = torch.tensor(kv_lens, dtype=torch.long, device=device)
        # a single prompt chunk from position 0 attends to nothing but itself
        self.whole_prompt = len(chunks) == 1 and chunks[0].start_pos == 0 and new_lens[0] > 1
        # one new token per sequence: attention can read the pool through kv_index and kv_lens alone
        self.decode_only = max_new == 1
        self._layout_args = (spans, kv_index, kv_lens, len(tokens), device)

    def attention_layout(self) -> AttentionLayout:
        """How each row attends in the plain-torch path (pool_attention.py), built on the host."""
        return AttentionLayout(*self._layout_args)

    @functools.cached_property
    def mask(self) -> torch.Tensor:
        """[B, 1, maxn, maxk] which padded keys each padded query row attends to (the padded
        attention call's mask; built on first use: the plain-torch path does without it)."""
        starts, kv_lens, q_valid, max_kv, device = self._mask_args
        query_pos = torch.tensor(starts).view(-1, 1, 1) + torch.arange(q_valid.shape[1]).view(1, -1, 1)
        key_pos = torch.arange(max_kv).view(1, 1, -1)
        mask = (key_pos <= query_pos) & (key_pos < torch.tensor(kv_lens).view(-1, 1, 1))
        mask |= ~q_valid.unsqueeze(-1) & (key_pos == 0)  # padded query rows see slot 0 only (no NaN)
        return mask.unsqueeze(1).to(device)

    def valid_rows(self, attended: torch.Tensor) -> torch.Tensor:
        """[B, H, maxn, hd] attention output -> [tokens, H * hd] rows of the real queries."""
        batch, heads, max_new, head_dim = attended.shape
        rows = attended.transpose(1, 2).reshape(batch * max_new, heads * head_dim)
        return rows if max_new == 1 else rows.index_select(0, self.q_rows)


class DecodePlan:
    """The index tensors of a decode-only step at a fixed shape: `batch` rows (one token each)
    attending over up to `context` slots. The tensors are views of one device buffer that `fill`
    refreshes in place with a single host-to-device copy, which is what lets a CUDA graph captured
    over them be replayed. Rows past the real batch are padding: token 0 at position 0, writing and
    reading slot 0 (never handed out) only."""

    def __init__(self, batch: int, context: int, device: torch.device) -> None:
        self.batch, self.context = batch, context
        # columns: token, position, write slot, KV length, then `context` KV slots
        self._host = np.zeros((batch, 4 + context), dtype=np.int64)
        self._host[:, 3] = 1
        self._device = torch.from_numpy(self._host).to(device)
        self.tokens, self.positions, self.write_slots, self.kv_lens = self._device[:, :4].unbind(1)
        self.kv_index = self._device[:, 4:]
        self.q_index = torch.arange(batch, device=device).view(batch, 1)
        self.last_index = torch.arange(batch, device=device)
        self._key_pos = torch.arange(context, device=device).view(1, 1, 1, context)
        self.whole_prompt = False
        self.decode_only = True
        self.refresh_mask()

    def refresh_mask(self) -> torch.Tensor:
        """Recomputed on the device from kv_lens (inside a captured graph: on every replay)."""
        self.mask = self._key_pos < self.kv_lens.view(-1, 1, 1, 1)  # [B, 1, 1, context]
        return self.mask

    def fill(self, chunks: list[SeqChunk]) -> None:
        """Write the chunks' tokens, positions and slots in; rows past len(chunks) become padding."""
        host = self._host
        host.fill(0)
        host[:, 3] = 1
        for b, chunk in enumerate(chunks):
            end = chunk.start_pos + 1
            host[b, :4] = (chunk.new_tokens[0], chunk.start_pos, chunk.slots[chunk.start_pos], end)
            host[b, 4 : 4 + end] = chunk.slots[:end]
        self._device.copy_(torch.from_numpy(host))

    def attention_layout(self) -> AttentionLayout:
        """Every row a decode token over the slot table, masked by kv_lens (device tensors only)."""
        return AttentionLayout.fixed_decode(self.kv_index, self.mask, self.kv_lens)

    def valid_rows(self, attended: torch.Tensor) -> torch.Tensor:
        """[B, H, 1, hd] attention output -> [B, H * hd]."""
        batch, heads, _, head_dim = attended.shape
        return attended.reshape(batch, heads * head_dim)
