"""Big JSON bodies parsed in a worker process, into numpy arrays.

A JSON parser and the conversion of nested lists to arrays hold the GIL for their whole run (seconds for tens of
MiB), so a thread does not keep the event loop free: health probes and gRPC calls would wait behind them. Bodies
over BIG_JSON_BYTES go to a small process pool instead; the arrays come back pickled (a memory copy), so the
server process never walks the lists. The worker imports neither torch nor the server: it starts in ~0.2 s.
"""

from __future__ import annotations

import asyncio
import json
import math
import multiprocessing
import re
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from typing import Any, Callable

import numpy as np
import orjson

BIG_JSON_BYTES = 1 << 20
V1_ARRAYS = ("pred", "target", "weights", "boxes1", "boxes2")


class BodyError(ValueError):
    """The body is not JSON (code invalid_json), or nested too deeply."""


class NotNumbers(ValueError):
    """An array field holds JSON true/false among its numbers (numpy would read them as 1 and 0): ``field`` and
    the ``rows`` that do."""

    def __init__(self, field: str, rows: list[int]) -> None:
        super().__init__(field, rows)
        self.field = field
        self.rows = rows


# true/false as an element of a JSON array (after '[' or ','): only then are the arrays searched for booleans
BOOL_IN_ARRAY = re.compile(rb"[\[,]\s*(?:true|false)")


def rows_where(value: list, row_size: int, leaf: Callable[[Any], bool]) -> list[int]:
    """Rows (first index) of a nested list holding, at any depth, an element for which ``leaf`` is true; a flat
    list's elements are grouped in rows of ``row_size``."""
    def has(v: Any) -> bool:
        return any(has(x) for x in v) if isinstance(v, list) else leaf(v)

    flat = all(not isinstance(v, list) for v in value)
    rows = [i // (row_size if flat else 1) for i, v in enumerate(value) if has(v)]
    return sorted(set(rows))


def bool_rows(value: list, row_size: int = 1) -> list[int]:
    return rows_where(value, row_size, lambda v: isinstance(v, bool))


def row_size(shape: Any) -> int:
    """Elements per row of an OIP input's flat data, from its declared shape (1 when the shape is not usable)."""
    if isinstance(shape, list) and len(shape) > 1 and all(type(d) is int and d > 0 for d in shape):
        return math.prod(shape[1:])
    return 1


def refuse_bools(raw: bytes | memoryview, obj: Any, kind: str) -> None:
    """Raises NotNumbers when an array field of a parsed body ('v1': pred, target, ...; 'oip': each input's data,
    unless its datatype is BOOL) holds true/false. Cheap unless the raw body has a boolean inside an array."""
    if not isinstance(obj, dict) or not BOOL_IN_ARRAY.search(raw):
        return
    fields = []
    if kind == "v1":
        fields = [(key, obj[key], 1) for key in V1_ARRAYS if isinstance(obj.get(key), list)]
    elif isinstance(obj.get("inputs"), list):
        for entry in obj["inputs"]:
            if (isinstance(entry, dict) and isinstance(entry.get("name"), str) and isinstance(entry.get("data"), list)
                    and entry.get("datatype") != "BOOL"):
                fields.append((f"inputs.{entry['name']}.data", entry["data"], row_size(entry.get("shape"))))
    for field, value, size in fields:
        rows = bool_rows(value, size)
        if rows:
            raise NotNumbers(field, rows)


class ParserLost(RuntimeError):
    """The worker died twice on this body (out of memory, most likely)."""


def _int(text: str) -> int | float:
    """A JSON integer; one too long for Python's int parser (4300 digits) is far beyond float64 anyway: inf, which
    the engine names as non_finite like 1e400."""
    return int(text) if len(text) <= 4000 else float(text)


def loads(data: bytes | memoryview, what: str) -> Any:
    """JSON from client bytes. orjson first; the stdlib reads NaN/Infinity too, so the engine can name their rows."""
    try:
        return orjson.loads(data)
    except orjson.JSONDecodeError as first:
        if "recursion" in str(first).lower():
            raise BodyError(f"{what} is nested too deeply") from None
        try:
            return json.loads(bytes(data), parse_int=_int)
        except RecursionError:
            raise BodyError(f"{what} is nested too deeply") from None
        except (ValueError, UnicodeError):
            text = str(first)
            raise BodyError(f"{what} is not valid JSON: {text[:200]}") from None


def _numeric(value: Any) -> Any:
    """A rectangular list of numbers as an array; anything else unchanged (the engine names what is wrong)."""
    if not isinstance(value, list):
        return value
    try:
        arr = np.asarray(value)
    except (ValueError, OverflowError, TypeError, RecursionError):
        return value
    return arr if arr.dtype.kind in "biuf" else value


def parse(data: bytes, kind: str) -> Any:
    """kind 'v1': a /v1 body, its array fields as numpy; 'oip': an OIP JSON request, each input's data as numpy.
    Raises BodyError."""
    out = loads(data, "the body" if kind == "v1" else "the request header")
    refuse_bools(data, out, kind)
    if kind == "v1" and isinstance(out, dict):
        for key in V1_ARRAYS:
            if key in out:
                out[key] = _numeric(out[key])
    elif kind == "oip" and isinstance(out, dict) and isinstance(out.get("inputs"), list):
        for entry in out["inputs"]:
            if isinstance(entry, dict) and "data" in entry:
                entry["data"] = _numeric(entry["data"])
    return out


class BigJsonParser:
    """One worker process, started on first use (most servers never see a body this big)."""

    def __init__(self, workers: int = 1, target=None) -> None:
        self.workers = workers
        self.target = target or parse  # what the worker runs (tests give one that dies)
        self._pool: ProcessPoolExecutor | None = None

    async def parse(self, data: bytes, kind: str) -> Any:
        """The parsed body. A worker that dies (killed, or out of memory) is replaced and the body tried once
        more in the new one; a second death is ParserLost, and the server carries on with a fresh worker."""
        for attempt in (1, 2):
            pool = await self._ready()
            try:
                return await asyncio.get_running_loop().run_in_executor(pool, self.target, data, kind)
            except BrokenProcessPool:
                if self._pool is pool:  # the first of the calls that saw it die replaces it
                    self._pool = None
                    pool.shutdown(wait=False, cancel_futures=True)
        raise ParserLost(f"the JSON parser process died twice reading this {len(data)}-byte body (out of "
                         "memory?); send it in smaller requests, or as binary tensors (/v2 or gRPC)")

    async def _ready(self) -> ProcessPoolExecutor:
        if self._pool is None:
            # starting a worker blocks its caller until the new interpreter has read its start-up data (~0.5 s):
            # done in a thread, so the event loop goes on meanwhile
            pool = await asyncio.to_thread(self._start)
            if self._pool is None:
                self._pool = pool
            else:
                pool.shutdown(wait=False)
        return self._pool

    def _start(self) -> ProcessPoolExecutor:
        pool = ProcessPoolExecutor(self.workers, mp_context=multiprocessing.get_context("spawn"))
        pool.submit(int).result()
        return pool

    def close(self) -> None:
        """Called after the in-flight calls drained: the worker is idle, so waiting for it is quick, and lets the
        pool release its semaphores before the interpreter exits (else multiprocessing warns of leaked ones)."""
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._pool = None
