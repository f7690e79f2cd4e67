"""The real model's runner against Hugging Face `transformers`, same weights, same device, same run.

Decode tokens/s at several batch sizes and prefill tokens/s of one long prompt, through pdlb's
batching engine (continuous batching, token-slot KV pool) and through `transformers` generate
(greedy, static batch); then the PD KV hand-off cost per prompt token (prefill GPU -> host ->
protobuf chunks -> reassembly -> decode GPU, in one process: the network hop is not included).

Both sides are measured `--runs` times, interleaved (transformers, then pdlb, per run), so drift of
the machine during the run lands on both; each cell is the median over the runs with its min-max
spread, and the ratio is taken within each run before its median. On CUDA the logits and greedy
tokens of both sides are compared too (same weights, same prompts).

  python -m bench.model_bench                                   # CPU, packaged SmolLM2 weights
  python -m bench.model_bench --device cuda --dtype bfloat16 --weights random --batches 1,64,256 --prompt 1024
  python -m bench.model_bench --device cuda --dtype bfloat16 --weights random --shape llama-1b
"""

from __future__ import annotations

import argparse
import asyncio
import copy
import statistics
import time
from concurrent.futures import ThreadPoolExecutor

import torch

from bench.runner_bench import decode_rate, prefill_rate
from pdlb.engines.request import EngineLimits
from pdlb.engines.torch.batching import Engine, compute_thread
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

    transformers.logging.set_verbosity_error()  # generate's padding-side advice: no tokenizer here

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
    # `.to(dtype)` rounds buffers too; transformers loading a checkpoint in a dtype keeps the
    # rotary frequencies in float32 (as pdlb's model does), so they are put back
    frequencies = {name: b.clone() for name, b in theirs.named_buffers() if name.endswith("inv_freq")}
    theirs = theirs.to(args.device, DTYPES[args.dtype]).eval()
    for name, values in frequencies.items():
        owner, _, leaf = name.rpartition(".")
        setattr(theirs.get_submodule(owner), leaf, values.to(args.device))
    return ours, theirs, config


class PdlbSide:
    """pdlb's runner and engine, built once (graphs captured once) and measured run after run."""

    def __init__(self, model: LlamaModel, args, compute: ThreadPoolExecutor, graphs: bool | None = None) -> None:
        self.args, self.compute = args, compute
        largest = max(int(b) for b in args.batches.split(","))
        capacity = largest * (args.context + args.new) + args.prompt + 4096
        self.runner = compute.submit(
            TorchRunner, model, capacity, args.device, DTYPES[args.dtype], decode_graphs=graphs
        ).result()
        if self.runner.graphs is not None and self.runner.graphs.capture:
            started = time.perf_counter()
            count = compute.submit(self.runner.graphs.warmup).result()
            print(f"warm-up: {count} decode graphs captured in {time.perf_counter() - started:.2f} s\n")
        limits = EngineLimits(capacity, max(largest, 8), 4096, 4096, max(args.prompt, args.context) + 16)
        self.engine = Engine(self.runner, limits, executor=compute)

    async def start(self) -> None:
        self.engine.start()
        await decode_rate(self.engine, 2, 16, 4)  # warm-up: allocator, kernels

    async def once(self, batches: list[int]) -> tuple[dict[int, float], float]:
        """One run: decode tok/s per batch size, prefill tok/s."""
        rates = {b: await decode_rate(self.engine, b, self.args.context, self.args.new) for b in batches}
        return rates, await prefill_rate(self.engine, self.args.prompt)


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


class TransformersSide:
    """`transformers` generate on the same weights and device."""

    def __init__(self, model: torch.nn.Module, args) -> None:
        self.model, self.args = model, args
        self.generate(2, 4)  # warm-up
        self.prefill()

    @torch.no_grad()
    def generate(self, batch: int, new: int) -> float:
        ids = torch.randint(0, 256, (batch, self.args.context), device=self.args.device)
        sync(self.args.device)
        start = time.perf_counter()
        self.model.generate(ids, max_new_tokens=new, min_new_tokens=new, do_sample=False, pad_token_id=0)
        sync(self.args.device)
        return time.perf_counter() - start

    @torch.no_grad()
    def prefill(self) -> float:
        ids = torch.randint(0, 256, (1, self.args.prompt), device=self.args.device)
        sync(self.args.device)
        start = time.perf_counter()
        self.model(ids)
        sync(self.args.device)
        return self.args.prompt / (time.perf_counter() - start)

    def once(self, batches: list[int]) -> tuple[dict[int, float], float]:
        """One run: decode tok/s per batch size (a 1-token generate costs the prefill and set-up;
        the rest of a full one is decode steps), prefill tok/s."""
        new = self.args.new
        rates = {b: b * (new - 1) / (self.generate(b, new) - self.generate(b, 1)) for b in batches}
        return rates, self.prefill()


@torch.no_grad()
def compare_outputs(model: LlamaModel, theirs: torch.nn.Module, device: str, dtype: torch.dtype, new: int = 16) -> str:
    """pdlb against `transformers` on the same weights: last-token logits after a prompt and `new`
    greedy tokens (whole-prompt prefill, then eager decode steps; graph replay equals eager, see
    graph_drift), for prompts of 12 to 250 tokens; one line each for the fused kernels and for the
    plain torch operations, so the fused path's drift shows beside that of unfused `dtype` math."""
    from pdlb.engines.torch.model import KVPool, SeqChunk

    pool = KVPool(model.kv_shape(), 4096, torch.device(device), dtype)
    lines = []
    for fused in (True, False):
        model.fused = fused
        generator = torch.Generator().manual_seed(7)
        diffs, scales, equal, total = [], [], 0, 0
        for length in (12, 40, 100, 250):
            ids = torch.randint(0, 256, (length,), generator=generator).tolist()
            reference = theirs(torch.tensor([ids], device=device)).logits[0, -1].float()
            slots = pool.allocate(length + new)
            logits = model([SeqChunk(ids, 0, slots)], pool)[0]
            diffs.append((logits - reference).abs().max().item())
            scales.append(reference.abs().max().item())
            ours = [int(logits.argmax())]
            for step in range(new - 1):
                ours.append(int(model([SeqChunk([ours[-1]], length + step, slots)], pool)[0].argmax()))
            pool.release(slots)
            expected = theirs.generate(
                torch.tensor([ids], device=device), max_new_tokens=new, do_sample=False, pad_token_id=0
            )[0, length:].tolist()
            equal += next((i for i, (a, b) in enumerate(zip(ours, expected, strict=True)) if a != b), new)
            total += new
        lines.append(
            f"{str(dtype).removeprefix('torch.')}, {'fused kernels' if fused else 'plain torch'}: prefill logits "
            f"max |diff| {max(diffs):.4f} (largest |logit| {max(scales):.2f}); greedy tokens equal up to the "
            f"first difference {equal}/{total}"
        )
    model.fused = None
    return "\n".join(lines)


async def check_outputs(
    args, runner: TorchRunner, theirs: torch.nn.Module, config: LlamaConfig, compute: ThreadPoolExecutor
) -> None:
    loop = asyncio.get_running_loop()
    print("\nagainst transformers (same weights; prompts of 12/40/100/250 tokens, 16 greedy tokens each):")
    dtype = DTYPES[args.dtype]
    print(await loop.run_in_executor(compute, compare_outputs, runner.model, theirs, args.device, dtype))
    if dtype != torch.float32:
        # float32 copies of the same (rounded) weights: the kernels' own error, without the dtype's
        exact = await loop.run_in_executor(compute, float32_copies, theirs, config)
        print(await loop.run_in_executor(compute, compare_outputs, *exact, args.device, torch.float32))


def float32_copies(theirs: torch.nn.Module, config: LlamaConfig) -> tuple[LlamaModel, torch.nn.Module]:
    theirs32 = copy.deepcopy(theirs).float()
    ours32 = LlamaModel(config)
    ours32.load_weights({k: v.float().cpu() for k, v in theirs32.state_dict().items()})
    return ours32.to(next(theirs32.parameters()).device), theirs32


def cell(samples: list[float], fmt: str = ",.0f") -> str:
    """Median and min-max spread of one cell's runs."""
    if len(samples) == 1:
        return format(samples[0], fmt)
    return f"{statistics.median(samples):{fmt}} ({min(samples):{fmt}}-{max(samples):{fmt}})"


async def run(args, ours: LlamaModel, theirs: torch.nn.Module, config: LlamaConfig) -> None:
    batches = [int(b) for b in args.batches.split(",")]
    compute = compute_thread(args.threads)
    loop = asyncio.get_running_loop()
    sides = {"pdlb": PdlbSide(ours, args, compute)}
    if args.check_only:
        await check_outputs(args, sides["pdlb"].runner, theirs, config, compute)
        compute.shutdown()
        return
    if args.device.startswith("cuda") and args.eager_too:
        sides["pdlb, no CUDA graphs"] = PdlbSide(ours, args, compute, graphs=False)
    for side in sides.values():
        await side.start()
    hf = await loop.run_in_executor(compute, TransformersSide, theirs, args)
    decode: dict[str, dict[int, list[float]]] = {name: {b: [] for b in batches} for name in [*sides, "transformers"]}
    prefill: dict[str, list[float]] = {name: [] for name in decode}
    # one untimed run of every cell first: the first generate at each batch size pays for cuBLAS
    # heuristics and allocator growth, the first prefill of a length for its kernels
    await loop.run_in_executor(compute, hf.once, batches)
    for side in sides.values():
        await side.once(batches)
    for number in range(args.runs):
        started = time.perf_counter()
        rates, rate = await loop.run_in_executor(compute, hf.once, batches)
        for b in batches:
            decode["transformers"][b].append(rates[b])
        prefill["transformers"].append(rate)
        for name, side in sides.items():
            rates, rate = await side.once(batches)
            for b in batches:
                decode[name][b].append(rates[b])
            prefill[name].append(rate)
        ratio = decode["pdlb"][batches[-1]][-1] / decode["transformers"][batches[-1]][-1]
        print(f"run {number + 1}/{args.runs}: {time.perf_counter() - started:.1f} s; batch {batches[-1]}: {ratio:.2f}x")
    runner = sides["pdlb"].runner
    handoff = await kv_handoff_us_per_token(runner, args.prompt, args.device)
    if runner.graphs is not None and runner.graphs.capture:
        drift = await loop.run_in_executor(compute, graph_drift, runner)
        print(
            f"\nCUDA graphs: {runner.graphs.captures} captured, {runner.graphs.replays} replays; "
            f"one decode step of 48 rows, graph vs eager: max |logit diff| {drift[0]:.4f}, "
            f"greedy tokens equal {drift[1]}/48"
        )
    if args.device.startswith("cuda"):
        await check_outputs(args, runner, theirs, config, compute)
    for side in sides.values():
        await side.engine.close()
    compute.shutdown()
    print(f"\nmedian of {args.runs} runs (min-max)\n")
    print(
        "| runner | " + " | ".join(f"decode tok/s, batch {b}" for b in batches) + f" | prefill tok/s ({args.prompt}) |"
    )
    print("|---|" + "---|" * (len(batches) + 1))
    for name in decode:
        print(f"| {name} | " + " | ".join(cell(decode[name][b]) for b in batches) + f" | {cell(prefill[name])} |")
    ratios = [[p / t for p, t in zip(decode["pdlb"][b], decode["transformers"][b], strict=True)] for b in batches]
    prefill_ratio = [p / t for p, t in zip(prefill["pdlb"], prefill["transformers"], strict=True)]
    print(
        "| pdlb / transformers (x) | "
        + " | ".join(cell(r, ".2f") for r in ratios)
        + f" | {cell(prefill_ratio, '.2f')} |"
    )
    kv_bytes = 2 * config.num_layers * config.num_kv_heads * config.head_dim * DTYPES[args.dtype].itemsize
    print(f"\nPD KV hand-off (in-process): {handoff:.1f} us per prompt token ({kv_bytes / 1024:.1f} KiB per token)")


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
    parser.add_argument("--runs", type=int, default=3, help="interleaved runs of both sides (medians, spread)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--check-only", action="store_true", help="only compare outputs with transformers")
    parser.add_argument("--eager-too", action="store_true", help="on CUDA, also run pdlb without CUDA graphs")
    args = parser.parse_args(argv)
    # As in the scheduler, torch runs on one thread only (both runners, in turn): see compute_thread
    torch.set_num_threads(1)
    with compute_thread(args.threads) as loader:
        ours, theirs, config = loader.submit(build_models, args).result()
    params = sum(p.numel() for p in ours.parameters()) / 1e6
    where = torch.cuda.get_device_name() if args.device.startswith("cuda") else f"CPU, {args.threads} threads"
    name = "SmolLM2-135M packaged weights" if args.weights == "packaged" else f"{args.shape} shape, random weights"
    if args.check_only:
        print(f"## {name} ({params:.0f}M), {where}, {args.dtype}: outputs against transformers")
    else:
        print(f"## {name} ({params:.0f}M), {where}, {args.dtype}; {args.runs} runs\n")
        print(
            f"decode: {args.context}-token prompts, {args.new} new tokens each; prefill: {args.prompt}-token prompt\n"
        )
    asyncio.run(run(args, ours, theirs, config))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
