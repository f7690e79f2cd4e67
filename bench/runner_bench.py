"""Torch runner throughput through the real batching engine: decode and prefill tokens/s per model size.

Run here (CPU) or on a GPU machine: `python -m bench.runner_bench --device cuda --dtype bfloat16`.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import time

import torch

from pdlb.engines.request import EngineLimits, Sequence
from pdlb.engines.torch.batching import Engine
from pdlb.engines.torch.model import ModelConfig, TinyTransformer
from pdlb.engines.torch.runners import TorchRunner

SIZES = {
    "tiny": dict(hidden_size=64, num_layers=2, num_heads=4),
    "small": dict(hidden_size=256, num_layers=4, num_heads=8),
    "medium": dict(hidden_size=1024, num_layers=8, num_heads=16),
    "large": dict(hidden_size=2048, num_layers=16, num_heads=16),
}
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def params(model: torch.nn.Module) -> float:
    return sum(p.numel() for p in model.parameters()) / 1e6


async def decode_rate(engine: Engine, batch: int, prompt: int, new: int) -> float:
    """Output tokens/s of `batch` concurrent requests, from the first token of all to the last."""
    seqs = [
        Sequence(
            request_id=f"d{batch}-{i}-{time.monotonic_ns()}",
            prompt=[(i * 7 + j) % 256 for j in range(prompt)],
            max_new_tokens=new,
            ignore_eos=True,
        )
        for i in range(batch)
    ]
    for s in seqs:
        engine.submit(s)
    firsts = [await s.outbox.get() for s in seqs]
    start = time.perf_counter()
    produced = 0
    for s in seqs:
        while True:
            out = await s.outbox.get()
            produced += len(out.token_ids)
            if out.finish_reason:
                break
    del firsts
    return produced / (time.perf_counter() - start)


async def prefill_rate(engine: Engine, prompt: int) -> float:
    s = Sequence(
        request_id=f"p-{time.monotonic_ns()}",
        prompt=[j % 256 for j in range(prompt)],
        max_new_tokens=1,
        ignore_eos=True,
    )
    start = time.perf_counter()
    engine.submit(s)
    await s.outbox.get()
    return prompt / (time.perf_counter() - start)


async def bench_size(name: str, device: str, dtype: torch.dtype, batches: list[int], repeats: int) -> list[str]:
    config = ModelConfig(vocab_size=320, max_position=4096, **SIZES[name])
    model = TinyTransformer.random(config)
    runner = TorchRunner(model, max_total_tokens=64 * 512 + 4096, device=device, dtype=dtype)
    engine = Engine(runner, EngineLimits(runner.pool.capacity, 64, 2048, 1024, 4096))
    engine.start()
    await decode_rate(engine, 2, 16, 4)  # warm-up (allocator, kernels)
    cells = [f"{params(model):.1f}M"]
    for batch in batches:
        cells.append(f"{statistics.median([await decode_rate(engine, batch, 128, 64) for _ in range(repeats)]):,.0f}")
    cells.append(f"{statistics.median([await prefill_rate(engine, 1024) for _ in range(repeats)]):,.0f}")
    await engine.close()
    return cells


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32", choices=sorted(DTYPES))
    parser.add_argument("--sizes", default="tiny,small,medium")
    parser.add_argument("--batches", default="1,16,64")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    batches = [int(b) for b in args.batches.split(",")]
    where = torch.cuda.get_device_name() if args.device.startswith("cuda") else f"CPU, {args.threads} threads"
    print(f"## Torch runner through the batching engine ({where}, {args.dtype}); median of {args.repeats}\n")
    print("| model | params | " + " | ".join(f"decode tok/s, batch {b}" for b in batches) + " | prefill tok/s (1024) |")
    print("|---|---|" + "---|" * (len(batches) + 1))
    for name in args.sizes.split(","):
        cells = asyncio.run(bench_size(name, args.device, DTYPES[args.dtype], batches, args.repeats))
        print(f"| {name} | " + " | ".join(cells) + " |", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
