"""API keys, the same rule on both transports: constant-time comparison on bytes, so a key with non-ASCII
characters is simply wrong, never an error. Open without a key (REST and gRPC alike): liveness, readiness
(server and model), server metadata, /metrics, gRPC health and reflection."""

from __future__ import annotations

import hmac


def one_key(values: list) -> bytes | str | None:
    """The key a request gives: its only x-api-key value. A request with several is refused on both transports
    (which one a proxy or a framework would pick differs)."""
    return values[0] if len(values) == 1 else None


def key_matches(given: bytes | str | None, keys: list[str]) -> bool:
    if given is None:
        return False
    raw = given if isinstance(given, bytes) else given.encode("utf-8", "surrogateescape")
    return any(hmac.compare_digest(raw, k.encode("utf-8")) for k in keys)
