"""API keys, the same rule on both transports: constant-time comparison on bytes, so a key with non-ASCII
characters is simply wrong, never an error. Open without a key (REST and gRPC alike): liveness, readiness
(server and model), server metadata, /metrics, gRPC health and reflection."""

from __future__ import annotations

import hmac


def key_matches(given: bytes | str | None, keys: list[str]) -> bool:
    if given is None:
        return False
    raw = given if isinstance(given, bytes) else given.encode("utf-8", "surrogateescape")
    return any(hmac.compare_digest(raw, k.encode("utf-8")) for k in keys)
