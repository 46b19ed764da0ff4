"""The worker process that parses big JSON bodies: when it dies, the server replaces it instead of answering
500 to every big body until a restart (a newcomer killed it with SIGKILL and got 500 `internal` from then on)."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import time

import httpx
import numpy as np
import pytest

from lossd.bodyparse import BIG_JSON_BYTES, BigJsonParser, ParserLost
from tests.rest._dying import die_on_boom


def _big_body(n: int = 40_000) -> bytes:
    g = np.random.default_rng(0)
    xy = g.uniform(0, 100, (n, 2))
    boxes = np.concatenate([xy, xy + g.uniform(1, 20, (n, 2))], 1).round(3).tolist()
    body = json.dumps({"pred": boxes, "target": boxes}).encode()
    assert len(body) > BIG_JSON_BYTES
    return body


def _children(pid: int) -> list[int]:
    out = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    if int(f.read().rsplit(")", 1)[1].split()[1]) == pid:
                        out.append(int(entry))
            except (OSError, ValueError, IndexError):
                pass
    return out


def test_a_killed_worker_is_replaced(live_server):
    body = _big_body()
    url = f"{live_server.http_url}/v1/losses/giou"
    headers = {"content-type": "application/json"}
    first = httpx.post(url, content=body, headers=headers, timeout=120)
    assert first.status_code == 200, first.text
    workers = [c for c in _children(live_server.proc.pid)
               if b"multiprocessing" in open(f"/proc/{c}/cmdline", "rb").read()]
    assert workers, "no JSON worker process under the server"
    for w in workers:
        os.kill(w, signal.SIGKILL)
    time.sleep(0.2)
    again = httpx.post(url, content=body, headers=headers, timeout=120)
    assert again.status_code == 200, again.text
    assert again.json()["loss"] == first.json()["loss"]
    assert "BrokenProcessPool" not in live_server.log()


def test_a_body_that_kills_the_worker_twice_is_refused_and_the_next_one_parsed():
    async def go():
        parser = BigJsonParser(target=die_on_boom)
        try:
            with pytest.raises(ParserLost, match="died twice"):
                await parser.parse(b'{"pred": "boom"}', "v1")
            out = await parser.parse(b'{"pred": [[0, 0, 1, 1]]}', "v1")
            assert out["pred"].tolist() == [[0, 0, 1, 1]]
        finally:
            parser.close()

    asyncio.run(go())
