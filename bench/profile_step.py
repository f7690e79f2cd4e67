"""One decode step of the Llama runner: its time against the memory-bandwidth floor, and where it goes.

For each shape: `runner.step` at a fixed batch (what the engine waits for: plan upload, graph replay
or eager forward, the argmax and the tokens' copy back), timed as the median of `--steps` steps,
repeated `--runs` times; the device time of the same step from CUDA events; kernels per step; and
the floor no implementation can beat: every weight and the attended K/V read once, at the copy
bandwidth measured in the same run (a large device-to-device copy, bytes read plus written).

  python -m bench.profile_step --device cuda --dtype bfloat16 --shape smollm2,llama-1b --batch 64
  python -m bench.profile_step --batch 16 --context 232 --attention sdpa,paged  # on a CPU
  python -m bench.profile_step --batch 16 --context 232 --attention paged,paged+fused

On a CPU, `--attention` names decode variants timed alternately in one run (sdpa: index_select +
SDPA; paged: pdlb's C++ kernel reading the pool in place, paged_attention_cpu.py; a `+fused` suffix
adds the fused C++ element-wise ops of decode_ops_cpu.py, else they run eagerly): the step, and the
decode attention alone per layer (every layer's pool, the step's slot table). The ratio line compares
the second variant with the first.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from bench.model_bench import DTYPES, SHAPES
from pdlb.engines.torch import decode_ops_cpu, paged_attention_cpu, pool_attention
from pdlb.engines.torch.llama import LlamaModel
from pdlb.engines.torch.model import BatchPlan, SeqChunk
from pdlb.engines.torch.runners import StepItem, TorchRunner


def copy_bandwidth(device: str) -> float:
    """Bytes/s of a 2 GiB device-to-device copy, counting bytes read plus bytes written (median of 5)."""
    src = torch.empty(1 << 30, dtype=torch.uint8, device=device).random_()
    dst = torch.empty_like(src)
    dst.copy_(src)
    times = []
    for _ in range(5):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        dst.copy_(src)
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    return 2 * src.numel() / statistics.median(times)


def spread(samples: list[float]) -> str:
    return f"{statistics.median(samples):.3f} ms (min {min(samples):.3f}, max {max(samples):.3f})"


def profile_shape(args, shape: str, bandwidth: float | None) -> dict[str, float]:
    config, dtype = SHAPES[shape], DTYPES[args.dtype]
    model = LlamaModel.random(config)
    runner = TorchRunner(model, args.batch * (args.context + 8), args.device, dtype)
    variants = args.attention.split(",")
    kernels = {"sdpa": None}
    if any(name.split("+")[0] == "paged" for name in variants):
        started = time.perf_counter()
        kernels["paged"] = paged_attention_cpu.shared()
        print(f"paged kernel built or loaded in {time.perf_counter() - started:.1f} s")
    fused_ops = None
    if any(name.endswith("+fused") for name in variants):
        started = time.perf_counter()
        fused_ops = decode_ops_cpu.shared()
        print(f"fused decode ops built or loaded in {time.perf_counter() - started:.1f} s")
    items = []
    for i in range(args.batch):
        slots = runner.allocate(args.context + 1)
        items.append(StepItem(SeqChunk([5 + i], args.context, slots), sample=True))
    on_cuda = args.device.startswith("cuda")
    for _ in range(3):  # capture and warm-up
        runner.step(items)
    by_variant: dict[str, list[float]] = {name: [] for name in variants}
    attention_ms: dict[str, list[float]] = {name: [] for name in variants}
    layout = BatchPlan([item.chunk for item in items], runner.device).attention_layout()
    q = torch.randn(args.batch, config.num_heads, config.head_dim, dtype=dtype, device=runner.device)
    for _ in range(args.runs):
        for name in variants:  # alternating, so that load changes hit every variant alike
            runner.model.decode_attention = kernels[name.split("+")[0]]
            runner.model.decode_ops = fused_ops if name.endswith("+fused") else None
            for _ in range(3):
                runner.step(items)
            samples = []
            for _ in range(args.steps):
                start = time.perf_counter()
                runner.step(items)
                samples.append((time.perf_counter() - start) * 1e3)
            by_variant[name].append(statistics.median(samples))
            samples = []
            for _ in range(args.steps):
                start = time.perf_counter()
                for layer in range(config.num_layers):
                    k_pool, v_pool = runner.pool.k[layer], runner.pool.v[layer]
                    pool_attention.attend(layout, q, q, q, k_pool, v_pool, kernels[name.split("+")[0]])
                samples.append((time.perf_counter() - start) * 1e3 / config.num_layers)
            attention_ms[name].append(statistics.median(samples))
    runs = by_variant[variants[0]]
    weights = sum(p.numel() * p.element_size() for p in runner.model.parameters())
    per_token = 2 * config.num_layers * config.num_kv_heads * config.head_dim * dtype.itemsize  # K and V
    kv = per_token * args.batch * (args.context + 1)
    result = {"step_ms": statistics.median(runs)}
    print(f"## {shape}, batch {args.batch}, context {args.context}, {args.dtype}, {args.device}\n")
    for name, medians in by_variant.items():
        print(f"runner.step, {name} attention: {spread(medians)} over {args.runs} runs ({args.steps} steps each)")
        print(f"  decode attention alone, per layer: {spread(attention_ms[name])}")
    if len(variants) > 1:
        for label, table in (("step", by_variant), ("attention", attention_ms)):
            ratios = [a / b for a, b in zip(table[variants[1]], table[variants[0]], strict=True)]
            print(
                f"{label} {variants[1]} / {variants[0]} per run: {statistics.median(ratios):.3f} "
                f"(min {min(ratios):.3f}, max {max(ratios):.3f})"
            )
    if on_cuda:
        chunks = [item.chunk for item in items]
        bucket = runner.graphs.bucket(chunks) if runner.graphs else None
        device_ms = []
        for _ in range(args.runs):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            for _ in range(args.steps):
                runner.graphs.run(chunks, bucket) if bucket else runner.model(chunks, runner.pool)
            end.record()
            end.synchronize()
            device_ms.append(start.elapsed_time(end) / args.steps)
        result["device_ms"] = statistics.median(device_ms)
        print(f"forward alone (CUDA events, back to back, {'graph' if bucket else 'eager'}): {spread(device_ms)}")
    if bandwidth:
        floor = (weights + kv) / bandwidth * 1e3
        result["floor_ms"] = floor
        print(
            f"bandwidth floor: {weights / 1e6:.0f} MB weights + {kv / 1e6:.1f} MB K/V at "
            f"{bandwidth / 1e12:.2f} TB/s = {floor:.3f} ms; step / floor {result['step_ms'] / floor:.1f}x"
        )
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if on_cuda else [])
    with profile(activities=activities) as prof:
        runner.step(items)
    if on_cuda:
        kernels = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
        print(f"kernels per step: {len(kernels)}\n")
    if args.rows:
        sort = "self_device_time_total" if on_cuda else "self_cpu_time_total"
        print(prof.key_averages().table(sort_by=sort, row_limit=args.rows))
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32", choices=sorted(DTYPES))
    parser.add_argument("--shape", default="smollm2", help=f"comma-separated, of {sorted(SHAPES)}")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--context", type=int, default=128, help="tokens each row attends over")
    parser.add_argument("--runs", type=int, default=3, help="repeats, for the spread")
    parser.add_argument("--steps", type=int, default=50, help="steps per run")
    parser.add_argument("--rows", type=int, default=15, help="rows of the profiler table")
    parser.add_argument(
        "--attention",
        default="sdpa",
        help="CPU decode variants, comma-separated for several timed alternately in one run: sdpa "
        "(index_select + SDPA), paged (pdlb's C++ kernel, reads the pool in place), each with an optional "
        "+fused (the fused C++ element-wise ops); the profile is of the last",
    )
    args = parser.parse_args()
    bandwidth = copy_bandwidth(args.device) if args.device.startswith("cuda") else None
    with torch.no_grad():
        for shape in args.shape.split(","):
            profile_shape(args, shape, bandwidth)
            torch.cuda.empty_cache() if args.device.startswith("cuda") else None


if __name__ == "__main__":
    main()
