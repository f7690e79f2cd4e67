"""The key a tenant is tracked under, shared by the admission queue and the tenant share.

A tenant name comes from the client (the request's `tenant`, its routing key or `user`), so the
maps keyed by it are bounded twice: a name is cut to `MAX_TENANT_CHARS`, and once a map holds
`max_tenants` keys, tenants it does not know share the overflow key `OVERFLOW_TENANT` (""). Both
maps use this one rule, so a tenant past the bound is queued and capped as the same overflow class.
"""

from __future__ import annotations

from collections.abc import Collection

MAX_TENANT_CHARS = 128
OVERFLOW_TENANT = ""


def tenant_key(tenant: str, known: Collection[str], max_tenants: int) -> str:
    """The key `tenant` is kept under in a map whose keys are `known` (a dict will do) and that holds at most
    `max_tenants` keys (plus the overflow key): its name cut to MAX_TENANT_CHARS when the map
    knows it or has room for it, else OVERFLOW_TENANT."""
    key = tenant[:MAX_TENANT_CHARS]
    if key in known or len(known) < max_tenants:
        return key
    return OVERFLOW_TENANT
