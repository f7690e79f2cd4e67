"""Decode steps replayed from CUDA graphs.

At small models a decode step is bound by the host: ~1,400 kernel launches from Python for
SmolLM2's 30 layers, while the GPU computes for a few milliseconds. A CUDA graph records the
launches of one step once and replays them with one call. A graph has fixed shapes, so decode-only
steps are padded to a bucket of batch size and of attended context (a `DecodePlan` per bucket,
refilled in place each step); steps with prefill chunks, or larger than the biggest bucket, run
eagerly. Graphs are captured the first time their bucket is used and share one memory pool (steps
run one at a time, and each step's logits are consumed before the next replay).
"""

from __future__ import annotations

import torch

from pdlb.engines.torch.model import DecodePlan, KVPool, SeqChunk

BATCH_BUCKETS = (1, 2, 4, 8, 12, 16, 24, 32, 48, 64, 96, 128, 160, 192, 224, 256)
MIN_CONTEXT_BUCKET = 128
# Padded batch x context of the largest graph: the per-layer K/V gather it captures grows with it.
MAX_GRAPH_SLOTS = 1 << 20


def batch_bucket(n: int, max_batch: int) -> int | None:
    return next((b for b in BATCH_BUCKETS if n <= b <= max_batch), None)


def context_bucket(n: int) -> int:
    """The next power of two (at least MIN_CONTEXT_BUCKET): at most 2x padding, few graphs."""
    bucket = MIN_CONTEXT_BUCKET
    while bucket < n:
        bucket *= 2
    return bucket


class DecodeGraphs:
    """Captures and replays decode steps of a model with `run_plan` (LlamaModel) over one KV pool.

    `capture=False` runs the very same fixed-shape plans eagerly: what the graphs replay, checkable
    on a CPU against the eager variable-shape path."""

    def __init__(self, model, pool: KVPool, max_batch: int, max_context: int, capture: bool = True) -> None:
        self.model, self.pool = model, pool
        self.max_batch, self.max_context = max_batch, max_context
        self.capture = capture
        self.device = model.embed_tokens.weight.device
        self._graphs: dict[tuple[int, int], tuple[DecodePlan, torch.cuda.CUDAGraph | None, torch.Tensor | None]] = {}
        self._mempool = torch.cuda.graph_pool_handle() if capture else None
        self.replays = 0
        self.captures = 0

    def warmup(self, context: int = MIN_CONTEXT_BUCKET) -> int:
        """Capture every batch bucket at `context` now (at start, before traffic), so the first
        steps of each batch size replay instead of capturing; returns how many were captured."""
        before = self.captures
        for batch in BATCH_BUCKETS:
            key = (batch, context_bucket(context))
            if self._fits(*key) and key not in self._graphs:
                self._build(key)
        return self.captures - before

    def _fits(self, batch: int, context: int) -> bool:
        """Whether a graph of this bucket may be captured (the flags' bounds and the memory bound)."""
        return batch <= self.max_batch and context <= self.max_context and batch * context <= MAX_GRAPH_SLOTS

    @property
    def plans_built(self) -> int:
        return len(self._graphs)

    def bucket(self, chunks: list[SeqChunk]) -> tuple[int, int] | None:
        """The (batch, context) graph for these chunks, or None when the step must run eagerly."""
        if not chunks or any(len(c.new_tokens) != 1 for c in chunks):
            return None
        batch = batch_bucket(len(chunks), self.max_batch)
        context = context_bucket(max(c.start_pos + 1 for c in chunks))
        return (batch, context) if batch is not None and self._fits(batch, context) else None

    @torch.no_grad()
    def run(self, chunks: list[SeqChunk], key: tuple[int, int]) -> torch.Tensor:
        """Logits [len(chunks), vocab] of a decode step (a view of the graph's output buffer)."""
        plan, graph, logits = self._graphs.get(key) or self._build(key)
        plan.fill(chunks)
        if graph is None:
            logits = self._body(plan)
        else:
            graph.replay()
            self.replays += 1
        return logits[: len(chunks)]

    def _body(self, plan: DecodePlan) -> torch.Tensor:
        plan.refresh_mask()
        return self.model.run_plan(plan, self.pool)

    def _build(self, key: tuple[int, int]):
        plan = DecodePlan(*key, self.device)
        if not self.capture:
            self._graphs[key] = (plan, None, None)
            return self._graphs[key]
        # Warm up on a side stream first (cuBLAS handles, workspaces), as capture requires; the
        # padding plan only writes slot 0, so the pool's real contents are untouched.
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(2):
                self._body(plan)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        # thread_local: the scheduler's event loop thread may touch CUDA (KV hand-off) meanwhile
        with torch.cuda.graph(graph, pool=self._mempool, capture_error_mode="thread_local"):
            logits = self._body(plan)
        self.captures += 1
        self._graphs[key] = (plan, graph, logits)
        return self._graphs[key]
