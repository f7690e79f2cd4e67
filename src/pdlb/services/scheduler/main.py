"""`pdlb-scheduler`: one DP worker: the scheduler service over one engine (pdlb's own continuous
batching over a torch model or a cost model, or a running vLLM server's DP rank; see
pdlb.engines.base for the interface)."""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
import uuid
from pathlib import Path

import torch

from pdlb.common.bootstrap_locator import BootstrapLocator
from pdlb.common.config import FlagParser, FlagRefused, add_common_flags, csv_list
from pdlb.common.grpc_server import ServiceHost, advertised, run_service, run_until_signal
from pdlb.common.membership import LeasedRegistration, workers_prefix
from pdlb.common.modes import role_of_mode
from pdlb.common.roles import role_to_proto
from pdlb.common.tokenizer import Tokenizer
from pdlb.engines.base import Engine
from pdlb.engines.request import EngineLimits
from pdlb.engines.torch import cxx_build, decode_ops_cpu, dtypes, paged_attention_cpu
from pdlb.engines.torch.batching import BURST_QUIET_S, compute_thread
from pdlb.engines.torch.batching import Engine as BatchingEngine
from pdlb.engines.torch.cpu_binding import cpus_to_bind
from pdlb.engines.torch.dp_group import DPGroup, GroupBroken, GroupSpec
from pdlb.engines.torch.eviction import DEFAULT_EVICTION, eviction_order
from pdlb.engines.torch.llama import LlamaModel
from pdlb.engines.torch.lockstep import LockstepEngine
from pdlb.engines.torch.model import ModelConfig, TinyTransformer
from pdlb.engines.torch.runners import CostModel, Runner, SimRunner, TorchRunner
from pdlb.engines.vllm.engine import VLLMEngine
from pdlb.models.catalog import SMOLLM2, TINY, ModelSource, default_cache_dir, resolve
from pdlb.models.config import UnsupportedModel
from pdlb.services.scheduler.metrics import serve_metrics
from pdlb.services.scheduler.reporter import LoadReporter
from pdlb.services.scheduler.service import KV_WAIT_S, DispatchAcks, SchedulerServicer
from pdlb.services.scheduler.vllm_attach import HealthGatedRegistration, open_vllm_engine
from pdlb.v1 import bootstrap_pb2, common_pb2, scheduler_pb2, scheduler_pb2_grpc

log = logging.getLogger("pdlb.scheduler")


CHUNKED_PREFILL = 512  # prefill tokens per step by default
CPU_CHUNKED_PREFILL = 2048  # the same on a CPU: vLLM's CPU default (its OpenAI server's max_num_batched_tokens)
CPU_BURST_WINDOW_MS = 10.0  # the burst window on a CPU


def on_cpu_torch(args) -> bool:
    """Whether this worker runs pdlb's torch model on a CPU (where the step-size defaults differ)."""
    return args.engine == "pdlb" and args.runner == "torch" and args.device == "cpu"


def step_limits(args) -> tuple[int, float]:
    """The prefill tokens per step and the burst window (seconds) of --chunked-prefill-size and
    --burst-window-ms, device defaults applied; FlagRefused names a value out of range."""
    if args.chunked_prefill_size < 0:
        raise FlagRefused("--chunked-prefill-size must be >= 0 (0: by device)")
    if args.burst_window_ms < 0 and args.burst_window_ms != -1:
        raise FlagRefused("--burst-window-ms must be >= 0, or -1 (by device)")
    chunk = args.chunked_prefill_size or (CPU_CHUNKED_PREFILL if on_cpu_torch(args) else CHUNKED_PREFILL)
    window_ms = args.burst_window_ms
    if window_ms == -1:
        window_ms = CPU_BURST_WINDOW_MS if on_cpu_torch(args) else 0.0
    return chunk, window_ms / 1e3


def build_parser() -> FlagParser:
    p = FlagParser("scheduler", "One DP worker: continuous batching over a KV-token budget, streaming load reports.")
    add_common_flags(p, default_port=50070)
    p.flag(
        "--disaggregation-mode",
        default="null",
        choices=["null", "prefill", "decode"],
        help="null (non-PD, mixed), prefill or decode",
    )
    p.flag("--dp-rank", default=0, type=int, help="the DP rank this worker serves")
    p.flag("--worker-id", default="", help="unique worker id (default: generated per start)")
    p.flag("--dispatchers", default="", help="dispatcher host:port list to report load to (besides etcd's)")
    p.flag("--bootstrap", default="", help="bootstrap server host:port (default: found in etcd)")
    p.flag("--report-interval-ms", default=100, type=int, help="periodic load report interval")
    p.flag("--max-total-tokens", default=8192, type=int, help="KV cache budget in tokens")
    p.flag("--max-running-requests", default=64, type=int, help="largest running batch")
    p.flag(
        "--max-waiting-requests",
        default=1024,
        type=int,
        help="longest waiting queue beyond free batch slots; more: RESOURCE_EXHAUSTED",
    )
    p.flag(
        "--chunked-prefill-size",
        default=0,
        type=int,
        help=f"prefill tokens per step at most. 0: by device: {CPU_CHUNKED_PREFILL} for the torch runner on a CPU "
        f"(vLLM's CPU default; a CPU's GEMMs reach their peak only at many rows), {CHUNKED_PREFILL} elsewhere",
    )
    p.flag(
        "--burst-window-ms",
        default=-1.0,
        type=float,
        help="an idle worker that receives a request waits up to this long for the rest of a burst (until "
        f"no request came for {BURST_QUIET_S * 1e3:g} ms, or the waiting prompts fill a step), so one step "
        f"takes the burst together. -1: by device: {CPU_BURST_WINDOW_MS:g} for the torch runner on a CPU "
        "(its steps take hundreds of ms), 0 (off) elsewhere",
    )
    p.flag("--max-prompt-tokens", default=4096, type=int, help="longest prompt accepted")
    p.flag("--prefix-cache", default=True, type=bool, help="share the KV of common prompt prefixes (radix cache)")
    p.flag("--page-size", default=16, type=int, help="prefix-cache block size in tokens")
    p.flag(
        "--prefix-eviction",
        default=DEFAULT_EVICTION,
        help="which unlocked prefix-cache blocks go first when KV is short: lru (least recently used); slru "
        "(blocks a later request reused are kept over blocks seen once, LRU in each segment); slru-random "
        "(slru, blocks seen once in random order: keeps some conversations' first turns that LRU drops when turns "
        "come back after more new prompt tokens than the KV holds, but leaves many prefixes partial; behind a "
        "cache-aware dispatcher it measured worse than lru, docs/BENCHMARKS.md); slru:SHARE, slru-random:SHARE "
        "cap the reused blocks' share of the cache (default 0.8). pdlb's engines only (vLLM evicts LRU itself)",
    )
    p.flag(
        "--kv-events",
        default=True,
        type=bool,
        help="report prefix-cache block events, so dispatchers know exactly what is cached here",
    )
    p.flag("--metrics-port", default=0, type=int, help="Prometheus /metrics HTTP port (0: disabled)")
    p.flag("--kv-hold-ttl", default=60.0, type=float, help="prefill: seconds held KV waits for its decode side")
    p.flag(
        "--kv-wait-timeout",
        default=KV_WAIT_S,
        type=float,
        help="PD: seconds a hand-off waits for its room when the request has no deadline (decode: the bootstrap "
        "record and the KV; prefill: a pull for a room not prefilled yet); a request's deadline always wins, so "
        "one queued at prefill waits as long as its deadline allows. Running out: DEADLINE_EXCEEDED",
    )
    p.flag(
        "--engine",
        default="pdlb",
        choices=["pdlb", "vllm"],
        help="pdlb: pdlb's own continuous batching (over --runner); vllm: a DP rank of the vLLM server at --vllm-url",
    )
    p.flag("--runner", default="torch", choices=["torch", "sim"], help="torch model, or the cost-model simulator")
    p.flag("--vllm-url", default="", help="vllm engine: base URL of the vLLM OpenAI server, e.g. http://127.0.0.1:8100")
    p.flag(
        "--vllm-server-ranks",
        default=1,
        type=int,
        help="vllm engine: DP ranks that server holds (its --data-parallel-size); this worker serves its rank "
        "dp_rank %% N, addressed with X-data-parallel-rank when N > 1",
    )
    p.flag(
        "--vllm-kv-connector",
        default="",
        help="vllm engine, prefill/decode workers: the kv_connector the vLLM server was started with (its "
        "--kv-transfer-config, e.g. ExampleConnector); vLLM moves the KV through it, pdlb hands the "
        "kv_transfer_params over per bootstrap room",
    )
    p.flag("--vllm-wait", default=600.0, type=float, help="vllm engine: seconds to wait for the server to be healthy")
    p.flag(
        "--vllm-poll-interval", default=0.5, type=float, help="vllm engine: seconds between /health + /metrics reads"
    )
    p.flag("--sim-slowdown", default=1.0, type=float, help="sim runner: multiply every step time (a slower GPU)")
    p.flag(
        "--model",
        default=SMOLLM2,
        help=f"{SMOLLM2} (packaged), {TINY} (toy for tests and simulations), a .gguf file, or a Hugging Face "
        "Llama/Qwen2/Mistral directory",
    )
    p.flag(
        "--served-model-name", default="", help="model id advertised to dispatchers and clients (default: from --model)"
    )
    p.flag(
        "--weights-cache-dir",
        default=str(default_cache_dir()),
        help="where dequantised GGUF weights are cached for fast restarts ('' disables)",
    )
    p.flag("--weights-cache-gb", default=4.0, type=float, help="bound of the weights cache (oldest files dropped)")
    p.flag("--device", default="cpu", help="torch device: cpu or cuda[:N]")
    p.flag(
        "--dtype",
        default=dtypes.AUTO,
        choices=dtypes.CHOICES,
        help="model and KV dtype. auto: bfloat16 on a CPU that multiplies it natively (AVX512-BF16 or AMX), "
        "else float32 (on CUDA too)",
    )
    p.flag(
        "--cuda-graphs",
        default=True,
        type=bool,
        help="replay decode steps from CUDA graphs on cuda devices (captured per batch/context bucket on first use)",
    )
    p.flag("--cuda-graph-max-batch", default=256, type=int, help="largest decode batch replayed from a CUDA graph")
    p.flag(
        "--cuda-graph-warmup",
        default=True,
        type=bool,
        help="capture every batch bucket's graph (at the smallest context bucket) at start, not on first use",
    )
    p.flag("--torch-threads", default=1, type=int, help="torch intra-op threads on CPU")
    p.flag(
        "--torch-bind-cpus",
        default="none",
        help="cores the torch threads are bound to, one each (e.g. 0-1: exactly --torch-threads distinct cores, "
        "else refused), the gRPC threads left unbound. "
        "auto: on a CPU device, bind when --torch-threads equals the cores this process may use; none: never "
        "(default: binding showed no clear gain on a shared 2-core machine)",
    )
    p.flag(
        "--cpu-compiled-ops",
        default=False,
        type=bool,
        help="on a CPU, the Llama layers' element-wise ops (residual add + RMSNorm, rotary, SiLU-mul) of prefill "
        "steps (>= 256 tokens) compiled by torch.compile into fused kernels at start (needs a C++ compiler: c++, "
        "g++ or $CXX)",
    )
    p.flag(
        "--cpu-decode-attention",
        default="auto",
        choices=list(paged_attention_cpu.MODES),
        help="decode attention of the Llama model on a CPU. sdpa: each decode row's K/V copied out of the pool "
        "(index_select), then torch's SDPA; auto: paged where the kernel can be built (a C++ compiler, an AVX2 "
        "CPU), else sdpa (logged); paged: pdlb's C++ kernel (AVX2/FMA, on torch's OpenMP threads) that "
        "reads K/V in place through the slot table, built at start into ~/.cache/pdlb/kernels (needs a C++ "
        "compiler: c++, g++ or $CXX; ~5 s once, then cached). Prefill chunks take SDPA either way. The "
        "tiny-random model has its own attention: it never takes the kernel (auto logs it; paged is refused)",
    )
    p.flag(
        "--cpu-decode-ops",
        default="auto",
        choices=list(decode_ops_cpu.MODES),
        help="element-wise ops (residual add + RMSNorm, rotary + the K/V write into the pool, SiLU-mul) of "
        "the Llama model's float32 decode steps on a CPU. eager: one torch op each; auto: fused where they "
        "can be built (a C++ compiler, an AVX2 CPU), else eager (logged); fused: pdlb's C++ kernels, three "
        "calls per layer on torch's OpenMP threads, built at start into the paged kernel's cache (needs a "
        "C++ compiler; ~3 s once). Prefill steps (--cpu-prefill-ops), other dtypes and tiny-random stay "
        "eager. Default auto: with the fused prefill ops, 1.01-1.04x vLLM's tokens/s end to end on SmolLM2 "
        "(docs/BENCHMARKS.md)",
    )
    p.flag(
        "--cpu-prefill-ops",
        default="auto",
        choices=list(decode_ops_cpu.MODES),
        help="the same fused C++ kernels as --cpu-decode-ops (same choices and needs) for the float32 steps "
        "that carry a prompt chunk (prefill and mixed steps), where eager torch makes a pass over every "
        "prompt token per op. Default auto: ~9%% off a 2,048-token SmolLM2 prefill step in process "
        "(docs/BENCHMARKS.md)",
    )
    p.flag("--model-path", default="", help=f"{TINY}: safetensors file with weights of the configured shape")
    p.flag("--vocab-size", default=320, type=int, help=f"{TINY}: vocabulary (>= 257: bytes and EOS)")
    p.flag("--hidden-size", default=64, type=int, help=f"{TINY}: width")
    p.flag("--num-layers", default=2, type=int, help=f"{TINY}: transformer layers")
    p.flag("--num-heads", default=4, type=int, help=f"{TINY}: attention heads")
    p.flag("--max-position", default=4096, type=int, help="longest sequence (prompt + output); capped by the model's")
    p.flag("--seed", default=0, type=int, help=f"{TINY}: seed of the random weights (when no --model-path)")
    p.flag(
        "--dp-group-size",
        default=1,
        type=int,
        help="ranks per lockstep DP-attention group (1: this worker steps independently). Ranks "
        "dp_rank // size * size .. +size-1 form one group; start and stop a group as a whole",
    )
    p.flag(
        "--dp-group-address",
        default="",
        help="host:port where the group meets (served by its first rank; the same on every rank of the group)",
    )
    p.flag("--dp-group-backend", default="auto", choices=["auto", "gloo", "nccl"], help="auto: nccl on cuda, else gloo")
    p.flag(
        "--dp-group-timeout",
        default=30.0,
        type=float,
        help="seconds a group collective (or forming the group) may wait for the other ranks; past it the group ends",
    )
    return p


def model_config(args) -> ModelConfig:
    return ModelConfig(
        vocab_size=args.vocab_size,
        hidden_size=args.hidden_size,
        num_layers=args.num_layers,
        num_heads=args.num_heads,
        max_position=args.max_position,
        seed=args.seed,
    )


def build_runner(args, source: ModelSource, tokenizer: Tokenizer) -> Runner:
    """The runner for --runner/--model; raises UnsupportedModel naming what cannot be served."""
    if source.kind == "tiny":
        config = model_config(args)
    else:
        config = dataclasses.replace(source.config(), max_position=min(source.config().max_position, args.max_position))
    if args.runner == "sim":
        return SimRunner(config, args.max_total_tokens, CostModel().scaled(args.sim_slowdown))
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit("--device cuda asked but torch sees no CUDA device")
    dtype = dtypes.resolve(args.dtype, args.device)
    if dtypes.emulated_on(dtype, args.device):
        log.warning(
            "--dtype %s: this CPU has no native bfloat16 (AVX512-BF16 or AMX), so torch emulates it and "
            "GEMMs run several times slower than float32 (--dtype auto picks float32 here)",
            args.dtype,
        )
    log.info("model dtype %s (--dtype %s) on %s", str(dtype).removeprefix("torch."), args.dtype, args.device)
    if source.kind == "tiny":
        model = TinyTransformer.random(config)
        if args.model_path:
            from safetensors.torch import load_file

            model.load_state_dict(load_file(args.model_path), strict=True)
    else:
        cache = Path(args.weights_cache_dir) if args.weights_cache_dir else None
        model = LlamaModel(config)
        model.load_weights(source.state_dict(cache, int(args.weights_cache_gb * (1 << 30))))
    started = time.perf_counter()
    runner = TorchRunner(
        model,
        args.max_total_tokens,
        args.device,
        dtype,
        tokenizer.eos_token_id,
        decode_graphs=None if args.cuda_graphs else False,
        graph_max_batch=args.cuda_graph_max_batch,
        compiled_ops=args.cpu_compiled_ops,
        paged_attention=_paged_kernel(args, config) if source.kind != "tiny" else False,
        decode_ops=_element_ops(args, dtype, "decode") if source.kind != "tiny" else False,
        prefill_ops=_element_ops(args, dtype, "prefill") if source.kind != "tiny" else False,
    )
    if runner.compiled_ops:
        log.info("element-wise ops compiled (torch.compile); runner ready in %.1f s", time.perf_counter() - started)
    if runner.paged_attention:
        log.info("decode attention: paged kernel %s", runner.model.decode_attention.library)
    if source.kind != "tiny" and args.device == "cpu":  # either way, so a log shows which ran
        for steps, ops in (("decode", runner.model.decode_ops), ("prefill", runner.model.prefill_ops)):
            log.info("%s element-wise ops: %s", steps, f"fused kernels {ops.library}" if ops else "eager torch ops")
    if source.kind == "tiny" and args.device == "cpu":
        log.info(
            "tiny-random has its own attention and ops: decode attention through SDPA and eager element-wise ops "
            "(--cpu-decode-attention, --cpu-decode-ops and --cpu-prefill-ops apply to Llama-family models)"
        )
    if runner.graphs is not None and runner.graphs.capture and args.cuda_graph_warmup:
        started = time.perf_counter()
        count = runner.graphs.warmup()
        log.info("captured %d decode CUDA graphs in %.1f s", count, time.perf_counter() - started)
    return runner


def _paged_kernel(args, config) -> paged_attention_cpu.PagedDecodeAttention | None:
    """The paged decode attention kernel per --cpu-decode-attention for a Llama model on a CPU, or None
    (logged, when auto falls back to SDPA). Raises paged_attention_cpu.Unavailable for an explicit paged."""
    if args.device != "cpu":
        return None
    kernel, why = paged_attention_cpu.for_model(
        args.cpu_decode_attention, config.num_heads, config.num_kv_heads, config.head_dim
    )
    if kernel is None and args.cpu_decode_attention == "auto":
        log.warning("--cpu-decode-attention auto: decode attention through SDPA: %s", why)
    return kernel


def _element_ops(args, dtype: torch.dtype, steps: str) -> decode_ops_cpu.DecodeOps | None:
    """The fused element-wise ops of `steps` ("decode" or "prefill") per --cpu-decode-ops or
    --cpu-prefill-ops for a Llama model on a CPU, or None (logged, when auto falls back to eager).
    Raises decode_ops_cpu.Unavailable for an explicit fused."""
    mode = args.cpu_decode_ops if steps == "decode" else args.cpu_prefill_ops
    if args.device != "cpu":
        return None
    if dtype != torch.float32:
        if mode == "fused":
            log.warning(
                "--cpu-%s-ops fused: the kernels take float32 only; %s %s steps stay eager", steps, dtype, steps
            )
        return None
    ops, why = decode_ops_cpu.for_model(mode)
    if ops is None and mode == "auto":
        log.warning("--cpu-%s-ops auto: eager element-wise ops in %s steps: %s", steps, steps, why)
    return ops


def refuse_cpu_options_that_cannot_run(args) -> None:
    """FlagRefused, before any model loads, for the CPU options that need what this machine lacks: a C++
    compiler (--cpu-compiled-ops for torch.compile, --cpu-decode-attention paged for pdlb's kernel),
    or for the kernel an AVX2/FMA CPU."""
    if args.engine != "pdlb" or args.runner != "torch":
        return
    if args.cpu_compiled_ops and not cxx_build.available():
        raise FlagRefused(cxx_build.missing_compiler_message("--cpu-compiled-ops", "torch.compile"))
    if args.cpu_decode_attention == "paged" and args.device == "cpu":
        if not cxx_build.available():
            raise FlagRefused(
                cxx_build.missing_compiler_message("--cpu-decode-attention paged", paged_attention_cpu.WHAT)
            )
        reason = paged_attention_cpu.unavailable_reason()
        if reason is not None:
            raise FlagRefused(f"--cpu-decode-attention paged: {reason}")
        if args.model == TINY:
            raise FlagRefused(
                "--cpu-decode-attention paged: tiny-random has its own attention and never takes the kernel "
                "(it serves Llama-family models); use auto or sdpa"
            )
    for flag, mode in (("--cpu-decode-ops", args.cpu_decode_ops), ("--cpu-prefill-ops", args.cpu_prefill_ops)):
        if mode != "fused" or args.device != "cpu":
            continue
        if not cxx_build.available():
            raise FlagRefused(cxx_build.missing_compiler_message(f"{flag} fused", decode_ops_cpu.WHAT))
        reason = decode_ops_cpu.unavailable_reason()
        if reason is not None:
            raise FlagRefused(f"{flag} fused: {reason}")
        if args.model == TINY:
            raise FlagRefused(
                f"{flag} fused: tiny-random has its own layers and never takes the kernels "
                "(they serve Llama-family models); use auto or eager"
            )


async def serve(args, stop_event: asyncio.Event) -> None:
    role = role_of_mode(args.disaggregation_mode)
    if args.dp_rank < 0:
        raise FlagRefused("--dp-rank must be >= 0")
    chunk, burst_window_s = step_limits(args)
    limits = EngineLimits(
        args.max_total_tokens,
        args.max_running_requests,
        chunk,
        args.max_waiting_requests,
        args.max_prompt_tokens,
        burst_window_s,
    )
    if args.page_size < 1:
        raise FlagRefused("--page-size must be >= 1")
    page_size = args.page_size if args.prefix_cache else 0
    try:  # seeded by the rank, so a rank's random order is reproducible and ranks differ
        eviction = eviction_order(args.prefix_eviction, seed=args.dp_rank)
    except ValueError as exc:
        raise FlagRefused(f"--prefix-eviction: {exc}") from None
    # Torch computes on the runner thread only (loading included); this thread's small ops (KV
    # hand-off copies) stay single-threaded so that no second OpenMP team competes for the cores.
    torch.set_num_threads(1)
    try:
        bind = cpus_to_bind(args.torch_bind_cpus, args.torch_threads, args.device)
    except ValueError as exc:
        raise FlagRefused(str(exc)) from None
    refuse_cpu_options_that_cannot_run(args)
    compute = compute_thread(args.torch_threads, bind)
    try:
        source = resolve(args.model, args.served_model_name)
        tokenizer = source.tokenizer()
        runner = compute.submit(build_runner, args, source, tokenizer).result() if args.engine == "pdlb" else None
    except UnsupportedModel as exc:
        compute.shutdown()
        raise SystemExit(f"cannot serve --model {args.model}: {exc}") from None
    except paged_attention_cpu.Unavailable as exc:  # decode_ops_cpu.Unavailable is a subclass
        compute.shutdown()
        if isinstance(exc, decode_ops_cpu.Unavailable):
            flag = "--cpu-decode-ops fused" if args.cpu_decode_ops == "fused" else "--cpu-prefill-ops fused"
        else:
            flag = "--cpu-decode-attention paged"
        raise FlagRefused(f"{flag}: {exc}") from None
    if args.engine == "vllm":
        _check_vllm_args(args, role)
    group = _group(args, role, runner, limits) if args.dp_group_size > 1 else None
    if args.engine == "vllm":
        engine: Engine = await open_vllm_engine(args, limits, tokenizer)
    elif group is not None:
        print(
            f"pdlb-scheduler rank {args.dp_rank}: joining DP group {group.spec.group_id} "
            f"as group rank {group.spec.rank} of {group.spec.size}",
            flush=True,
        )
        try:
            await asyncio.get_running_loop().run_in_executor(compute, group.join)
        except GroupBroken as exc:
            compute.shutdown()
            raise SystemExit(str(exc)) from None
        engine = LockstepEngine(
            runner,
            limits,
            kv_hold_ttl_s=args.kv_hold_ttl,
            page_size=page_size,
            executor=compute,
            group=group,
            eviction=eviction,
        )
    else:
        engine = BatchingEngine(
            runner, limits, kv_hold_ttl_s=args.kv_hold_ttl, page_size=page_size, executor=compute, eviction=eviction
        )
    worker_id = args.worker_id or f"{role}-{args.dp_rank}-{uuid.uuid4().hex[:8]}"
    host = ServiceHost(args.host, args.port, [scheduler_pb2.DESCRIPTOR.services_by_name["Scheduler"].full_name])
    address = advertised(args.host, host.port, args.advertise_address)
    worker = common_pb2.WorkerInfo(
        worker_id=worker_id, role=role_to_proto(role), dp_rank=args.dp_rank, address=address, model=source.model_id
    )
    acks = DispatchAcks()
    bootstrap = BootstrapLocator(args.bootstrap, args.etcd, args.etcd_prefix) if role != "mixed" else None
    servicer = SchedulerServicer(engine, worker, role, acks, bootstrap, tokenizer, args.kv_wait_timeout)
    scheduler_pb2_grpc.add_SchedulerServicer_to_server(servicer, host.server)
    lockstep = engine if isinstance(engine, LockstepEngine) else None
    reporter = LoadReporter(
        worker,
        uuid.uuid4().hex,
        engine.load,
        acks.get,
        args.report_interval_ms / 1000,
        group_state=lockstep.group_state if lockstep else None,
        on_start_wave=(lambda start: lockstep.start_wave(start.wave, start.group_id)) if lockstep else None,
        kv_events=engine.kv_events if args.kv_events else None,
    )
    if lockstep:
        lockstep.on_end.append(lambda reason: stop_event.set())  # a broken group: drain, deregister, exit
    engine.listeners.append(reporter.changed)
    registration = (
        LeasedRegistration(
            args.etcd,
            workers_prefix(args.etcd_prefix, role) + worker_id,
            {
                "worker_id": worker_id,
                "role": role,
                "dp_rank": args.dp_rank,
                "address": address,
                "model": source.model_id,
            },
            args.lease_ttl,
        )
        if args.etcd
        else None
    )

    if registration and isinstance(engine, VLLMEngine):
        registration = HealthGatedRegistration(registration, engine, tokenizer)

    backend = args.runner if args.engine == "pdlb" else f"vLLM {args.vllm_url}"

    async def start() -> None:
        engine.start()
        await host.start()
        if bootstrap:
            await bootstrap.start()
            if role == "prefill":
                await _announce_endpoint(bootstrap, worker)
        for target in csv_list(args.dispatchers):
            reporter.add(target)
        if args.etcd:
            reporter.watch(args.etcd, args.etcd_prefix, role)
        if registration:
            await registration.start()
        if args.metrics_port:
            bound = serve_metrics(engine, args.metrics_port, args.host)
            print(f"pdlb-scheduler metrics on :{bound}/metrics", flush=True)
        print(
            f"pdlb-scheduler {worker_id} ({role}, rank {args.dp_rank}, {backend}, model {source.model_id}) "
            f"listening on {address}",
            flush=True,
        )

    async def stop() -> None:
        if registration:
            await registration.close()  # deregister first: dispatchers stop routing here
        await engine.drain(args.shutdown_grace)
        await reporter.close()
        await host.stop(1.0)
        await engine.close()
        await servicer.close()
        if bootstrap:
            await bootstrap.close()

    await run_until_signal(start, stop, stop_event)
    if lockstep and lockstep.ended:
        raise SystemExit(f"{worker_id}: {lockstep.ended}")


def _check_vllm_args(args, role: str) -> None:
    if not args.vllm_url:
        raise FlagRefused("--engine vllm needs --vllm-url (the vLLM server's base URL)")
    if role != "mixed" and not args.vllm_kv_connector:
        raise FlagRefused(
            f"--engine vllm as a {role} worker needs --vllm-kv-connector: vLLM moves PD's KV "
            "through the KV connector its servers were started with (--kv-transfer-config), e.g. ExampleConnector"
        )
    if role == "mixed" and args.vllm_kv_connector:
        raise FlagRefused("--vllm-kv-connector is for prefill and decode workers (--disaggregation-mode)")
    if args.dp_group_size > 1:
        raise FlagRefused("--engine vllm: vLLM runs its own DP waves; --dp-group-size must be 1")
    if args.metrics_port:
        raise FlagRefused("--engine vllm: the vLLM server serves /metrics itself; leave --metrics-port at 0")
    if args.vllm_server_ranks < 1:
        raise FlagRefused("--vllm-server-ranks must be >= 1")
    if args.prefix_eviction != DEFAULT_EVICTION:
        raise FlagRefused(
            f"--engine vllm: the vLLM server evicts its prefix cache least recently used itself; "
            f"--prefix-eviction {args.prefix_eviction} is for pdlb's engines, leave it at {DEFAULT_EVICTION}"
        )


def _group(args, role: str, runner: Runner, limits: EngineLimits) -> DPGroup:
    size = args.dp_group_size
    if not args.dp_group_address:
        raise FlagRefused(
            "--dp-group-size > 1 needs --dp-group-address host:port (the same on every rank of the group)"
        )
    backend = args.dp_group_backend
    if backend == "auto":
        backend = "nccl" if args.device.startswith("cuda") and args.runner == "torch" else "gloo"
    on_gpu = backend == "nccl"
    spec = GroupSpec(
        size=size,
        rank=args.dp_rank % size,
        address=args.dp_group_address,
        backend=backend,
        timeout_s=args.dp_group_timeout,
        group_id=f"{role}@{args.dp_group_address}",
    )
    return DPGroup(
        spec,
        hidden_size=runner.config.hidden_size,
        max_step_tokens=limits.chunked_prefill_size + limits.max_running_requests,
        device=args.device if on_gpu else "cpu",
        dtype=dtypes.resolve(args.dtype, args.device) if on_gpu else torch.float32,
    )


async def _announce_endpoint(bootstrap: BootstrapLocator, worker: common_pb2.WorkerInfo) -> None:
    stub = bootstrap.stub()
    if stub is None:
        return
    endpoint = bootstrap_pb2.PrefillEndpoint(worker_id=worker.worker_id, dp_rank=worker.dp_rank, address=worker.address)
    try:
        await stub.RegisterPrefillEndpoint(bootstrap_pb2.RegisterPrefillEndpointRequest(endpoint=endpoint), timeout=5)
    except Exception as exc:  # the endpoint list is informational; rooms carry the address too
        log.warning("could not announce the KV endpoint to bootstrap: %s", exc)


def main(argv: list[str] | None = None) -> None:
    run_service(build_parser, serve, argv)


if __name__ == "__main__":
    main()
