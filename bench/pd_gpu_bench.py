"""PD on one device: a prefill worker and a decode worker (real scheduler processes sharing one GPU),
each prompt's KV handed off through PullKV over loopback gRPC, against a mixed worker on the same
device serving the same prompts. Reports TTFT both ways, the hand-off's wall time (prefill worker's
first token to decode worker's first token) and its parts per prompt token from the workers' own
metrics: the prefill side's read off the device, the decode side's receipt and its write into the
pool. Medians over `--repeats` distinct prompts per length (distinct, so no prefix-cache hits).

The model is a Hugging Face directory written here with SmolLM2's shape and random weights (speed
does not depend on weight values; the packaged checkpoint does not travel to a lent GPU machine):

  python -m bench.pd_gpu_bench --device cuda --dtype bfloat16
  python -m bench.pd_gpu_bench --device cpu --dtype float32 --lengths 64,256 --shape tiny   # a quick check
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import statistics
import tempfile
import time
import urllib.request
from pathlib import Path

import grpc

from bench.model_bench import SHAPES, hf_llama_config
from pdlb.common.free_port import free_port
from pdlb.common.processes import ServiceProcess, script
from pdlb.models.config import LlamaConfig
from pdlb.v1 import common_pb2, scheduler_pb2, scheduler_pb2_grpc

SHAPES = {**SHAPES, "tiny": LlamaConfig(512, 64, 128, 2, 4, 2, 16, 10000.0, 1e-5, 4096, tie_embeddings=True)}
TOKENIZER_VOCAB = 400  # prompts use ids below it, so they stay valid for the small tokenizer written here
METRICS = ("kv_read_seconds", "kv_receive_seconds", "kv_write_seconds", "kv_sent_tokens", "kv_received_tokens")


def write_checkpoint(path: Path, config: LlamaConfig) -> None:
    """A Llama checkpoint of `config`'s shape with random weights, and a small byte-level BPE tokenizer."""
    import torch
    import transformers
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=TOKENIZER_VOCAB, special_tokens=["<s>", "</s>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    backend.train_from_iterator(["the quick brown fox jumps over the lazy dog"] * 50, trainer)
    path.mkdir(parents=True)
    backend.save(str(path / "tokenizer.json"))
    (path / "tokenizer_config.json").write_text(json.dumps({"bos_token": "<s>", "eos_token": "</s>"}))
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(hf_llama_config(config, bos_token_id=0, eos_token_id=1))
    model.save_pretrained(str(path), safe_serialization=True)


def start_worker(mode: str, model: Path, args: argparse.Namespace, log_dir: str) -> tuple[ServiceProcess, int]:
    metrics = free_port()
    argv = [
        *script("pdlb-scheduler"),
        "--port", "0", "--model", str(model), "--disaggregation-mode", mode, "--metrics-port", str(metrics),
        "--device", args.device, "--dtype", args.dtype, "--torch-threads", "1",
        "--max-total-tokens", str(args.kv_tokens), "--max-position", str(max(args.lengths) + 64),
        "--weights-cache-dir", "",
    ]  # fmt: skip
    return ServiceProcess(mode, argv, log_dir, {}), metrics


def print_capture_lines(log_dir: Path) -> None:
    """What each worker said at start about its CUDA graphs."""
    for log in sorted(log_dir.glob("*.log")):
        for line in log.read_text().splitlines():
            if "CUDA graphs" in line:
                print(f"\n{log.stem}: {line.strip()}")


def scrape(port: int) -> dict[str, float]:
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    values = {}
    for line in text.splitlines():
        for name in METRICS:
            if line.startswith(f"pdlb_scheduler_{name}_total "):
                values[name] = float(line.split()[1])
    return values


def inference(rid: str, ids: list[int], new: int, room: int | None = None) -> common_pb2.InferenceRequest:
    req = common_pb2.InferenceRequest(
        request_id=rid,
        input_ids=ids,
        sampling=common_pb2.SamplingParams(max_new_tokens=new, ignore_eos=True, temperature=0.0),
    )
    if room is not None:
        req.bootstrap_room = room
    return req


async def first_token_s(call, start: float) -> float:
    """Seconds from `start` to the stream's first token; the rest of the stream is read to its end."""
    first = None
    async for chunk in call:
        if first is None and chunk.token_ids:
            first = time.perf_counter() - start
    return first


async def main_async(args: argparse.Namespace) -> None:
    config = SHAPES[args.shape]
    with tempfile.TemporaryDirectory() as tmp:
        model = Path(tmp) / "model"
        write_checkpoint(model, config)
        # "null": a mixed worker (prefill and decode in one), the baseline
        workers = {mode: start_worker(mode, model, args, tmp) for mode in ("prefill", "decode", "null")}
        for proc, _ in workers.values():
            proc.spawn()
        try:
            for proc, _ in workers.values():
                proc.wait_ready(600)
            addresses = {"mixed" if m == "null" else m: (proc.address, port) for m, (proc, port) in workers.items()}
            await measure(args, config, addresses)
            print_capture_lines(Path(tmp))
        finally:
            for proc, _ in workers.values():
                proc.terminate()


async def measure(args: argparse.Namespace, config: LlamaConfig, workers: dict[str, tuple[str, int]]) -> None:
    channels = {mode: grpc.aio.insecure_channel(address) for mode, (address, _) in workers.items()}
    stubs = {mode: scheduler_pb2_grpc.SchedulerStub(channel) for mode, channel in channels.items()}
    rng = random.Random(7)
    prefill_address = workers["prefill"][0]

    async def pd(ids: list[int], rid: str) -> tuple[float, float]:
        room = rng.getrandbits(62)
        start = time.perf_counter()
        to_decode = inference(rid, ids, args.new, room)
        decode = stubs["decode"].Generate(
            scheduler_pb2.SchedulerGenerateRequest(request=to_decode, prefill_address=prefill_address)
        )
        to_prefill = inference(rid, ids, 1, room)
        prefill = stubs["prefill"].Generate(scheduler_pb2.SchedulerGenerateRequest(request=to_prefill))
        prefilled, ttft = await asyncio.gather(first_token_s(prefill, start), first_token_s(decode, start))
        return ttft, prefilled

    async def mixed(ids: list[int], rid: str) -> float:
        start = time.perf_counter()
        call = stubs["mixed"].Generate(scheduler_pb2.SchedulerGenerateRequest(request=inference(rid, ids, args.new)))
        return await first_token_s(call, start)

    def prompt(length: int) -> list[int]:
        return [rng.randrange(2, TOKENIZER_VOCAB) for _ in range(length)]

    for length in (16, 64, *args.lengths):  # warm-up: allocator, kernels, CUDA graphs, channels
        await pd(prompt(length), f"warm-pd-{length}")
        await mixed(prompt(length), f"warm-mixed-{length}")
    kv_bytes = 2 * config.num_layers * config.num_kv_heads * config.head_dim * (4 if args.dtype == "float32" else 2)
    print(f"## PD on one device: {args.shape} shape, {args.dtype}, {args.device}; median of {args.repeats}\n")
    print(f"{kv_bytes / 1024:.1f} KiB of K and V per prompt token; {args.new} output tokens per request\n")
    print(
        "| prompt tokens | TTFT mixed ms | TTFT PD ms | PD: prefill done ms | hand-off ms | "
        "read us/token | receive us/token | write us/token | hand-off us/token |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for length in args.lengths:
        rows = []
        for i in range(args.repeats):
            before = {mode: scrape(workers[mode][1]) for mode in ("prefill", "decode")}
            ttft, prefilled = await pd(prompt(length), f"pd-{length}-{i}")
            after = {mode: scrape(workers[mode][1]) for mode in ("prefill", "decode")}
            mixed_ttft = await mixed(prompt(length), f"mixed-{length}-{i}")

            def delta(mode: str, name: str, after=after, before=before) -> float:
                return after[mode][name] - before[mode][name]

            sent, received = delta("prefill", "kv_sent_tokens"), delta("decode", "kv_received_tokens")
            assert sent == received == length, (sent, received, length)
            rows.append(
                (
                    mixed_ttft,
                    ttft,
                    prefilled,
                    ttft - prefilled,
                    delta("prefill", "kv_read_seconds") / length,
                    delta("decode", "kv_receive_seconds") / length,
                    delta("decode", "kv_write_seconds") / length,
                )
            )
        m = [statistics.median(column) for column in zip(*rows, strict=True)]
        print(
            f"| {length} | {m[0] * 1e3:.1f} | {m[1] * 1e3:.1f} | {m[2] * 1e3:.1f} | {m[3] * 1e3:.1f} | "
            f"{m[4] * 1e6:.1f} | {m[5] * 1e6:.1f} | {m[6] * 1e6:.1f} | {m[3] / length * 1e6:.1f} |"
        )
    for channel in channels.values():
        await channel.close()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--shape", default="smollm2", choices=sorted(SHAPES))
    parser.add_argument("--lengths", default="128,1024,4096", type=lambda s: [int(x) for x in s.split(",")])
    parser.add_argument("--new", type=int, default=8, help="output tokens per request")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--kv-tokens", type=int, default=65536, help="KV budget of each worker")
    args = parser.parse_args(argv)
    asyncio.run(main_async(args))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
