"""Attaching a scheduler to a running vLLM server's DP rank: wait for it, check it serves the
dispatcher's tokenizer, and keep this worker in membership only while the server is healthy."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time

import aiohttp

from pdlb.common.membership import LeasedRegistration
from pdlb.common.tokenizer import Tokenizer
from pdlb.engines.request import EngineLimits
from pdlb.engines.vllm.engine import (
    TokenizerMismatch,
    VLLMEngine,
    VLLMRank,
    VLLMUnavailable,
    check_tokenizer,
    served_model,
)

log = logging.getLogger("pdlb.scheduler")
REJOIN_RETRY_S = 2.0  # between attempts to rejoin (the tokenizer check or etcd failed)


async def wait_ready(session: aiohttp.ClientSession, url: str, wait_s: float) -> None:
    """Wait until `url`/health answers 200 (a vLLM server takes minutes to start on a CPU); raises
    SystemExit after `wait_s` seconds."""
    deadline = time.monotonic() + wait_s
    last = "no answer yet"
    while time.monotonic() < deadline:
        try:
            async with session.get(f"{url}/health", timeout=aiohttp.ClientTimeout(total=5)) as resp:
                if resp.status == 200:
                    return
                last = f"HTTP {resp.status}"
        except (aiohttp.ClientError, asyncio.TimeoutError) as exc:
            last = repr(exc)
        await asyncio.sleep(1.0)
    raise SystemExit(f"the vLLM server at {url} was not healthy within {wait_s:.0f} s ({last})")


async def open_vllm_engine(args, limits: EngineLimits, tokenizer: Tokenizer) -> VLLMEngine:
    """The engine of rank `args.dp_rank` on the server at `args.vllm_url` (holding
    `args.vllm_server_ranks` DP ranks); raises SystemExit with what to fix."""
    try:
        rank = VLLMRank.of(args.vllm_url, args.vllm_server_ranks, args.dp_rank % max(1, args.vllm_server_ranks))
    except ValueError as exc:
        raise SystemExit(str(exc)) from None
    session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=None, sock_connect=10))
    try:
        print(f"pdlb-scheduler rank {args.dp_rank}: waiting for vLLM at {rank.url}", flush=True)
        await wait_ready(session, rank.url, args.vllm_wait)
        model, max_model_len = await served_model(session, rank.url)
        await check_tokenizer(session, rank.url, model, tokenizer)
    except (VLLMUnavailable, TokenizerMismatch) as exc:
        await session.close()
        raise SystemExit(str(exc)) from None
    except BaseException:
        await session.close()
        raise
    engine = VLLMEngine(
        rank,
        model,
        limits,
        tokenizer.vocab_size,
        max_model_len,
        poll_interval_s=args.vllm_poll_interval,
        session=session,
        kv_connector=args.vllm_kv_connector,
        kv_hold_ttl_s=args.kv_hold_ttl,
    )
    return engine


class HealthGatedRegistration:
    """A worker's membership that follows its vLLM server: deregistered while the server is down,
    registered again once it answers and still serves the same tokenizer (a restart may bring
    another model). Same start()/close() as LeasedRegistration."""

    def __init__(self, first: LeasedRegistration, engine: VLLMEngine, tokenizer: Tokenizer) -> None:
        self.current: LeasedRegistration | None = first
        self.engine, self.tokenizer = engine, tokenizer
        self._spec = (first.endpoint, first.key.decode(), json.loads(first.value), first.ttl)
        self._changed = asyncio.Event()
        self._task: asyncio.Task | None = None

    async def start(self) -> None:
        await self.current.start()
        self.engine.health_listeners.append(lambda healthy: self._changed.set())
        self._task = asyncio.create_task(self._follow(), name="vllm-membership")

    async def _follow(self) -> None:
        while True:
            self._changed.clear()
            try:
                await self._reconcile()
            except (VLLMUnavailable, TokenizerMismatch) as exc:
                log.error("not rejoining membership: %s", exc)
            except Exception as exc:  # etcd away: retried below
                log.warning("membership change failed: %s", exc)
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._changed.wait(), REJOIN_RETRY_S)

    async def _reconcile(self) -> None:
        url = self.engine.rank.url
        if not self.engine.healthy and self.current is not None:
            current, self.current = self.current, None
            await current.close()
            log.warning("left membership: vLLM at %s is down", url)
        elif self.engine.healthy and self.current is None:
            await check_tokenizer(self.engine.session, url, self.engine.model, self.tokenizer)
            registration = LeasedRegistration(*self._spec)
            await registration.start()
            self.current = registration
            log.warning("rejoined membership: vLLM at %s is back", url)

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        if self.current is not None:
            await self.current.close()
