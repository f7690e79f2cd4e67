"""`peer_vllm_token_score` (baseline): vLLM's publication scheme (see peer_vllm_dp) scored in
tokens, waiting_tokens * 4 + running_tokens; each dispatch adds its prompt tokens to the chosen
engine's waiting tokens. Benchmarks only.

Re-implementation with no real counterpart: a token-count variant of vLLM's scheme (see
peer_vllm_dp), which vLLM itself does not offer.
"""

from __future__ import annotations

from pdlb.services.dispatcher.policies.base import RouteContext
from pdlb.services.dispatcher.policies.peer_vllm_dp import PeerVLLMDP


class PeerVLLMTokenScore(PeerVLLMDP):
    name = "peer_vllm_token_score"
    fields = ("waiting_tokens", "running_tokens")

    def _increment(self, ctx: RouteContext) -> int:
        return ctx.num_tokens
