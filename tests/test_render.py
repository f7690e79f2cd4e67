"""vLLM's render endpoints on a real gateway (SmolLM2's tokenizer, on loopback): the token ids a
request would run, in vLLM's GenerateRequest shape, with /v1/completions' own bad-input errors.

The shape is checked against vLLM itself where its virtualenv is installed (`make install-vllm`):
vLLM's own GenerateRequest model must accept the gateway's answer, with the same fields as vLLM's
render and the sampling vLLM derives from the same body, and vLLM's tokenizer of the same model
(Hugging Face's, from the exported SmolLM2) must give the same token ids. That check runs vLLM's
protocol classes in a subprocess rather than a vLLM server, which takes minutes to start here."""

from __future__ import annotations

import asyncio
import json
import re
import subprocess

import aiohttp
import pytest

from pdlb.common.free_port import free_port
from pdlb.engines.vllm.server import MODEL_SUBDIR, find_venv, missing_reason
from pdlb.models.catalog import resolve

SMOLLM2 = "smollm2-135m-instruct"
PROMPT = "The capital of France is"
MESSAGES = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Name a colour."}]


@pytest.fixture
def gateway(start_service):
    """A gateway alone (no dispatchers: rendering needs only the tokenizer); its HTTP base URL."""
    port = free_port()
    start_service("gateway", "--etcd", "", "--model", SMOLLM2, "--http-port", str(port), "--max-prompt-tokens", "64")
    return f"http://127.0.0.1:{port}"


async def post(http: aiohttp.ClientSession, url: str, body) -> tuple[int, object]:
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    async with http.post(url, data=data, headers={"Content-Type": "application/json"}) as reply:
        return reply.status, await reply.json()


def render_count(metrics: str) -> int:
    match = re.search(r'pdlb_gateway_requests_total\{api="render",outcome="200"\} ([0-9.]+)', metrics)
    return int(float(match.group(1))) if match else 0


async def test_render_answers_the_token_ids_in_vllms_shape(gateway):
    tokenizer = resolve(SMOLLM2).tokenizer()
    async with aiohttp.ClientSession() as http:
        body = {"model": SMOLLM2, "prompt": PROMPT, "max_tokens": 5, "temperature": 0.7, "top_k": 20, "seed": 9}
        status, rendered = await post(http, f"{gateway}/v1/completions/render", body)
        assert status == 200, rendered
        assert isinstance(rendered, list) and len(rendered) == 1
        one = rendered[0]
        assert one["token_ids"] == tokenizer.encode(PROMPT)
        assert one["model"] == SMOLLM2 and one["request_id"].startswith("cmpl-") and one["stream"] is False
        sampling = one["sampling_params"]
        assert sampling["max_tokens"] == 5 and sampling["temperature"] == 0.7 and sampling["top_k"] == 20
        assert sampling["seed"] == 9 and sampling["top_p"] == 1.0 and sampling["stop"] == []

        ids = [1, 2, 3, 4]  # a prompt of token ids renders to itself
        status, rendered = await post(http, f"{gateway}/v1/completions/render", {"model": SMOLLM2, "prompt": ids})
        assert status == 200 and rendered[0]["token_ids"] == ids, rendered

        chat = {"model": SMOLLM2, "messages": MESSAGES, "stream": True}
        status, one = await post(http, f"{gateway}/v1/chat/completions/render", chat)
        assert status == 200, one
        assert one["token_ids"] == tokenizer.encode_chat([(m["role"], m["content"]) for m in MESSAGES])
        assert one["request_id"].startswith("chatcmpl-") and one["stream"] is True
        assert one["stream_options"] == {"include_usage": False}

        async with http.get(f"{gateway}/metrics") as reply:
            assert render_count(await reply.text()) == 3


BAD = [
    b"{not json",
    {"model": 7, "prompt": PROMPT},  # a model that is not a string (left out, it is the served one)
    {"model": "gpt-4", "prompt": PROMPT},  # not served: 404
    {"model": SMOLLM2, "prompt": ""},
    {"model": SMOLLM2, "prompt": PROMPT, "temperature": 3},
    {"model": SMOLLM2, "prompt": PROMPT, "best_of": 2},
    {"model": SMOLLM2, "prompt": "many words " * 60},  # over --max-prompt-tokens, once tokenised
    {"model": SMOLLM2, "prompt": "many words " * 200},  # over --max-prompt-chars, not tokenised
]


def unnamed(status_and_error: tuple[int, object]) -> tuple[int, str]:
    """The answer with the request id the gateway drew taken out of it."""
    status, error = status_and_error
    return status, re.sub(r"(chat)?cmpl-[0-9a-f]{32}", "<id>", json.dumps(error))


async def test_render_refuses_bad_input_as_completions_does(gateway):
    async with aiohttp.ClientSession() as http:
        for body in BAD:
            status, error = answer = await post(http, f"{gateway}/v1/completions/render", body)
            assert 400 <= status < 500 and error["error"]["message"], (body, status, error)
            # no dispatcher is known, so /v1/completions answers exactly what its parsing says
            assert unnamed(answer) == unnamed(await post(http, f"{gateway}/v1/completions", body)), body
        status, error = await post(http, f"{gateway}/v1/chat/completions/render", {"model": SMOLLM2, "messages": []})
        assert status == 400 and error["error"]["param"] == "messages", error
        async with http.get(f"{gateway}/metrics") as reply:
            metrics = await reply.text()
    assert render_count(metrics) == 0
    assert 'pdlb_gateway_requests_total{api="render",outcome="400"}' in metrics


VLLM_CHECK = """
import json, sys
from transformers import AutoTokenizer
from vllm.entrypoints.openai.chat_completion.protocol import ChatCompletionRequest
from vllm.entrypoints.openai.completion.protocol import CompletionRequest
from vllm.entrypoints.scale_out.token_in_token_out.protocol import GenerateRequest

cases, model_dir = json.load(sys.stdin), sys.argv[1]
tokenizer = AutoTokenizer.from_pretrained(model_dir)
out = []
for case in cases:
    chat, body, ours = case["chat"], case["body"], case["rendered"]
    ours = ours if chat else ours[0]
    parsed = GenerateRequest.model_validate(ours)  # vLLM's own schema takes the gateway's answer
    request = (ChatCompletionRequest if chat else CompletionRequest)(**body)
    theirs = GenerateRequest(token_ids=[0], model=body["model"], sampling_params=request.to_sampling_params(
        ours["sampling_params"]["max_tokens"], {}))
    if chat:
        ids = tokenizer.apply_chat_template(body["messages"], add_generation_prompt=True, tokenize=True)
        ids = ids["input_ids"] if hasattr(ids, "keys") else ids  # a BatchEncoding in newer transformers
    else:
        ids = body["prompt"] if isinstance(body["prompt"], list) else tokenizer(body["prompt"])["input_ids"]
    sampling = theirs.model_dump()["sampling_params"]
    out.append({
        "fields": sorted(theirs.model_dump()), "ours": sorted(ours),
        "sampling": {k: sampling.get(k) for k in ours["sampling_params"] if k in sampling},
        "validated_ids": parsed.token_ids, "vllm_ids": list(ids),
    })
print(json.dumps(out))
"""


SAMPLED = {"max_tokens", "temperature", "top_p", "top_k", "seed", "stop", "min_tokens", "presence_penalty"}
SAMPLED |= {"logprobs", "logit_bias", "ignore_eos"}


@pytest.mark.skipif(find_venv() is None, reason=missing_reason())
async def test_render_matches_vllms_own_protocol_and_tokenizer(gateway):
    bodies = [
        (False, {"model": SMOLLM2, "prompt": PROMPT, "max_tokens": 5, "temperature": 0.5, "top_p": 0.9, "seed": 3}),
        (False, {"model": SMOLLM2, "prompt": PROMPT, "max_tokens": 7, "stop": ["."], "min_tokens": 2, "top_k": 5}),
        (False, {"model": SMOLLM2, "prompt": [5, 6, 7], "logprobs": 2, "logit_bias": {"5": 1.5}, "ignore_eos": True}),
        (True, {"model": SMOLLM2, "messages": MESSAGES, "max_tokens": 4, "presence_penalty": 0.5}),
    ]
    cases = []
    async with aiohttp.ClientSession() as http:
        for chat, body in bodies:
            path = "/v1/chat/completions/render" if chat else "/v1/completions/render"
            status, rendered = await post(http, f"{gateway}{path}", body)
            assert status == 200, rendered
            cases.append({"chat": chat, "body": body, "rendered": rendered})
    venv = find_venv()
    done = await asyncio.to_thread(
        subprocess.run,
        [str(venv / "bin" / "python"), "-c", VLLM_CHECK, str(venv / MODEL_SUBDIR)],
        input=json.dumps(cases),
        capture_output=True,
        text=True,
        timeout=300,
        env={"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "PATH": "/usr/bin:/bin"},
    )
    assert done.returncode == 0, done.stderr[-3000:]
    for (chat, body), case, result in zip(bodies, cases, json.loads(done.stdout.splitlines()[-1]), strict=True):
        assert set(body) & SAMPLED <= set(result["sampling"]), body  # every field the body set was compared
        ours = case["rendered"] if chat else case["rendered"][0]
        assert result["ours"] == result["fields"], body  # the same top-level fields as vLLM's render
        assert result["validated_ids"] == result["vllm_ids"] == ours["token_ids"], body
        for name, value in result["sampling"].items():
            mine = ours["sampling_params"][name]
            assert mine == (pytest.approx(value) if isinstance(value, float) else value), (name, body)
