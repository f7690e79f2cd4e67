"""Sampling parameters: the sampler's logic on known logits, and the parameters end to end through
a real gateway, dispatcher and torch worker (the toy model)."""

from __future__ import annotations

import math

import aiohttp
import pytest
import torch

from pdlb.common.free_port import free_port
from pdlb.engines.request import SamplingConfig
from pdlb.engines.torch.batching import token_generator
from pdlb.engines.torch.sampler import sample_row
from tests.helpers import dispatch_stub, wait_for_workers

LOGITS = torch.tensor([4.0, 3.0, 2.0, 1.0, 0.0, -1.0])


def draws(config: SamplingConfig, n: int = 300, **history) -> set[int]:
    return {
        sample_row(LOGITS, config, token_generator(7, i), history.get("prompt", []), history.get("output", [])).token
        for i in range(n)
    }


def test_filters_keep_only_the_tokens_they_allow():
    assert draws(SamplingConfig(temperature=2.0), n=1000) == set(range(6))  # plain sampling reaches everything
    assert draws(SamplingConfig(temperature=1.0, top_k=2)) == {0, 1}
    # softmax of LOGITS: 0.636, 0.234, 0.086, ...: top_p 0.8 keeps the first two, 0.5 only the first
    assert draws(SamplingConfig(temperature=1.0, top_p=0.8)) == {0, 1}
    assert draws(SamplingConfig(temperature=1.0, top_p=0.5)) == {0}
    # min_p 0.1: tokens at least 0.1 x 0.636 likely (0.234 and 0.086 stay, 0.032 goes)
    assert draws(SamplingConfig(temperature=1.0, min_p=0.1)) == {0, 1, 2}


def test_penalties_bias_and_banned_tokens_move_the_argmax():
    greedy = SamplingConfig()
    assert sample_row(LOGITS, greedy, None, [], []).token == 0
    # repetition: 4 / 5 = 0.8 < 3, so token 1 wins once 0 was seen (prompt or output)
    assert sample_row(LOGITS, SamplingConfig(repetition_penalty=5.0), None, [0], []).token == 1
    # frequency: 4 - 2 x 1.5 = 1 < 3; presence alone (4 - 0.5) keeps 0 on top
    assert sample_row(LOGITS, SamplingConfig(frequency_penalty=1.5), None, [], [0, 0]).token == 1
    assert sample_row(LOGITS, SamplingConfig(presence_penalty=0.5), None, [], [0, 0]).token == 0
    assert sample_row(LOGITS, SamplingConfig(logit_bias=((5, 10.0),)), None, [], []).token == 5
    assert sample_row(LOGITS, greedy, None, [], [], banned=frozenset({0, 1})).token == 2


def test_logprobs_are_the_models_own_and_ordered():
    config = SamplingConfig(temperature=1.0, top_k=1, logprobs=3, repetition_penalty=2.0)
    sampled = sample_row(LOGITS, config, token_generator(1, 0), [0], [])
    expected = torch.log_softmax(LOGITS, dim=-1)
    assert sampled.token == 1  # the penalty moved the draw...
    assert math.isclose(sampled.logprob, float(expected[1]), rel_tol=1e-6)  # ...not the reported logprob
    assert [t for t, _ in sampled.top] == [0, 1, 2]
    assert all(math.isclose(lp, float(expected[t]), rel_tol=1e-6) for t, lp in sampled.top)
    assert sample_row(LOGITS, SamplingConfig(), None, [], []).logprob is None


MODEL = "tiny-random"


@pytest.fixture
def torch_gateway(etcd, prefix, start_service):
    common = ["--etcd", etcd.endpoint, "--etcd-prefix", prefix]
    dispatcher = start_service("dispatcher", *common, name="disp")
    start_service("scheduler", *common, "--dp-rank", "0", "--torch-threads", "1", name="torch-0")
    http_port = free_port()
    start_service("gateway", *common, "--http-port", str(http_port))
    return dispatcher, f"http://127.0.0.1:{http_port}"


async def test_sampling_parameters_end_to_end(torch_gateway):
    dispatcher, base = torch_gateway
    channel, stub = dispatch_stub(dispatcher.address)
    async with channel:
        await wait_for_workers(stub, 1)
    async with aiohttp.ClientSession() as http:

        async def complete(**params) -> dict:
            body = {"model": MODEL, "prompt": "Once upon a time", "max_tokens": 8, "ignore_eos": True, **params}
            async with http.post(f"{base}/v1/completions", json=body) as reply:
                answer = await reply.json()
                assert reply.status == 200, answer
                return answer

        greedy = await complete(temperature=0, logprobs=2)
        choice = greedy["choices"][0]
        logprobs = choice["logprobs"]
        assert len(logprobs["tokens"]) == greedy["usage"]["completion_tokens"] == 8
        assert len(logprobs["top_logprobs"]) == len(logprobs["token_logprobs"]) == 8
        assert all(lp <= 0 for lp in logprobs["token_logprobs"]) and all(logprobs["top_logprobs"])
        # top_k 1 samples greedily whatever the temperature; a seed makes sampling repeatable
        assert (await complete(temperature=1.5, top_k=1, seed=3))["choices"][0]["text"] == choice["text"]
        sampled = [(await complete(temperature=1.0, seed=11))["choices"][0]["text"] for _ in range(2)]
        assert sampled[0] == sampled[1]
        # a bias of 100 on one byte token: every token is that byte
        forced = await complete(temperature=0, logit_bias={"65": 100})
        assert forced["choices"][0]["text"] == "A" * 8
        # min_tokens: a stop token cannot end the generation before it
        first = ord("B")
        early = await complete(temperature=0, stop_token_ids=[first], logit_bias={str(first): 100})
        assert early["usage"]["completion_tokens"] == 1 and early["choices"][0]["finish_reason"] == "stop"
        late = await complete(temperature=0, stop_token_ids=[first], min_tokens=4, logit_bias={str(first): 100})
        assert late["usage"]["completion_tokens"] == 5 and late["choices"][0]["finish_reason"] == "stop"
        # a frequency penalty stops greedy decoding from repeating the favoured token for ever
        favoured = (await complete(temperature=0, logit_bias={"65": 5}))["choices"][0]["text"]
        penalised = (await complete(temperature=0, logit_bias={"65": 5}, frequency_penalty=2.0))["choices"][0]["text"]
        assert favoured == "A" * 8 and penalised.startswith("A") and penalised != favoured

        # chat: logprobs is a switch, top_logprobs the count
        body = {
            "model": MODEL,
            "messages": [{"role": "user", "content": "hi"}],
            "max_completion_tokens": 4,
            "temperature": 0,
            "ignore_eos": True,
            "logprobs": True,
            "top_logprobs": 3,
            # fields the routers add, at the values they send: no effect, no error
            "separate_reasoning": True,
            "stream_reasoning": True,
            "no_stop_trim": False,
            "continue_final_message": False,
            "skip_special_tokens": True,
            "return_hidden_states": False,
            "include_reasoning": True,
            "top_k": None,
        }
        async with http.post(f"{base}/v1/chat/completions", json=body) as reply:
            chat = await reply.json()
            assert reply.status == 200, chat
        content = chat["choices"][0]["logprobs"]["content"]
        assert len(content) == 4 and chat["usage"]["completion_tokens"] == 4
        for entry in content:
            top = [alternative["logprob"] for alternative in entry["top_logprobs"]]
            assert len(top) == 3 and top == sorted(top, reverse=True)
            assert math.isclose(entry["logprob"], top[0], abs_tol=1e-5)  # greedy: the most likely token
        async with http.post(f"{base}/v1/chat/completions", json={**body, "return_hidden_states": True}) as reply:
            refused = await reply.json()
            assert reply.status == 400 and refused["error"]["param"] == "return_hidden_states"
