"""Tenants at the gateway: who a request is for, and the per-tenant admission quota.

A request's tenant is its API key's name (`--api-key name=key`); with an anonymous key (or no
keys at all) it is the request body's `user` field; else "default". The tenant travels to the
replica with the request (`AddRequest.tenant`), whose scheduler shares admission fairly across
tenants (scheduler/tenants.py); here it labels the per-tenant metrics and bounds each tenant's
requests still waiting for their first token (`--tenant-max-waiting`).

`user` is free text from the client, so its tenants are bounded: the first `max_user_tenants`
distinct values get a tenant each, later new ones share "other" (so do values naming a keyed
tenant: an anonymous client must not spend a keyed tenant's quota or share). That keeps the
metrics' label sets and the replicas' per-tenant state bounded.
"""
from __future__ import annotations

from collections import Counter

from gateway.config import DEFAULT_TENANT, GatewayConfig
from gateway.errors import RETRY_AFTER_OVERLOADED_S, APIError

OVERFLOW_TENANT = "other"
"""Tenant of the `user` values beyond `max_user_tenants`."""


class Tenants:
    def __init__(self, config: GatewayConfig) -> None:
        self.max_waiting = config.tenant_max_waiting
        self.max_user_tenants = config.max_user_tenants
        self.keyed = {name for name, _ in config.all_api_keys} - {DEFAULT_TENANT}
        self.users: set[str] = set()
        self.waiting: Counter[str] = Counter()
        """Tenant -> its requests (choices) admitted here and not yet given their first token."""

    def resolve(self, key_tenant: str | None, user: str | None) -> str:
        if key_tenant is not None and key_tenant != DEFAULT_TENANT:
            return key_tenant
        if not user:
            return DEFAULT_TENANT
        if user in self.users:
            return user
        if user in self.keyed or user in (DEFAULT_TENANT, OVERFLOW_TENANT) \
                or len(self.users) >= self.max_user_tenants:
            return OVERFLOW_TENANT if user != DEFAULT_TENANT else DEFAULT_TENANT
        self.users.add(user)
        return user

    def acquire(self, tenant: str, n: int) -> None:
        """Count `n` requests of `tenant` as waiting; 429 if that passes its quota (nothing
        counted then)."""
        if self.max_waiting is not None and self.waiting[tenant] + n > self.max_waiting:
            raise APIError(
                429, f"Tenant {tenant!r} already has {self.waiting[tenant]} requests waiting for "
                     f"their first token (quota {self.max_waiting}); retry later.",
                "rate_limit_error", code="tenant_quota_exceeded",
                headers={"Retry-After": str(RETRY_AFTER_OVERLOADED_S)})
        self.waiting[tenant] += n

    def release(self, tenant: str) -> None:
        """One request of `tenant` got its first token (or ended without one)."""
        self.waiting[tenant] -= 1
        if self.waiting[tenant] <= 0:
            del self.waiting[tenant]
