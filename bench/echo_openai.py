"""An OpenAI-shaped HTTP worker that answers at once, with no model: the backend the Rust routers
(smg, vllm-router) proxy to in the gateway overhead benchmark.

`POST /v1/completions` and `/v1/chat/completions` stream `max_tokens` (or `max_completion_tokens`)
one-token chunks as server-sent events, or return them in one JSON body; the endpoints a router
probes before it routes (`/health`, `/health_generate`, `/v1/models`, `/server_info`,
`/get_server_info`, `/model_info`, `/get_model_info`, `/get_load`, `/metrics`) answer as an SGLang
worker with one DP rank would.

  python -m bench.echo_openai --port 0     # prints "echo-openai listening on http://127.0.0.1:PORT"
"""

from __future__ import annotations

import argparse
import asyncio
import json
import signal
import time

from aiohttp import web

MODEL = "echo"
MAX_TOKENS = 4096  # bounded: a request cannot make the echo stream forever


def _count(body: dict) -> int:
    value = body.get("max_completion_tokens") or body.get("max_tokens") or 16
    return max(1, min(int(value), MAX_TOKENS))


async def completions(request: web.Request) -> web.StreamResponse:
    chat = request.path.endswith("chat/completions")
    try:
        body = await request.json()
    except json.JSONDecodeError:
        return web.json_response(
            {"error": {"message": "body is not JSON", "type": "invalid_request_error"}}, status=400
        )
    count, created = _count(body), int(time.time())
    kind = "chat.completion" if chat else "text_completion"

    def choice(text: str, reason: str | None, stream: bool) -> dict:
        if chat:
            key = "delta" if stream else "message"
            return {"index": 0, key: {"role": "assistant", "content": text}, "finish_reason": reason}
        return {"index": 0, "text": text, "finish_reason": reason}

    envelope = {"id": "echo", "created": created, "model": body.get("model", MODEL)}
    if not body.get("stream"):
        usage = {"prompt_tokens": 1, "completion_tokens": count, "total_tokens": count + 1}
        return web.json_response(
            {**envelope, "object": kind, "choices": [choice("a" * count, "length", False)], "usage": usage}
        )
    response = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"})
    await response.prepare(request)
    for i in range(count):
        chunk = {
            **envelope,
            "object": "chat.completion.chunk" if chat else kind,
            "choices": [choice("a", "length" if i == count - 1 else None, True)],
        }
        await response.write(f"data: {json.dumps(chunk)}\n\n".encode())
    await response.write(b"data: [DONE]\n\n")
    await response.write_eof()
    return response


def app() -> web.Application:
    info = {
        "model_path": MODEL,
        "served_model_name": MODEL,
        "tokenizer_path": MODEL,
        "dp_size": 1,
        "tp_size": 1,
        "is_generation": True,
        "max_total_num_tokens": 1 << 20,
        "context_length": 1 << 16,
    }

    async def ok(_: web.Request) -> web.Response:
        return web.Response(text="OK")

    async def server_info(_: web.Request) -> web.Response:
        return web.json_response(info)

    async def models(_: web.Request) -> web.Response:
        card = {"id": MODEL, "object": "model", "created": 0, "owned_by": "echo", "max_model_len": 1 << 16}
        return web.json_response({"object": "list", "data": [card]})

    async def load(_: web.Request) -> web.Response:
        return web.json_response([{"dp_rank": 0, "num_reqs": 0, "num_waiting_reqs": 0, "num_tokens": 0}])

    application = web.Application(client_max_size=4 << 20)
    application.add_routes(
        [
            web.post("/v1/completions", completions),
            web.post("/v1/chat/completions", completions),
            web.get("/health", ok),
            web.get("/health_generate", ok),
            web.get("/v1/models", models),
            web.get("/server_info", server_info),
            web.get("/get_server_info", server_info),
            web.get("/model_info", server_info),
            web.get("/get_model_info", server_info),
            web.get("/get_load", load),
            web.get("/metrics", lambda _: web.Response(text="")),
        ]
    )
    return application


async def serve(port: int) -> None:
    runner = web.AppRunner(app(), access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", port)
    await site.start()
    bound = runner.addresses[0][1]
    print(f"echo-openai listening on http://127.0.0.1:{bound}", flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    await runner.cleanup()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--port", type=int, default=0, help="0: any free port")
    asyncio.run(serve(parser.parse_args().port))


if __name__ == "__main__":
    main()
