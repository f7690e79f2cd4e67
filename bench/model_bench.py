"""The real model's runner against Hugging Face `transformers`, same weights, same device, same run.

Decode tokens/s at several batch sizes and prefill tokens/s of one long prompt, through pdlb's
batching engine (continuous batching, token-slot KV pool) and through `transformers` generate
(greedy, static batch); then the PD KV hand-off cost per prompt token (prefill GPU -> host ->
protobuf chunks -> reassembly -> decode GPU, in one process: the network hop is not included).

  python -m bench.model_bench                                   # CPU, packaged SmolLM2 weights
  python -m bench.model_bench --device cuda --dtype bfloat16 --weights random --batches 1,64,256 --prompt 1024
  python -m bench.model_bench --device cuda --dtype bfloat16 --weights random --shape llama-1b
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import time
from concurrent.futures import ThreadPoolExecutor

import torch

from bench.runner_bench import decode_rate, prefill_rate
from pdlb.engines.torch.batching import Engine, EngineLimits, compute_thread
from pdlb.engines.torch.llama import LlamaModel
from pdlb.engines.torch.runners import TorchRunner
from pdlb.models.config import LlamaConfig

SHAPES = {
    # SmolLM2-135M (the packaged checkpoint's shape)
    "smollm2": LlamaConfig(49152, 576, 1536, 30, 9, 3, 64, 100000.0, 1e-5, 8192, tie_embeddings=True),
    # Llama 3.2 1B's shape (rope scaling left out: speed does not depend on it)
    "llama-1b": LlamaConfig(128256, 2048, 8192, 16, 32, 8, 64, 500000.0, 1e-5, 8192, tie_embeddings=True),
}
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def hf_llama_config(config: LlamaConfig, **extra):
    """`transformers`' LlamaConfig of the same shape as ours."""
    import transformers

    return transformers.LlamaConfig(
        vocab_size=config.vocab_size,
        hidden_size=config.hidden_size,
        intermediate_size=config.intermediate_size,
        num_hidden_layers=config.num_layers,
        num_attention_heads=config.num_heads,
        num_key_value_heads=config.num_kv_heads,
        head_dim=config.head_dim,
        rope_theta=config.rope_theta,
        rms_norm_eps=config.rms_norm_eps,
        max_position_embeddings=config.max_position,
        tie_word_embeddings=config.tie_embeddings,
        **extra,
    )


def build_models(args) -> tuple[LlamaModel, torch.nn.Module, LlamaConfig]:
    import transformers

    if args.weights == "packaged":
        from pdlb.models.catalog import SMOLLM2, resolve

        source = resolve(SMOLLM2)
        config, weights = source.config(), source.state_dict()  # Hugging Face names
    else:
        config, weights = SHAPES[args.shape], None
    theirs = transformers.LlamaForCausalLM(hf_llama_config(config))  # random weights unless packaged ones are given
    if weights is not None:
        theirs.load_state_dict(weights, strict=False)
        theirs.tie_weights()
    ours = LlamaModel(config)
    ours.load_weights(theirs.state_dict())  # the very same values on both sides, through our loader
    return ours, theirs.to(args.device, DTYPES[args.dtype]).eval(), config


async def bench_pdlb(
    model: LlamaModel, args, batches: list[int], compute: ThreadPoolExecutor, graphs: bool | None = None
) -> tuple[dict[int, float], float, float]:
    largest = max(batches)
    capacity = largest * (args.context + args.new) + args.prompt + 4096
    runner = compute.submit(
        TorchRunner, model, capacity, args.device, DTYPES[args.dtype], decode_graphs=graphs
    ).result()
    if runner.graphs is not None and runner.graphs.capture:
        started = time.perf_counter()
        count = compute.submit(runner.graphs.warmup).result()
        print(f"warm-up: {count} decode graphs captured in {time.perf_counter() - started:.2f} s\n")
    limits = EngineLimits(capacity, max(largest, 8), 4096, 4096, max(args.prompt, args.context) + 16)
    engine = Engine(runner, limits, executor=compute)
    engine.start()
    await decode_rate(engine, 2, 16, 4)  # warm-up: allocator, kernels
    rates = {}
    for batch in batches:
        rates[batch] = statistics.median(
            [await decode_rate(engine, batch, args.context, args.new) for _ in range(args.repeats)]
        )
    prefill = statistics.median([await prefill_rate(engine, args.prompt) for _ in range(args.repeats)])
    handoff = await kv_handoff_us_per_token(runner, args.prompt, args.device)
    if runner.graphs is not None and runner.graphs.capture:
        drift = compute.submit(graph_drift, runner).result()
        print(
            f"CUDA graphs: {runner.graphs.captures} captured, {runner.graphs.replays} replays; "
            f"one decode step of 48 rows, graph vs eager: max |logit diff| {drift[0]:.4f}, "
            f"greedy tokens equal {drift[1]}/48\n"
        )
    await engine.close()
    return rates, prefill, handoff


def graph_drift(runner: TorchRunner) -> tuple[float, int]:
    """The same decode step replayed from a graph and run eagerly (padding may change kernels)."""
    from pdlb.engines.torch.model import SeqChunk

    chunks = []
    for i in range(48):
        slots = runner.allocate(40 + i)
        runner.model([SeqChunk([(i * 5 + j) % 256 for j in range(39 + i)], 0, slots)], runner.pool)
        chunks.append(SeqChunk([i % 256], 39 + i, slots))
    replayed = runner.graphs.run(chunks, runner.graphs.bucket(chunks)).clone()
    eager = runner.model(chunks, runner.pool)
    for chunk in chunks:
        runner.release(chunk.slots)
    same = int((replayed.argmax(-1) == eager.argmax(-1)).sum())
    return (replayed - eager).abs().max().item(), same


async def kv_handoff_us_per_token(runner: TorchRunner, tokens: int, device: str) -> float:
    """Prefill side read + encode, decode side reassembly + write, per prompt token (median of 5)."""
    from pdlb.services.scheduler.kv_transfer import decode_kv, encode_kv

    source, target = runner.allocate(tokens), runner.allocate(tokens)

    async def messages(items):
        for item in items:
            yield item

    times = []
    for _ in range(5):
        sync(device)
        start = time.perf_counter()
        k, v = runner.read_kv(source)
        chunks = list(encode_kv(list(range(tokens)), 1, k, v))
        _, k2, v2 = await decode_kv(messages(chunks))
        runner.write_kv(target, k2, v2)
        sync(device)
        times.append(time.perf_counter() - start)
    runner.release(source)
    runner.release(target)
    return statistics.median(times) / tokens * 1e6


@torch.no_grad()
def bench_transformers(model: torch.nn.Module, args, batches: list[int]) -> tuple[dict[int, float], float]:
    device = args.device

    def generate(batch: int, new: int) -> float:
        ids = torch.randint(0, 256, (batch, args.context), device=device)
        sync(device)
        start = time.perf_counter()
        model.generate(ids, max_new_tokens=new, min_new_tokens=new, do_sample=False, pad_token_id=0)
        sync(device)
        return time.perf_counter() - start

    generate(2, 4)  # warm-up
    rates = {}
    for batch in batches:
        samples = []
        for _ in range(args.repeats):
            # decode only: a 1-token run costs the prefill (and set-up); the rest is decode steps
            samples.append(batch * (args.new - 1) / (generate(batch, args.new) - generate(batch, 1)))
        rates[batch] = statistics.median(samples)

    def prefill() -> float:
        ids = torch.randint(0, 256, (1, args.prompt), device=device)
        sync(device)
        start = time.perf_counter()
        model(ids)
        sync(device)
        return args.prompt / (time.perf_counter() - start)

    prefill()
    return rates, statistics.median([prefill() for _ in range(args.repeats)])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32", choices=sorted(DTYPES))
    parser.add_argument("--weights", default="packaged", choices=["packaged", "random"])
    parser.add_argument("--shape", default="smollm2", choices=sorted(SHAPES), help="with --weights random")
    parser.add_argument("--batches", default="1,8,32")
    parser.add_argument("--context", type=int, default=128, help="prompt tokens of each decoding request")
    parser.add_argument("--new", type=int, default=32, help="tokens generated per decoding request")
    parser.add_argument("--prompt", type=int, default=256, help="prompt tokens of the prefill measurement")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--eager-too", action="store_true", help="on CUDA, also run pdlb without CUDA graphs")
    args = parser.parse_args(argv)
    # As in the scheduler, torch runs on one thread only (both runners, in turn): see compute_thread
    torch.set_num_threads(1)
    compute = compute_thread(args.threads)
    batches = [int(b) for b in args.batches.split(",")]
    ours, theirs, config = compute.submit(build_models, args).result()
    params = sum(p.numel() for p in ours.parameters()) / 1e6
    where = torch.cuda.get_device_name() if args.device.startswith("cuda") else f"CPU, {args.threads} threads"
    name = "SmolLM2-135M packaged weights" if args.weights == "packaged" else f"{args.shape} shape, random weights"
    print(f"## {name} ({params:.0f}M), {where}, {args.dtype}; median of {args.repeats}\n")
    print(f"decode: {args.context}-token prompts, {args.new} new tokens each; prefill: {args.prompt}-token prompt\n")
    hf_rates, hf_prefill = compute.submit(bench_transformers, theirs, args, batches).result()
    eager = None
    if args.device.startswith("cuda") and args.eager_too:
        eager = asyncio.run(bench_pdlb(ours, args, batches, compute_thread(args.threads), graphs=False))
    pdlb_rates, pdlb_prefill, handoff = asyncio.run(bench_pdlb(ours, args, batches, compute))  # closes `compute`
    print("| runner | " + " | ".join(f"decode tok/s, batch {b}" for b in batches) + " | prefill tok/s |")
    print("|---|" + "---|" * (len(batches) + 1))
    print("| pdlb | " + " | ".join(f"{pdlb_rates[b]:,.0f}" for b in batches) + f" | {pdlb_prefill:,.0f} |")
    if eager is not None:
        print(
            "| pdlb, no CUDA graphs | " + " | ".join(f"{eager[0][b]:,.0f}" for b in batches) + f" | {eager[1]:,.0f} |"
        )
    print("| transformers | " + " | ".join(f"{hf_rates[b]:,.0f}" for b in batches) + f" | {hf_prefill:,.0f} |")
    ratios = " | ".join(f"{pdlb_rates[b] / hf_rates[b]:.2f}x" for b in batches)
    print(f"| pdlb / transformers | {ratios} | {pdlb_prefill / hf_prefill:.2f}x |")
    kv_bytes = 2 * config.num_layers * config.num_kv_heads * config.head_dim * DTYPES[args.dtype].itemsize
    print(f"\nPD KV hand-off (in-process): {handoff:.1f} us per prompt token ({kv_bytes / 1024:.1f} KiB per token)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
