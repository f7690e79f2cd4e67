"""Next-token sampling with vLLM's parameters: logit bias, repetition / presence / frequency
penalties, min_tokens, temperature, top-k, top-p, min-p, and log-probabilities.

The order follows vLLM's sampler: biases and penalties change the logits, stop tokens are masked
while min_tokens is not reached, then temperature (0: argmax), then the top-k, top-p and min-p
filters, then a draw with the request's per-position generator (so a resumed request draws what
the original would have). Log-probabilities are the model's own (log-softmax of the raw logits),
as vLLM returns by default. One row at a time, on the CPU: a step samples at most a batch of rows,
and only requests that use these parameters take this path (plain greedy rows are one argmax).
"""

from __future__ import annotations

from collections import Counter

import torch

from pdlb.engines.request import Sampled, SamplingConfig

MAX_LOGPROBS = 20


def sample_row(
    logits: torch.Tensor,
    config: SamplingConfig,
    generator: torch.Generator | None,
    prompt: list[int],
    output: list[int],
    banned: frozenset[int] = frozenset(),
) -> Sampled:
    """Sample one token from `logits` ([vocab], any device). `prompt` and `output` feed the
    penalties; `banned` tokens (stop tokens before min_tokens) are never drawn."""
    row = logits.detach().to("cpu", torch.float32)
    vocab = row.shape[0]
    raw = torch.log_softmax(row, dim=-1) if config.logprobs is not None else None
    if config.shapes_logits or banned:
        row = row.clone()
    for token, bias in config.logit_bias:
        if 0 <= token < vocab:
            row[token] += bias
    if config.repetition_penalty != 1.0:
        seen = torch.tensor(sorted({t for t in (*prompt, *output) if 0 <= t < vocab}), dtype=torch.long)
        if len(seen):
            values = row[seen]
            row[seen] = torch.where(values > 0, values / config.repetition_penalty, values * config.repetition_penalty)
    if config.presence_penalty or config.frequency_penalty:
        counts = Counter(t for t in output if 0 <= t < vocab)
        if counts:
            ids = torch.tensor(list(counts), dtype=torch.long)
            freq = torch.tensor(list(counts.values()), dtype=torch.float32)
            row[ids] -= config.frequency_penalty * freq + config.presence_penalty
    if banned:
        ids = [t for t in banned if 0 <= t < vocab]
        if len(ids) < vocab:
            row[ids] = float("-inf")
    if config.temperature <= 0:
        token = int(row.argmax())
    else:
        row = _filtered(row / config.temperature, config)
        token = int(torch.multinomial(torch.softmax(row, dim=-1), 1, generator=generator))
    if raw is None:
        return Sampled(token)
    count = min(config.logprobs or 0, MAX_LOGPROBS, vocab)
    top = torch.topk(raw, count) if count else None
    pairs = list(zip(top.indices.tolist(), top.values.tolist(), strict=True)) if top is not None else []
    return Sampled(token, float(raw[token]), pairs)


def _filtered(row: torch.Tensor, config: SamplingConfig) -> torch.Tensor:
    """top-k, then top-p, then min-p: tokens outside get -inf (the most likely always stays)."""
    vocab = row.shape[0]
    if 0 < config.top_k < vocab:
        kth = torch.topk(row, config.top_k).values[-1]
        row = row.masked_fill(row < kth, float("-inf"))
    if config.top_p < 1.0:
        ordered, order = torch.sort(row, descending=True)
        probs = torch.softmax(ordered, dim=-1)
        before = torch.cumsum(probs, dim=-1) - probs  # mass of the more likely tokens
        drop = before > config.top_p
        drop[0] = False
        row = row.clone()
        row[order[drop]] = float("-inf")
    if config.min_p > 0.0:
        probs = torch.softmax(row, dim=-1)
        row = row.masked_fill(probs < config.min_p * probs.max(), float("-inf"))
    return row
