"""Load-balancing methods: one module per method, behind one interface (`base.Policy`), listed in
one place (`registry.py`)."""

from pdlb.services.dispatcher.policies.base import (
    NoLiveWorker,
    Policy,
    PolicyOptions,
    RotatingPolicy,
    RouteContext,
    RoutingError,
)
from pdlb.services.dispatcher.policies.registry import (
    AUTO_BY_ROLE,
    POLICIES,
    create_policy,
    method_names,
    resolve_method,
)

__all__ = [
    "AUTO_BY_ROLE",
    "POLICIES",
    "NoLiveWorker",
    "Policy",
    "PolicyOptions",
    "RotatingPolicy",
    "RouteContext",
    "RoutingError",
    "create_policy",
    "method_names",
    "resolve_method",
]
