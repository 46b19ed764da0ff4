"""Server settings: one pydantic-settings class, read from LOSSD_* environment variables and CLI flags."""

from __future__ import annotations

import json
from typing import Annotated

from pydantic import Field, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

# a list setting from the environment: a JSON list ('["a","b"]') or comma-separated (a,b)
StrList = Annotated[list[str], NoDecode]
LOG_LEVELS = ("critical", "error", "warning", "info", "debug", "trace")  # uvicorn's names (trace: below debug)


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="LOSSD_", extra="ignore")

    host: str = Field("127.0.0.1", description="address both transports bind")
    http_port: int = Field(8000, ge=0, le=65535, description="REST port (0 picks a free one)")
    grpc_port: int = Field(50051, ge=0, le=65535, description="gRPC port (0 picks a free one)")
    device: str = Field("auto", description="auto | cpu | cuda | cuda:N")
    max_body_bytes: int = Field(64 * 2**20, gt=0, description="largest request body; larger ones get 413")
    grpc_max_message_bytes: int = Field(256 * 2**20, gt=0, description="largest gRPC message either way")
    shutdown_grace_seconds: float = Field(10.0, ge=0, description="how long in-flight calls may finish on SIGTERM")
    batching: bool = Field(True, description="coalesce concurrent small requests for the same loss")
    batch_max_rows: int = Field(65536, gt=0, description="rows in one batched engine call")
    batch_inline: bool = Field(True, description="run small fused CPU calls on the event loop (no thread hop)")
    batch_max_delay_ms: float = Field(0.0, ge=0, description="how long a small batch waits for more (0: never)")
    max_in_flight: int = Field(512, gt=0, description="requests in the server at once; more get 429 / "
                               "RESOURCE_EXHAUSTED at once")
    max_rows: int = Field(16_000_000, gt=0, description="rows (boxes) one request may carry")
    drain_seconds: float = Field(0.0, ge=0, description="on SIGTERM, how long readiness is false (new requests "
                                 "503) before the server stops taking connections")
    api_keys: StrList = Field(default_factory=list, description="if set, every request but health/metrics must "
                                "carry one (REST header x-api-key, gRPC metadata x-api-key)")
    tls_cert: str | None = Field(None, description="PEM certificate: serve HTTPS and gRPC over TLS")
    tls_key: str | None = Field(None, description="PEM private key for tls_cert")
    max_pairwise_bytes: int = Field(64 * 2**20, gt=0, description="largest pairwise answer in bytes (N x M x 4 "
                                    "for float32, x 8 for float64), refused before anything is allocated; over "
                                    "gRPC also capped by the message size")
    max_answer_bytes_in_flight: int = Field(768 * 2**20, gt=0, description="bytes of pairwise answers alive at "
                                            "once across requests: the values and the engine's temporaries while "
                                            "computing, then the values and their encoding until the last byte is "
                                            "sent; a request that does not fit waits up to answer_wait_seconds, "
                                            "then gets 429 overloaded; one larger than this alone gets 413")
    answer_wait_seconds: float = Field(10.0, ge=0, description="how long a big answer may wait for room under "
                                       "max_answer_bytes_in_flight before 429")
    send_stall_seconds: float = Field(30.0, gt=0, description="a big answer sent in slices is dropped (connection "
                                      "closed, its memory and budget freed) when the client takes none of it for "
                                      "this long")
    body_timeout_seconds: float = Field(30.0, gt=0, description="a request body must arrive whole within this "
                                        "time of its headers (slow senders get 408 and are dropped)")
    header_timeout_seconds: float = Field(10.0, gt=0, description="a request's headers must arrive whole within "
                                          "this time")
    max_header_bytes: int = Field(64 * 1024, ge=1024, description="largest request head (request line and "
                                  "headers); larger ones get 431 and the connection is closed")
    max_connections: int = Field(4096, gt=0, description="open HTTP connections at once; more get 503 (each "
                                 "idle connection costs ~10 KiB)")
    keep_alive_seconds: float = Field(5.0, gt=0, description="idle HTTP keep-alive connections close after this")
    grpc_max_connection_idle_seconds: float = Field(300.0, gt=0, description="idle gRPC connections close "
                                                    "after this")
    grpc_max_connection_age_seconds: float = Field(1800.0, gt=0, description="gRPC connections are asked to "
                                                   "reconnect after this (spreads clients over replicas)")
    grpc_max_concurrent_streams: int = Field(256, gt=0, description="concurrent calls on one gRPC connection")
    cors_origins: StrList = Field(default_factory=list, description="web-page origins allowed to call the API "
                                  "(CORS); ['*'] for any. Requests from any other page (an Origin header) get 403")
    allowed_hosts: StrList = Field(default_factory=list, description="Host names (name, name:port, *.domain) the "
                                   "server answers besides loopback ones; ['*'] for any. Bound to a loopback "
                                   "address, other names get 403 (DNS rebinding); bound elsewhere, Host is checked "
                                   "only when this is set")
    max_shm_regions: int = Field(64, ge=0, description="system shared-memory regions registered at once (each "
                                 "holds a mapping; 0 turns the extension off)")
    log_level: str = Field("info", description="logging level: critical, error, warning, info, debug or trace")
    gc_freeze: bool = Field(True, description="once warm, move the objects loaded at start-up out of Python's "
                            "garbage collections (each full collection would otherwise walk ~300k of them)")
    malloc_retain_mb: int = Field(256, ge=0, le=2**20, description="freed heap (MiB) glibc keeps for reuse instead "
                                  "of returning it to the kernel: large requests skip page faults (0: glibc's "
                                  "defaults)")

    @field_validator("device")
    @classmethod
    def _device(cls, value: str) -> str:
        name = value.strip().lower()
        if name in ("auto", "cpu", "cuda") or (name.startswith("cuda:") and name[5:].isascii() and name[5:].isdigit()):
            return name
        raise ValueError(f"LOSSD_DEVICE / --device {value[:40]!r}: expected auto, cpu, cuda or cuda:N")

    @field_validator("log_level")
    @classmethod
    def _log_level(cls, value: str) -> str:
        if value.strip().lower() in LOG_LEVELS:
            return value.strip().lower()
        raise ValueError(f"{value[:40]!r} is not a log level; expected one of {', '.join(LOG_LEVELS)}")

    @field_validator("host")
    @classmethod
    def _host(cls, value: str) -> str:
        # "[::1]" as in a URL is the address ::1; each transport adds the brackets it needs (host_port)
        return value[1:-1] if value.startswith("[") and value.endswith("]") else value

    @field_validator("api_keys", "cors_origins", "allowed_hosts", mode="before")
    @classmethod
    def _str_list(cls, value):
        if not isinstance(value, str):
            return value
        if value.lstrip().startswith("["):
            try:
                return json.loads(value)
            except ValueError as exc:
                raise ValueError(f"not a JSON list ({exc}); give a JSON list of strings, e.g. '[\"a\",\"b\"]', "
                                 "or comma-separated values, e.g. a,b") from None
        return [v.strip() for v in value.split(",") if v.strip()]


def host_port(host: str, port: int) -> str:
    """host:port as gRPC, URLs and messages write it: an IPv6 address in brackets ([::1]:50051)."""
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
