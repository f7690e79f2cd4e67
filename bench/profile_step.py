"""Profile one decode step of the Llama runner (where the time of a step goes), e.g. on a GPU:
`python -m bench.profile_step --device cuda --dtype bfloat16 --batch 64`."""

from __future__ import annotations

import argparse
import time

from bench.model_bench import DTYPES, SHAPES
from pdlb.engines.torch.llama import LlamaModel
from pdlb.engines.torch.model import SeqChunk
from pdlb.engines.torch.runners import StepItem, TorchRunner


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32", choices=sorted(DTYPES))
    parser.add_argument("--shape", default="smollm2", choices=sorted(SHAPES))
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--context", type=int, default=128)
    args = parser.parse_args()
    runner = TorchRunner(
        LlamaModel.random(SHAPES[args.shape]), args.batch * (args.context + 8), args.device, DTYPES[args.dtype]
    )
    items = []
    for _ in range(args.batch):
        slots = runner.allocate(args.context + 1)
        items.append(StepItem(SeqChunk([5], args.context, slots), sample=True))
    for _ in range(3):
        runner.step(items)
    start = time.perf_counter()
    for _ in range(10):
        runner.step(items)
    print(f"step: {(time.perf_counter() - start) / 10 * 1000:.2f} ms at batch {args.batch}")
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if args.device.startswith("cuda") else [])
    with profile(activities=activities) as prof:
        runner.step(items)
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=15))


if __name__ == "__main__":
    main()
