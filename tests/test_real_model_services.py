"""The packaged SmolLM2 served for real: a chat question answered through the whole PD path, and
dispatchers that refuse workers of another model."""

from __future__ import annotations

from pathlib import Path

import grpc
import pytest

from pdlb.client import PDLBClient
from pdlb.common.free_port import free_port
from pdlb.engines.torch import paged_attention_cpu
from pdlb.v1 import common_pb2, scheduler_pb2, scheduler_pb2_grpc
from tests.helpers import dispatch_stub, generate, live_workers, request, wait_for_workers, wait_until

SMOLLM2 = ["--model", "smollm2-135m-instruct"]


def chat(rid: str, question: str, max_new_tokens: int = 24) -> common_pb2.InferenceRequest:
    return common_pb2.InferenceRequest(
        request_id=rid,
        messages=[common_pb2.ChatMessage(role="user", content=question)],
        sampling=common_pb2.SamplingParams(max_new_tokens=max_new_tokens, temperature=0.0),
    )


PAGED_KERNEL_MISSING = paged_attention_cpu.unavailable_reason()


def maps_library(pid: int, stem: str) -> bool:
    """Whether process `pid` has a kernel library of `stem` (paged_attention_cpu, decode_ops_cpu) mapped."""
    return f"{stem}-" in Path(f"/proc/{pid}/maps").read_text()


@pytest.mark.slow
@pytest.mark.parametrize(
    "attention",
    [
        "sdpa",
        pytest.param(
            "paged",
            marks=pytest.mark.skipif(PAGED_KERNEL_MISSING is not None, reason=f"paged kernel: {PAGED_KERNEL_MISSING}"),
        ),
    ],
)
async def test_smollm2_answers_through_the_whole_pd_path(start_service, etcd, prefix, attention):
    """Both workers' decode attention as --cpu-decode-attention says and their decode element-wise
    ops as --cpu-decode-ops and --cpu-prefill-ops say (sdpa with eager ops; paged with the fused ops:
    both kernels' libraries are loaded in the worker processes)."""
    common = ["--etcd", etcd.endpoint, "--etcd-prefix", prefix]
    start_service("bootstrap", *common)
    prefill = start_service("dispatcher", *common, *SMOLLM2, "--disaggregation-mode", "prefill", name="d-prefill")
    decode = start_service("dispatcher", *common, *SMOLLM2, "--disaggregation-mode", "decode", name="d-decode")
    workers = [
        start_service(
            "scheduler",
            *common,
            *SMOLLM2,
            "--disaggregation-mode",
            mode,
            "--torch-threads",
            "2",
            "--cpu-decode-attention",
            attention,
            "--cpu-decode-ops",
            "fused" if attention == "paged" else "eager",
            "--cpu-prefill-ops",
            "fused" if attention == "paged" else "eager",
            name=mode,
        )
        for mode in ("prefill", "decode")
    ]
    for proc in workers:
        assert maps_library(proc.proc.pid, "paged_attention_cpu") == (attention == "paged"), proc.name
        assert maps_library(proc.proc.pid, "decode_ops_cpu") == (attention == "paged"), proc.name
    for proc in (prefill, decode):
        channel, stub = dispatch_stub(proc.address)
        async with channel:
            listed = await wait_for_workers(stub, 1)
            assert listed[0].model == "smollm2-135m-instruct"
    client = PDLBClient(prefill=prefill.address, decode=decode.address)
    try:
        chunks = [c async for c in client.generate(chat("paris", "What is the capital of France?"), timeout=120)]
        text = "".join(c.text for c in chunks)
        assert "Paris" in text, text
        assert chunks[-1].finish_reason == common_pb2.FINISH_REASON_STOP  # the model ended its answer (EOS)
        assert chunks[-1].prompt_tokens > 20  # the chat template (system prompt) was applied
        # plain text is tokenised by the dispatchers with the model's BPE (far fewer tokens than bytes)
        req = request("text", "The capital of Italy is", max_new_tokens=4)
        got = [c async for c in client.generate(req, timeout=120)]
        assert got[-1].prompt_tokens == 5
    finally:
        await client.close()
    # the decode worker freed the pulled KV; the prefill worker's hold is gone too
    for proc in workers:
        async with grpc.aio.insecure_channel(proc.address) as channel:
            stub = scheduler_pb2_grpc.SchedulerStub(channel)

            async def idle(stub=stub) -> bool:
                load = (await stub.GetLoad(scheduler_pb2.GetLoadRequest(), timeout=5)).load
                return load.running_requests == 0 and load.kv_tokens_used == load.kv_tokens_evictable

            await wait_until(idle, 20, "workers idle with only cache blocks in use")


async def test_dispatcher_refuses_workers_of_another_model(start_service, etcd, prefix):
    common = ["--etcd", etcd.endpoint, "--etcd-prefix", prefix, "--runner", "sim"]
    dispatcher = start_service(
        "dispatcher", "--etcd", etcd.endpoint, "--etcd-prefix", prefix, "--served-model-name", "alpha"
    )
    start_service("scheduler", *common, "--served-model-name", "alpha", "--dp-rank", "0", name="alpha-0")
    start_service("scheduler", *common, "--served-model-name", "beta", "--dp-rank", "1", name="beta-1")
    channel, stub = dispatch_stub(dispatcher.address)
    async with channel:
        listed = await wait_for_workers(stub, 1)
        assert [(w.dp_rank, w.model) for w in listed] == [(0, "alpha")]
        log = dispatcher.log_path
        await wait_until(lambda: "serves model 'beta'" in log.read_text(), 10, "the refusal in the dispatcher's log")
        assert "this mixed dispatcher routes model 'alpha'" in log.read_text()
        chunks = await generate(stub, request("r", "hello", max_new_tokens=3))
        assert chunks[-1].dp_rank == 0
        assert len(await live_workers(stub)) == 1


async def test_static_dispatcher_drops_a_listed_worker_that_serves_another_model(start_service):
    port = free_port()
    dispatcher = start_service("dispatcher", "--workers", f"0@127.0.0.1:{port}", "--served-model-name", "a")
    worker = start_service(
        "scheduler",
        "--runner",
        "sim",
        "--port",
        str(port),
        "--dispatchers",
        dispatcher.address,
        "--served-model-name",
        "b",
    )
    channel, stub = dispatch_stub(dispatcher.address)
    async with channel:
        await wait_for_workers(stub, 0)
        with pytest.raises(grpc.aio.AioRpcError) as failed:
            await generate(stub, request("r", "hello"))
        assert failed.value.code() == grpc.StatusCode.UNAVAILABLE
    await wait_until(lambda: "refuses this worker" in worker.log_path.read_text(), 10, "the refusal in the worker log")
    assert "serves model 'b'" in worker.log_path.read_text()
