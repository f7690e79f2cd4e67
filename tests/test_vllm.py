"""pdlb in front of real vLLM servers (CPU build, SmolLM2): rank addressing, aborts, load reports,
sampling parameters and logprobs, `pdlb up --engine vllm` (mixed on attached servers, PD on its
own prefill and decode servers through vLLM's ExampleConnector), a killed server's streams resumed
elsewhere, a restarted server re-added, tokenizer refusal.

One module-wide pair of servers (vLLM starts in minutes on a CPU): server A holds DP ranks 0 and 1
(`--data-parallel-size 2`, addressed with X-data-parallel-rank), server B holds rank 2 alone. They
need vLLM's virtualenv (`make install-vllm`; found via VLLM_VENV or .vllm-venv); without it the
module is skipped, saying so. Select with `-m vllm`.
"""

from __future__ import annotations

import asyncio
import signal
import urllib.request

import grpc
import pytest

from pdlb.common.free_port import free_port
from pdlb.engines.vllm.rank_metrics import parse_rank
from pdlb.engines.vllm.server import VLLMServer, VLLMServerSpec, find_venv, http_json, missing_reason
from pdlb.v1 import common_pb2, dispatch_pb2, gateway_pb2, gateway_pb2_grpc, scheduler_pb2, scheduler_pb2_grpc
from tests.helpers import dispatch_stub, load_snapshot, wait_for_workers, wait_until

pytestmark = [
    pytest.mark.vllm,
    pytest.mark.timeout(1200),
    pytest.mark.skipif(find_venv() is None, reason=missing_reason()),
]

MODEL = "smollm2-135m-instruct"
REAL_MODEL_ENV = {
    "PDLB_SCHEDULER_MODEL": MODEL,
    "PDLB_DISPATCHER_MODEL": MODEL,
    "PDLB_GATEWAY_MODEL": MODEL,
}


@pytest.fixture(scope="module")
def servers(tmp_path_factory):
    """Server A (ranks 0, 1) and server B (rank 2); stopped after the module."""
    venv, logs = find_venv(), tmp_path_factory.mktemp("vllm")
    a = VLLMServer(
        VLLMServerSpec(venv=venv, dp_size=2, cpus="0|1", dtype="float32", enforce_eager=True),
        logs / "a.log",
    )
    b = VLLMServer(
        VLLMServerSpec(venv=venv, dp_size=1, cpus="1", dtype="float32", enforce_eager=True),
        logs / "b.log",
    )
    try:
        # one after the other: vLLM gives its DP coordinator 120 s to start, which two servers
        # importing torch side by side on a busy 2-core machine can exceed
        for server in (a, b):
            server.spawn().wait_ready()
        yield {"a": a, "b": b}
    finally:
        for server in (a, b):
            server.stop()


def rank_of(servers, rank: int) -> tuple[str, str]:
    """(server URL, engine label) of global DP rank 0..2."""
    return (servers["a"].url, str(rank)) if rank < 2 else (servers["b"].url, "0")


def vllm_series(url: str, engine: str):
    with urllib.request.urlopen(f"{url}/metrics", timeout=10) as reply:
        return parse_rank(reply.read().decode(), engine)


def finished(url: str, engine: str, reason: str) -> int:
    """vLLM's count of requests finished for `reason` ("length", "stop", "abort") on one engine."""
    from prometheus_client.parser import text_string_to_metric_families

    with urllib.request.urlopen(f"{url}/metrics", timeout=10) as reply:
        text = reply.read().decode()
    total = 0.0
    for family in text_string_to_metric_families(text):
        if family.name == "vllm:request_success":
            for sample in family.samples:
                if sample.labels.get("engine") == engine and sample.labels.get("finished_reason") == reason:
                    total += sample.value
    return int(total)


def worker_flags(servers, rank: int) -> list[str]:
    url = servers["a"].url if rank < 2 else servers["b"].url
    return ["--engine", "vllm", "--vllm-url", url, "--vllm-server-ranks", "2" if rank < 2 else "1"]


@pytest.fixture
def cluster(servers, etcd, prefix, start_service):
    """A mixed dispatcher (round robin), a worker per vLLM rank, and a gateway."""
    common = ["--etcd", etcd.endpoint, "--etcd-prefix", prefix]
    dispatcher = start_service(
        "dispatcher", *common, "--load-balance-method", "round_robin", name="dispatcher", env=REAL_MODEL_ENV
    )
    workers = [
        start_service(
            "scheduler",
            *common,
            "--dp-rank",
            str(rank),
            "--report-interval-ms",
            "50",
            *worker_flags(servers, rank),
            name=f"vllm-worker-{rank}",
            env=REAL_MODEL_ENV,
            wait=False,
        )
        for rank in range(3)
    ]
    for worker in workers:
        worker.wait_ready(120)
    gateway = start_service("gateway", *common, "--http-port", str(free_port()), name="gateway", env=REAL_MODEL_ENV)
    return dispatcher, workers, gateway


def prompt(i: int, length: int = 24) -> list[int]:
    return [(97 * i + 13 * j) % 40000 + 100 for j in range(length)]


async def through_gateway(
    stub, rid: str, ids: list[int], max_new: int, started: asyncio.Event | None = None, on_rank: int = -1
):
    """(tokens, ranks that streamed them, retries) of one greedy request through the gateway;
    `started` is set once tokens arrive from rank `on_rank`."""
    request = common_pb2.InferenceRequest(
        request_id=rid,
        input_ids=ids,
        sampling=common_pb2.SamplingParams(temperature=0.0, max_new_tokens=max_new, ignore_eos=True),
    )
    tokens, ranks, retries = [], [], 0
    async for chunk in stub.Generate(gateway_pb2.GatewayGenerateRequest(request=request), timeout=300):
        tokens += chunk.token_ids
        ranks.append(chunk.decode_dp_rank)
        retries = max(retries, chunk.retries)
        if started is not None and chunk.token_ids and chunk.decode_dp_rank == on_rank:
            started.set()
    return tokens, ranks, retries


async def test_requests_land_on_the_rank_the_dispatcher_chose(servers, cluster):
    """Every rank's vLLM engine counts exactly the requests the gateway reports it ran there,
    X-data-parallel-rank addressing (server A) and a server per rank (server B) alike."""
    dispatcher, _, gateway = cluster
    channel, dstub = dispatch_stub(dispatcher.address)
    async with channel, grpc.aio.insecure_channel(gateway.address) as gch:
        await wait_for_workers(dstub, 3, timeout=60)
        before = {r: finished(*rank_of(servers, r), "length") for r in range(3)}
        stub = gateway_pb2_grpc.GatewayStub(gch)
        results = await asyncio.gather(*(through_gateway(stub, f"land-{i}", prompt(i), 4) for i in range(9)))
    assert all(len(tokens) == 4 for tokens, _, _ in results)
    chosen = [ranks[-1] for _, ranks, _ in results]
    assert sorted(set(chosen)) == [0, 1, 2], f"round robin over 3 ranks used {chosen}"
    for r in range(3):
        await wait_until(
            lambda r=r: finished(*rank_of(servers, r), "length") - before[r] == chosen.count(r),
            30,
            f"vLLM engine of rank {r} to count {chosen.count(r)} finished requests",
        )


async def test_abort_closes_the_stream_and_vllm_frees_the_request(servers, cluster):
    """A client that goes away mid-stream: the worker closes its vLLM stream, and vLLM stops the
    request long before its 1500 tokens: that engine's running gauge and KV use return to 0 and no
    request finishes (vLLM 0.32 does not count client aborts in request_success_total)."""
    dispatcher, _, _ = cluster
    url, engine = rank_of(servers, 1)
    channel, stub = dispatch_stub(dispatcher.address)
    async with channel:
        await wait_for_workers(stub, 3, timeout=60)
        finished_before = sum(finished(url, engine, reason) for reason in ("length", "stop", "abort"))
        request = common_pb2.InferenceRequest(
            request_id="abort-me",
            input_ids=prompt(3),
            decode_dp_rank=1,
            sampling=common_pb2.SamplingParams(temperature=0.0, max_new_tokens=1500, ignore_eos=True),
        )
        call = stub.Generate(dispatch_pb2.GenerateRequest(request=request), timeout=300)
        first = await call.read()
        assert first.dp_rank == 1 and first.token_ids
        await wait_until(lambda: vllm_series(url, engine).running == 1, 60, "vLLM to show the request running")
        assert vllm_series(url, engine).kv_usage > 0
        call.cancel()
        await wait_until(lambda: vllm_series(url, engine).running == 0, 60, "vLLM to free the request")
        await wait_until(lambda: vllm_series(url, engine).kv_usage == 0, 30, "vLLM to release its KV blocks")
        generated = vllm_series(url, engine).generated_tokens  # the counter moves only at a request's end
        assert generated < 1500
        assert sum(finished(url, engine, reason) for reason in ("length", "stop", "abort")) == finished_before


async def test_load_reports_follow_vllms_queue_under_a_burst(servers, cluster):
    """A burst pinned to rank 0: the dispatcher's reported load shows every request in flight at
    once (exact, not vLLM's per-step gauges), at least vLLM's own count, and drains to 0; a repeated
    prompt's prefix-cache hits arrive from vLLM's counters."""
    dispatcher, _, _ = cluster
    url, engine = rank_of(servers, 0)
    channel, stub = dispatch_stub(dispatcher.address)

    async def reported():
        snapshot = await load_snapshot(stub)
        return next(w.reported for w in snapshot.workers if w.worker.dp_rank == 0)

    async with channel:
        await wait_for_workers(stub, 3, timeout=60)
        burst = 12
        requests = [
            common_pb2.InferenceRequest(
                request_id=f"burst-{i}",
                input_ids=prompt(100 + i, 64),
                decode_dp_rank=0,
                sampling=common_pb2.SamplingParams(temperature=0.0, max_new_tokens=48, ignore_eos=True),
            )
            for i in range(burst)
        ]
        calls = [
            asyncio.create_task(_drain(stub.Generate(dispatch_pb2.GenerateRequest(request=r), timeout=300)))
            for r in requests
        ]

        async def all_in_flight() -> bool:
            load = await reported()
            return load.running_requests + load.waiting_requests == burst

        await wait_until(all_in_flight, 30, f"rank 0 to report {burst} requests in flight")
        seen_by_vllm = 0

        async def vllm_counts_them() -> bool:
            nonlocal seen_by_vllm
            series = await asyncio.to_thread(vllm_series, url, engine)
            seen_by_vllm = series.running + series.waiting
            load = await reported()
            assert load.running_requests + load.waiting_requests >= seen_by_vllm
            return seen_by_vllm > 0

        await wait_until(vllm_counts_them, 60, "vLLM's gauges to show the burst")
        await asyncio.gather(*calls)

        async def drained() -> bool:
            load = await reported()
            return load.running_requests + load.waiting_requests == 0

        await wait_until(drained, 30, "rank 0's reported load to drain")
        long = common_pb2.InferenceRequest(
            request_id="cached-1",
            input_ids=prompt(999, 272),
            decode_dp_rank=0,
            sampling=common_pb2.SamplingParams(temperature=0.0, max_new_tokens=2, ignore_eos=True),
        )
        await _drain(stub.Generate(dispatch_pb2.GenerateRequest(request=long), timeout=300))
        hits = (await reported()).cache_hit_tokens
        long.request_id = "cached-2"
        await _drain(stub.Generate(dispatch_pb2.GenerateRequest(request=long), timeout=300))

        async def hit_reported() -> bool:
            # vLLM's CPU KV blocks hold 128 tokens: the 272-token prompt's first 256 are cached
            return (await reported()).cache_hit_tokens >= hits + 256

        await wait_until(hit_reported, 30, "the repeated prompt's prefix-cache hits in rank 0's load")


async def _drain(call) -> list:
    return [chunk async for chunk in call]


async def test_sampling_parameters_and_logprobs_are_vllms(servers, cluster):
    """The request's sampling parameters are vLLM's to apply: top_k 1 at temperature 1 gives the
    greedy tokens, a logit bias of +100 on one token makes every draw that token; logprobs come
    back per token as vLLM's own answer to the same request sent to it directly (the drawn token's
    logprob and the n most likely, most likely first)."""
    dispatcher, _, _ = cluster
    channel, dstub = dispatch_stub(dispatcher.address)
    ids = prompt(300, 32)

    async def chunks(rid: str, **sampling) -> list:
        request = common_pb2.InferenceRequest(
            request_id=rid,
            input_ids=ids,
            decode_dp_rank=0,
            sampling=common_pb2.SamplingParams(max_new_tokens=12, ignore_eos=True, **sampling),
        )
        return await _drain(dstub.Generate(dispatch_pb2.GenerateRequest(request=request)))

    async def tokens(rid: str, **sampling) -> list[int]:
        return [t for c in await chunks(rid, **sampling) for t in c.token_ids]

    async with channel:
        await wait_for_workers(dstub, 3, timeout=60)
        greedy = await tokens("greedy", temperature=0.0)
        assert await tokens("top-k-1", temperature=1.0, top_k=1, seed=7) == greedy
        forced = 4242
        biased = await tokens("biased", temperature=1.0, seed=7, logit_bias={forced: 100.0})
        assert biased == [forced] * 12
        ours = [lp for c in await chunks("logprobs", temperature=0.0, logprobs=2) for lp in c.logprobs]
    direct = http_json(
        f"{servers['a'].url}/v1/completions",
        {
            "model": MODEL,
            "prompt": ids,
            "max_tokens": 12,
            "temperature": 0,
            "ignore_eos": True,
            "logprobs": 2,
            "return_tokens_as_token_ids": True,
        },
        headers={"X-data-parallel-rank": "0"},
    )["choices"][0]["logprobs"]
    assert [lp.token_id for lp in ours] == greedy
    assert [f"token_id:{lp.token_id}" for lp in ours] == direct["tokens"]
    assert [lp.logprob for lp in ours] == pytest.approx(direct["token_logprobs"], abs=1e-3)
    for mine, theirs in zip(ours, direct["top_logprobs"], strict=True):
        ranked = sorted(theirs.items(), key=lambda kv: -kv[1])[:2]
        assert [f"token_id:{t.token_id}" for t in mine.top_logprobs] == [k for k, _ in ranked]
        assert [t.logprob for t in mine.top_logprobs] == pytest.approx([v for _, v in ranked], abs=1e-3)


# Long enough that vLLM's ExampleConnector stores whole 128-token blocks of its KV (it stores the
# full blocks of all but the last prompt token; a prompt of at most 129 tokens stores none).
PD_TEXT = " ".join(
    f"Item {i}: the {colour} box on shelf {i % 7} holds {i * 3} bolts and {i + 11} washers."
    for i, colour in enumerate(["red", "green", "blue", "white", "black", "grey"] * 3)
)


def source_tokens(url: str, engine: str, source: str) -> float:
    """vLLM's count of prompt tokens of one engine by where their KV came from (local_compute,
    local_cache_hit, external_kv_transfer)."""
    from prometheus_client.parser import text_string_to_metric_families

    with urllib.request.urlopen(f"{url}/metrics", timeout=10) as reply:
        text = reply.read().decode()
    return sum(
        sample.value
        for family in text_string_to_metric_families(text)
        if family.name == "vllm:prompt_tokens_by_source"
        for sample in family.samples
        if sample.name.endswith("_total")
        and sample.labels.get("engine") == engine
        and sample.labels.get("source") == source
    )


async def test_pdlb_up_mixed_on_attached_vllm_then_pd_on_its_own_vllm_servers(servers, tmp_path):
    """`pdlb up --engine vllm` as a user runs it, twice.

    Mixed, attached to server A (`--vllm-url`, ranks 0 and 1, round robin): chat and completions
    through the gateway with the `openai` client; requests alternate between A's two engines (vLLM's
    own per-engine counters); SIGTERM stops the cluster, and A, which pdlb up did not start, keeps
    running. PD (`--mode pd --prefill 1 --decode 1`): pdlb up starts a prefill and a decode vLLM
    server on one ExampleConnector storage directory; the greedy completion equals the mixed one,
    the decode server loaded the prompt's KV through the connector (its prompt tokens by source:
    external_kv_transfer), not computing it; chunks name the prefill rank; SIGTERM stops every
    process, the vLLM servers included, and removes the storage directory."""
    import openai

    from tests.test_cli import alive, start_up

    a = servers["a"]
    mixed_dir, pd_dir = tmp_path / "mixed", tmp_path / "pd"
    up, state, _ = start_up(
        mixed_dir, "--mode", "mixed", "--engine", "vllm", "--vllm-url", a.url, "--vllm-server-ranks", "2",
        "--method", "round_robin",
    )  # fmt: skip
    started = "".join(up.start_lines)
    assert f"vLLM server          {a.url}" in started, started  # the attached server, in the summary
    assert "dequantises" not in started, started  # pdlb's GGUF note: vLLM loads no pdlb weights
    try:
        api = openai.AsyncOpenAI(base_url=f"{state['http']}/v1", api_key="unused", max_retries=0)
        before = [finished(a.url, engine, "length") for engine in ("0", "1")]
        for _ in range(4):
            short = await api.completions.create(model=MODEL, prompt="Count: one, two,", max_tokens=3, temperature=0)
            assert short.choices[0].finish_reason == "length" and short.usage.completion_tokens == 3

        async def both_engines_served_two() -> bool:
            return [finished(a.url, e, "length") - b for e, b in zip(("0", "1"), before, strict=True)] == [2, 2]

        await wait_until(both_engines_served_two, 30, "round robin over A's two engines")
        chat = await api.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": "What is the capital of France?"}], temperature=0
        )
        assert "Paris" in chat.choices[0].message.content
        reference = await api.completions.create(model=MODEL, prompt=PD_TEXT, max_tokens=16, temperature=0)
        assert reference.usage.prompt_tokens > 257, "the prompt must cover two connector blocks"
        await api.close()
    finally:
        up.send_signal(signal.SIGTERM)
        rest = up.stdout.read()
        assert up.wait(timeout=120) == 0, rest
    assert "etcd keys left behind: none" in rest
    assert not [pid for pid in state["pids"] if alive(pid)], "orphan processes"
    assert a.alive(), "pdlb up stopped a vLLM server it did not start"

    up, state, _ = start_up(
        pd_dir, "--mode", "pd", "--engine", "vllm", "--prefill", "1", "--decode", "1",
        "--vllm-port", "0", "--vllm-dtype", "float32", "--vllm-eager",
    )  # fmt: skip
    storage = pd_dir / "state" / "vllm-kv" / "local"
    try:
        (prefill_url,), (decode_url,) = state["vllm"]["prefill"], state["vllm"]["decode"]
        started = "".join(up.start_lines)
        assert f"vLLM prefill server  {prefill_url}" in started and f"vLLM decode server   {decode_url}" in started
        assert "dequantises" not in started, started
        assert len(state["pids"]) > len(state["children"]) + 1  # the vLLM servers are pdlb up's too
        loaded_before = source_tokens(decode_url, "0", "external_kv_transfer")
        computed_before = source_tokens(decode_url, "0", "local_compute")
        api = openai.AsyncOpenAI(base_url=f"{state['http']}/v1", api_key="unused", max_retries=0)
        pd = await api.completions.create(model=MODEL, prompt=PD_TEXT, max_tokens=16, temperature=0)
        assert pd.choices[0].text == reference.choices[0].text
        assert pd.usage.completion_tokens == 16

        # whole 128-token blocks (vLLM's CPU block size) of all but the last prompt token
        stored = (pd.usage.prompt_tokens - 2) // 128 * 128

        async def decode_loaded() -> bool:
            return source_tokens(decode_url, "0", "external_kv_transfer") - loaded_before == stored

        await wait_until(decode_loaded, 30, "the decode server to count the KV it loaded from the connector")
        computed = source_tokens(decode_url, "0", "local_compute") - computed_before
        assert computed == pd.usage.prompt_tokens - stored, "the decode server computed more than the prompt's tail"
        assert source_tokens(prefill_url, "0", "local_compute") >= pd.usage.prompt_tokens
        assert any(storage.iterdir()), "the prefill server stored no KV in the cluster's directory"

        async with grpc.aio.insecure_channel(state["gateway"]) as channel:  # the gRPC API names both ranks
            stub = gateway_pb2_grpc.GatewayStub(channel)
            request = common_pb2.InferenceRequest(
                request_id="pd-grpc",
                input_ids=prompt(400, 300),
                sampling=common_pb2.SamplingParams(temperature=0.0, max_new_tokens=8, ignore_eos=True),
            )
            chunks = [c async for c in stub.Generate(gateway_pb2.GatewayGenerateRequest(request=request), timeout=300)]
            assert sum(len(c.token_ids) for c in chunks) == 8
            assert {c.prefill_dp_rank for c in chunks if c.token_ids} == {0}
        await api.close()
        await _prefill_rooms_are_owned(state["workers"]["scheduler-prefill-0"])
    finally:
        up.send_signal(signal.SIGTERM)
        rest = up.stdout.read()
        assert up.wait(timeout=120) == 0, rest
    assert "stopping: gateway, dispatchers, schedulers, bootstrap, vLLM servers, etcd ..." in rest
    assert "etcd keys left behind: none" in rest
    assert not [pid for pid in state["pids"] if alive(pid)], "orphan processes (vLLM servers included)"
    assert not storage.exists(), "the connector's storage directory was left behind"


async def _prefill_rooms_are_owned(address: str) -> None:
    """A vLLM prefill worker holds a room's hand-off for one request: a second request with the
    room is refused ALREADY_EXISTS while it is held; the pull gets one header naming the connector,
    with the prompt and first token; a second pull is answered NOT_FOUND at once."""
    ids = prompt(500, 40)
    async with grpc.aio.insecure_channel(address) as channel:
        stub = scheduler_pb2_grpc.SchedulerStub(channel)

        def generate(rid: str):
            request = common_pb2.InferenceRequest(
                request_id=rid,
                input_ids=ids,
                bootstrap_room=987654321,
                sampling=common_pb2.SamplingParams(temperature=0.0, max_new_tokens=8),
            )
            return stub.Generate(scheduler_pb2.SchedulerGenerateRequest(request=request), timeout=120)

        first = [c async for c in generate("room-owner")]
        assert [c.finish_reason for c in first][-1] == common_pb2.FINISH_REASON_PREFILL_DONE
        with pytest.raises(grpc.aio.AioRpcError) as taken:
            _ = [c async for c in generate("room-thief")]
        assert taken.value.code() == grpc.StatusCode.ALREADY_EXISTS and "room-owner" in taken.value.details()
        pull = scheduler_pb2.PullKVRequest(bootstrap_room=987654321, request_id="decode-side")
        (message,) = [m async for m in stub.PullKV(pull, timeout=30)]
        assert message.header.kv_connector == "ExampleConnector" and list(message.header.input_ids) == ids
        assert message.header.first_token_id == first[-1].token_ids[-1]
        with pytest.raises(grpc.aio.AioRpcError) as gone:
            _ = [m async for m in stub.PullKV(pull, timeout=30)]
        assert gone.value.code() == grpc.StatusCode.NOT_FOUND and "already pulled" in gone.value.details()


def test_a_worker_refuses_a_vllm_server_with_another_tokenizer(servers, etcd, prefix, tmp_path):
    """A worker whose --model tokenises differently from the vLLM server it attaches to exits at
    start, naming the difference (workers of another model are refused, as with pdlb's engine)."""
    import subprocess

    from pdlb.common.processes import script

    result = subprocess.run(
        [
            *script("pdlb-scheduler"),
            "--port",
            "0",
            "--model",
            "tiny-random",
            *worker_flags(servers, 2),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode != 0
    assert "tokenises" in result.stderr and "serve the same model on both sides" in result.stderr, result.stderr


async def test_killed_server_streams_resume_on_another_rank_and_restart_rejoins(servers, cluster):
    """Server B (rank 2) is killed while streams run on it: the gateway resumes them on ranks 0/1
    with the same greedy tokens as an uninterrupted run; rank 2 leaves membership, and when B is
    started again its worker rejoins and serves. (Last in the module: it restarts server B.)"""
    dispatcher, _, gateway = cluster
    channel, dstub = dispatch_stub(dispatcher.address)
    prompts = [prompt(200 + i, 32) for i in range(6)]
    async with channel, grpc.aio.insecure_channel(gateway.address) as gch:
        stub = gateway_pb2_grpc.GatewayStub(gch)
        await wait_for_workers(dstub, 3, timeout=60)
        reference = [(await through_gateway(stub, f"ref-{i}", p, 40))[0] for i, p in enumerate(prompts)]
        streaming_on_2 = asyncio.Event()  # tokens from rank 2 reached a client: a kill now cuts a stream
        runs = [
            asyncio.create_task(through_gateway(stub, f"run-{i}", p, 40, streaming_on_2, on_rank=2))
            for i, p in enumerate(prompts)
        ]
        await asyncio.wait_for(streaming_on_2.wait(), 120)
        servers["b"].kill()
        results = await asyncio.wait_for(asyncio.gather(*runs), 300)
        assert [tokens for tokens, _, _ in results] == reference
        resumed = [ranks for _, ranks, retries in results if retries]
        assert resumed, "the kill hit no stream: nothing was tested"
        assert all(2 in ranks and ranks[-1] in (0, 1) for ranks in resumed)
        await wait_for_workers(dstub, 2, timeout=30)

        servers["b"].spawn().wait_ready()
        await wait_for_workers(dstub, 3, timeout=60)
        request = common_pb2.InferenceRequest(
            request_id="after-restart",
            input_ids=prompts[0],
            decode_dp_rank=2,
            sampling=common_pb2.SamplingParams(temperature=0.0, max_new_tokens=40, ignore_eos=True),
        )
        tokens = [
            t
            for chunk in await _drain(dstub.Generate(dispatch_pb2.GenerateRequest(request=request)))
            for t in chunk.token_ids
        ]
        assert tokens == reference[0]
