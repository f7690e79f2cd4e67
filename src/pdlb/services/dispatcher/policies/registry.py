"""The one place that lists the load-balancing methods (one module per method in this package)."""

from __future__ import annotations

from pdlb.services.dispatcher.load_table import Role
from pdlb.services.dispatcher.policies.base import Policy, PolicyOptions
from pdlb.services.dispatcher.policies.cache_aware import CacheAware
from pdlb.services.dispatcher.policies.follow_bootstrap_room import FollowBootstrapRoom
from pdlb.services.dispatcher.policies.kv_aware import KVAware
from pdlb.services.dispatcher.policies.least_wait import LeastWait
from pdlb.services.dispatcher.policies.peer_dynamo_kv import PeerDynamoKV
from pdlb.services.dispatcher.policies.peer_llmd import PeerLLMD
from pdlb.services.dispatcher.policies.peer_sglang_lmetric import PeerSGLangLMetric
from pdlb.services.dispatcher.policies.peer_sglang_minimum_tokens import PeerSGLangMinimumTokens
from pdlb.services.dispatcher.policies.peer_sglang_round_robin import PeerSGLangRoundRobin
from pdlb.services.dispatcher.policies.peer_vllm_dp import PeerVLLMDP
from pdlb.services.dispatcher.policies.peer_vllm_token_score import PeerVLLMTokenScore
from pdlb.services.dispatcher.policies.predicted_latency import PredictedLatency
from pdlb.services.dispatcher.policies.round_robin import RoundRobin
from pdlb.services.dispatcher.policies.total_requests import TotalRequests
from pdlb.services.dispatcher.policies.total_tokens import TotalTokens

POLICIES: dict[str, type[Policy]] = {
    cls.name: cls
    for cls in (
        RoundRobin,
        TotalRequests,
        TotalTokens,
        FollowBootstrapRoom,
        KVAware,
        LeastWait,
        CacheAware,
        PredictedLatency,
        PeerSGLangRoundRobin,
        PeerSGLangMinimumTokens,
        PeerSGLangLMetric,
        PeerVLLMDP,
        PeerVLLMTokenScore,
        PeerDynamoKV,
        PeerLLMD,
    )
}

AUTO_BY_ROLE = {Role.MIXED: "round_robin", Role.PREFILL: "follow_bootstrap_room", Role.DECODE: "round_robin"}


def method_names() -> list[str]:
    return ["auto", *sorted(POLICIES)]


def resolve_method(method: str, role: Role) -> str:
    """`auto` becomes the role's default; other names are checked."""
    name = AUTO_BY_ROLE[role] if method == "auto" else method
    if name not in POLICIES:
        raise ValueError(f"unknown load-balance method {method!r}; choose from {', '.join(method_names())}")
    return name


def create_policy(method: str, role: Role, options: PolicyOptions) -> Policy:
    cls = POLICIES[resolve_method(method, role)]
    return cls(options, role) if cls is PredictedLatency else cls(options)
