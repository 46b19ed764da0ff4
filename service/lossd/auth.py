"""API keys, the same rule on both transports: constant-time comparison on bytes, so a key with non-ASCII
characters is simply wrong, never an error. Open without a key (REST and gRPC alike): liveness, readiness
(server and model), server metadata, /metrics, gRPC health and reflection."""

from __future__ import annotations

import hmac
from collections.abc import Iterable


def request_key(headers: Iterable[tuple]) -> bytes | str | None:
    """The key a request gives, from its headers (REST, names as lower-case bytes) or metadata (gRPC, str): its
    only ``x-api-key`` value or ``Authorization: Bearer`` token. A request with several (two x-api-key values,
    two Bearer tokens, or one of each, equal or not) is refused on both transports: which one a proxy or a
    framework would pick differs. Authorization values of other schemes (Basic ...) are not keys."""
    keys = []
    for name, value in headers:
        if isinstance(name, bytes):
            name = name.decode("latin-1")
        name = name.lower()
        if name == "x-api-key":
            keys.append(value)
        elif name == "authorization":
            scheme = value[:6].lower()
            if scheme in (b"bearer", "bearer") and (len(value) == 6 or value[6:7] in (b" ", " ")):
                keys.append(value[7:].strip())  # an empty token counts too, as an empty x-api-key does
    return keys[0] if len(keys) == 1 else None  # none, or several: refused


def key_matches(given: bytes | str | None, keys: list[str]) -> bool:
    if given is None:
        return False
    raw = given if isinstance(given, bytes) else given.encode("utf-8", "surrogateescape")
    return any(hmac.compare_digest(raw, k.encode("utf-8")) for k in keys)
