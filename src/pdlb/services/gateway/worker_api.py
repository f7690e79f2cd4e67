"""The endpoints routers expect of an SGLang / vLLM worker, served by the gateway for the whole
cluster behind it, so that `smg --dp-aware` and vllm-router's DP-aware mode can put pdlb's ranks
under their own policies:

- `GET /server_info` (SGLang's, also `/get_server_info`): the model, `dp_size` (the ranks a router
  may pin with `data_parallel_rank`: the decode role's in PD, since the tokens come from there),
  `dp_size` per role, and the length limits;
- `GET /model_info` (also `/get_model_info`): the model, whether it generates, and its length limit;
- `GET /get_load`: one entry per DP rank, in SGLang's shape (`dp_rank`, `num_reqs`,
  `num_waiting_reqs`, `num_tokens`), from the dispatchers' load tables (reported + in flight);
- `GET /health_generate`: the same readiness as `/health`.

Everything comes from the WatchLoad snapshots the dashboard already follows: no extra calls.
The length limits are those of the workers, not the gateway's own: the smallest that the live
workers of the roles a request crosses report (`max_prompt_tokens`, `max_context_tokens`), so a
router or client that stays within them is never refused by a worker. Before any worker reported,
the gateway's own limits stand.
"""

from __future__ import annotations

from aiohttp import web

from pdlb.services.gateway.dashboard import Dashboard
from pdlb.services.gateway.upstreams import Upstreams
from pdlb.v1 import dispatch_pb2

GONE = dispatch_pb2.MEMBER_STATE_GONE


class WorkerApi:
    def __init__(
        self, upstreams: Upstreams, dashboard: Dashboard, model_id: str, max_prompt_tokens: int, max_new_tokens: int
    ) -> None:
        self.upstreams, self.dashboard, self.model_id = upstreams, dashboard, model_id
        self.max_prompt_tokens, self.max_new_tokens = max_prompt_tokens, max_new_tokens

    def routes(self, app: web.Application) -> None:
        for path in ("/server_info", "/get_server_info"):
            app.router.add_get(path, self.server_info)
        for path in ("/model_info", "/get_model_info"):
            app.router.add_get(path, self.model_info)
        app.router.add_get("/get_load", self.get_load)

    def pinned_role(self) -> str | None:
        """The role whose rank `data_parallel_rank` (and vLLM's header) pins: mixed, or decode in PD."""
        mode = self.upstreams.mode()
        return None if mode is None else "mixed" if mode == "mixed" else "decode"

    def rows(self, role: str) -> dict[int, list[dispatch_pb2.WorkerLoadEntry]]:
        """The role's workers that have not left, by rank, from every dispatcher of the role."""
        ranks: dict[int, dict[str, dispatch_pb2.WorkerLoadEntry]] = {}
        for address in self.upstreams.addresses(role):
            latest = self.dashboard.latest.get(address)
            if latest is None:
                continue
            for row in latest[1].workers:
                if row.state != GONE:  # one entry per worker, whichever dispatcher lists it
                    ranks.setdefault(row.worker.dp_rank, {})[row.worker.worker_id] = row
        return {rank: list(rows.values()) for rank, rows in sorted(ranks.items())}

    def dp_size(self, role: str) -> int:
        ranks = self.rows(role)
        return max(ranks) + 1 if ranks else 0

    def limits(self) -> tuple[int, int]:
        """(longest prompt, most prompt + new tokens) in tokens that every live worker of the
        roles a request crosses accepts (PD: prefill and decode), within the gateway's own limits."""
        prompt, context = self.max_prompt_tokens, self.max_prompt_tokens + self.max_new_tokens
        mode = self.upstreams.mode()
        for role in ("mixed",) if mode == "mixed" else ("prefill", "decode") if mode else ():
            for rows in self.rows(role).values():
                for row in rows:
                    if row.reported.max_prompt_tokens:  # 0: a worker that does not say
                        prompt = min(prompt, row.reported.max_prompt_tokens)
                    if row.reported.max_context_tokens:
                        context = min(context, row.reported.max_context_tokens)
        return min(prompt, context - 1), context  # a prompt leaves room for one new token

    async def server_info(self, request: web.Request) -> web.Response:
        role = self.pinned_role()
        max_prompt, context = self.limits()
        per_role = {r: self.dp_size(r) for r in ("mixed", "prefill", "decode") if self.upstreams.addresses(r)}
        return web.json_response(
            {
                "model_path": self.model_id,
                "served_model_name": self.model_id,
                "tokenizer_path": self.model_id,
                "is_generation": True,
                "disaggregation_mode": "null" if role == "mixed" else "pd" if role else None,
                "dp_size": per_role.get(role, 0) if role else 0,
                "dp_size_per_role": per_role,
                "tp_size": 1,
                "context_length": context,
                "max_prompt_tokens": max_prompt,
                "max_new_tokens": min(self.max_new_tokens, context - 1),
                "max_total_num_tokens": self.kv_capacity(role) if role else 0,
            }
        )

    def kv_capacity(self, role: str) -> int:
        return sum(row.reported.kv_tokens_capacity for rows in self.rows(role).values() for row in rows)

    async def model_info(self, request: web.Request) -> web.Response:
        return web.json_response(
            {
                "model_path": self.model_id,
                "served_model_name": self.model_id,
                "tokenizer_path": self.model_id,
                "is_generation": True,
                "max_model_len": self.limits()[1],
            }
        )

    async def get_load(self, request: web.Request) -> web.Response:
        """Per DP rank of the pinned role: requests running and in flight, waiting, and tokens."""
        role = self.pinned_role()
        loads = []
        for rank, rows in (self.rows(role) if role else {}).items():
            loads.append(
                {
                    "dp_rank": rank,
                    "num_reqs": sum(
                        r.reported.running_requests + r.reported.waiting_requests + r.inflight_requests for r in rows
                    ),
                    "num_waiting_reqs": sum(r.reported.waiting_requests for r in rows),
                    "num_tokens": sum(
                        r.reported.running_tokens + r.reported.waiting_tokens + r.inflight_tokens for r in rows
                    ),
                }
            )
        return web.json_response(loads)
