"""Same-host calls through system shared memory (Triton's extension) instead of the socket.

When the client talks to one endpoint on this host (a loopback URL) it keeps one POSIX shared-memory region,
registered with the server under a name of its own. A large loss call copies its inputs into the region, sends
only a small OIP inference request naming where each tensor lies, and reads LOSS and GRAD back from the region:
the tensors never go through HTTP/gRPC or the kernel's socket buffers. The region grows when a call needs more
and is unregistered and removed on ``close()`` (or when the process exits).

Anything that says the server cannot share memory with us (an older server without the extension, a server in
another container whose /dev/shm differs, a peer address it does not see as local, its region limit) turns the
shared-memory path off for this client; calls then go over the wire as before.

The region can also be lost while the client holds it: the server restarted, another local client unregistered
every region (Triton's example clients do at start), the region's name was unregistered and registered again on
someone else's object (the server then reads and writes that object, not ours), or our object was truncated.
Before each call the output areas are filled with a per-call sentinel (a signalling NaN with a random payload,
which arithmetic on finite inputs never produces); an answer whose outputs still hold it was written somewhere
else, and an input refused through shared memory is checked against the server's status of our region (does it
still name our object?). A lost region (``unknown_region``, ``region_truncated``, unregistered during the call, the
sentinel still there, or another object under our name) is replaced by a fresh object under a fresh name and the
call retried once; if that fails too, shared memory is turned off for this client and the call goes over the
wire. An answer is only ever taken from our own region, once.
"""

from __future__ import annotations

import asyncio
import ipaddress
import json
import os
import secrets
import threading
import uuid
import weakref
from multiprocessing import shared_memory
from typing import Any
from urllib.parse import urlparse

import numpy as np

from ._errors import RETRYABLE, InvalidInputError, LossdError
from .wire import NP_OF_OIP, OIP_OF

# copies this big are split in two, the second half on a helper thread (numpy releases the GIL while it copies):
# the server is idle while the client copies into and out of the region, so the copy can use two cores
SPLIT_COPY_BYTES = 4 << 20
_copier = None
_copier_lock = threading.Lock()


def _copy(dst: np.ndarray, src: np.ndarray) -> None:
    """dst[...] = src for flat arrays of one length, on two threads when big."""
    global _copier
    if dst.nbytes < SPLIT_COPY_BYTES:
        dst[...] = src
        return
    if _copier is None:
        with _copier_lock:
            if _copier is None:
                from concurrent.futures import ThreadPoolExecutor

                _copier = ThreadPoolExecutor(1, thread_name_prefix="lossd-shm-copy")
    half = len(dst) // 2
    other = _copier.submit(np.copyto, dst[half:], src[half:])
    np.copyto(dst[:half], src[:half])
    other.result()

# below this many input bytes a call goes over the wire: registering a region and the extra request cost more
SHM_MIN_BYTES = 256 * 1024
ALIGN = 64
# a server that refuses the region for one of these reasons cannot share memory with this client at all
UNSHAREABLE = ("forbidden", "too_many_regions")
# the server no longer holds our region as we registered it: replace it (fresh object, fresh name) and retry once
LOST = ("unknown_region", "region_truncated")


def _lost(exc: LossdError, outputs: dict) -> bool:
    """Whether a refused shared-memory call says our region is gone rather than that the call is wrong."""
    if exc.code in LOST:
        return True
    # the region was unregistered while the call ran: computed, but the outputs were not written
    return exc.field in {f"outputs.{name}" for name in outputs} and "unregistered" in exc.message


def _sentinel(itemsize: int) -> bytes:
    """A signalling NaN with a random payload: an engine computing on finite inputs never writes one (arithmetic
    gives quiet NaNs), so finding it after a call means the server did not write there."""
    if itemsize == 4:
        bits = 0x7F800000 | (secrets.randbits(22) | 1)  # quiet bit (1 << 22) clear, payload nonzero
        return bits.to_bytes(4, "little")
    bits = 0x7FF0000000000000 | (secrets.randbits(51) | 1)
    return bits.to_bytes(8, "little")


def is_loopback_url(url: str) -> bool:
    """Whether a client URL names this host (127.0.0.0/8, ::1 or localhost)."""
    p = urlparse(url if "://" in url else "grpc://" + url)
    host = (p.hostname or "").strip("[]")
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _release(mem: shared_memory.SharedMemory) -> None:
    try:
        mem.close()
    except BufferError:
        pass
    try:
        mem.unlink()
    except FileNotFoundError:
        pass


class ShmPath:
    """One client's shared-memory region and the calls that use it (one call at a time: a lock guards it).
    ``endpoint``: a blocking transport (its shm_register / shm_unregister / shm_infer)."""

    def __init__(self, endpoint: Any) -> None:
        self.endpoint = endpoint
        self.name = self._fresh_name()
        self.mem: shared_memory.SharedMemory | None = None
        self.registered = False
        self.enabled = True
        self.calls = 0  # calls answered through shared memory
        self.replaced = 0  # regions found lost and replaced
        self.lock = threading.Lock()
        self._finalizer = None

    # ------------------------------------------------------------------------------------------ the region
    @staticmethod
    def _fresh_name() -> str:
        return f"lossd_client_{uuid.uuid4().hex[:16]}"

    def _replace(self) -> None:
        """Forget a lost region: its object goes, and the next call registers a new one under a new name (the old
        name may now belong to someone else's object). The server is not asked to unregister the old name: it no
        longer names our object, and unregistering it would tear down whoever registered it since."""
        self.registered = False
        self._forget()
        self.name = self._fresh_name()
        self.replaced += 1

    def _new_region(self, size: int) -> tuple[str, int] | None:
        """A fresh region when the current one is smaller than ``size``: (key, byte_size) to register."""
        if self.mem is not None and not self._intact():
            self._replace()  # writing into our mapping past the object's end would kill this process (SIGBUS)
        if self.mem is not None and self.mem.size >= size:
            return None
        self._forget()
        size = max(size, 1 << 20)
        size = 1 << (size - 1).bit_length()  # grow in powers of two: few re-registrations
        self.mem = shared_memory.SharedMemory(self.name + f"_{size}", create=True, size=size)
        self._finalizer = weakref.finalize(self, _release, self.mem)
        return "/" + self.mem.name, self.mem.size

    def _intact(self) -> bool:
        """Whether our object still holds the whole region (someone with our user may have truncated it)."""
        try:
            return os.fstat(self.mem._fd).st_size >= self.mem.size
        except (AttributeError, OSError):
            return True  # no descriptor kept on this platform: nothing to check

    def _forget(self) -> None:
        if self._finalizer is not None:
            self._finalizer()
            self._finalizer = None
        self.mem = None

    def _refused(self, exc: LossdError) -> None:
        # transient failures go over the wire (which retries); anything else means no sharing here
        if exc.code in UNSHAREABLE or not isinstance(exc, RETRYABLE):
            self.enabled = False
        self._forget()

    def _ensure(self, size: int) -> None:
        fresh = self._new_region(size)
        if fresh is not None:
            self._unregister()
            self.endpoint.shm_register(self.name, *fresh)
            self.registered = True

    def _unregister(self) -> None:
        if self.registered:
            self.registered = False
            try:
                self.endpoint.shm_unregister(self.name)
            except Exception:  # noqa: BLE001 (the server may be gone; the region is removed here anyway)
                pass

    def close(self) -> None:
        with self.lock:
            self._unregister()
            self._forget()

    # ------------------------------------------------------------------------------------------- the call
    def wants(self, call) -> bool:
        return self.enabled and call.pred.nbytes + call.target.nbytes >= SHM_MIN_BYTES

    @staticmethod
    def _layout(call) -> tuple[list, dict, int]:
        layout, size = [], 0
        inputs = {"PRED": call.pred, "TARGET": call.target}
        if call.weights is not None:
            inputs["WEIGHTS"] = call.weights
        for name, arr in inputs.items():
            layout.append((name, np.ascontiguousarray(arr), size))
            size += -(-arr.nbytes // ALIGN) * ALIGN
        n = call.pred.shape[0] if call.pred.ndim else 1
        itemsize = max(call.pred.itemsize, 4)
        outputs = {"LOSS": (size, max(n, 1) * itemsize)}
        size += -(-outputs["LOSS"][1] // ALIGN) * ALIGN
        if call.return_grad:
            outputs["GRAD"] = (size, call.pred.size * itemsize)
            size += call.pred.size * itemsize
        return layout, outputs, size

    @staticmethod
    def _marks(call, outputs: dict) -> list[tuple[str, int, bytes]]:
        """Where the server must write (the first and last element of each output it will write) and a fresh
        sentinel for each place: (output, byte offset in the region, sentinel)."""
        itemsize = max(call.pred.itemsize, 4)
        n = call.pred.shape[0] if call.pred.ndim else 1
        counts = {"LOSS": n if call.reduction == "none" else 1, "GRAD": call.pred.size}
        marks = []
        for oname, (offset, _) in outputs.items():
            last = max(counts[oname], 1) - 1
            for at in sorted({0, last}):
                marks.append((oname, offset + at * itemsize, _sentinel(itemsize)))
        return marks

    def _written(self, marks: list, answer: list, outputs: dict) -> bool:
        """Whether the server wrote its answer into our object: no sentinel left inside what it says it wrote."""
        ends = {oname: outputs[oname][0] + int(np.prod(shape)) * NP_OF_OIP[datatype].itemsize
                for oname, datatype, shape in answer if oname in outputs}
        buf = self.mem.buf
        return all(bytes(buf[at:at + len(mark)]) != mark for oname, at, mark in marks
                   if at + len(mark) <= ends.get(oname, 0))

    def _write(self, call, layout: list, marks: list) -> tuple[list, dict]:
        tensors = []
        for name, arr, offset in layout:
            _copy(np.frombuffer(self.mem.buf, dtype=arr.dtype, count=arr.size, offset=offset), arr.reshape(-1))
            tensors.append((name, OIP_OF[arr.dtype], list(arr.shape), offset, arr.nbytes))
        for _, at, mark in marks:
            self.mem.buf[at:at + len(mark)] = mark
        params = {"box_format": call.box_format, "reduction": call.reduction, "return_grad": call.return_grad,
                  **call.params}
        return tensors, params

    def _read(self, call, answer: list, outputs: dict):
        from ._transport import LossResult

        out = {}
        for oname, datatype, shape in answer:
            dt = NP_OF_OIP[datatype]
            count = int(np.prod(shape))
            arr = np.empty(count, dtype=dt)
            _copy(arr, np.frombuffer(self.mem.buf, dtype=dt, count=count, offset=outputs[oname][0]))
            out[oname] = arr.reshape(shape)
        self.calls += 1
        loss = out["LOSS"]
        return LossResult(float(loss.reshape(-1)[0]) if call.reduction != "none" else loss, out.get("GRAD"))

    def evaluate(self, call):
        """A LossResult through shared memory, or None when the server cannot share memory with us now (for good
        unless the failure was transient); the caller then goes over the wire."""
        with self.lock:
            layout, outputs, size = self._layout(call)
            for _ in range(2):
                try:
                    self._ensure(size)
                except LossdError as exc:
                    self._refused(exc)
                    return None
                marks = self._marks(call, outputs)
                tensors, params = self._write(call, layout, marks)
                try:
                    answer = self.endpoint.shm_infer(call.name, self.name, tensors, outputs, params)
                except RETRYABLE:
                    return None  # overloaded or unavailable: the wire path retries with backoff and failover
                except LossdError as exc:
                    if not (_lost(exc, outputs)
                            or isinstance(exc, InvalidInputError) and self._taken(self._key_of())):
                        raise
                    self._replace()
                    continue
                if self._written(marks, answer, outputs):
                    return self._read(call, answer, outputs)
                self._replace()  # answered, but not into our object: the region's name was taken over
            return self._give_up()

    def _key_of(self) -> str | Exception:
        try:
            return self.endpoint.shm_key(self.name)
        except Exception as exc:  # noqa: BLE001 (judged by _taken)
            return exc

    def _taken(self, key: str | Exception) -> bool:
        """Whether a refused input came from someone else's object: the server's region under our name no longer
        names our object, so it read another process's tensors. ``key``: what the server says it holds under our
        name (or what asking raised)."""
        if isinstance(key, LossdError):
            return key.code in LOST
        if isinstance(key, Exception) or self.mem is None:
            return False  # cannot tell (an older server): the error stands
        return key.lstrip("/") != self.mem.name

    def _give_up(self) -> None:
        """The region was lost twice in one call: shared memory is off for this client, the call goes over the
        wire."""
        self.enabled = False
        self._forget()
        return None


class AsyncShmPath(ShmPath):
    """The same over an awaitable transport; one call at a time per client (an asyncio lock)."""

    def __init__(self, endpoint: Any) -> None:
        super().__init__(endpoint)
        self.alock: asyncio.Lock | None = None

    async def _aensure(self, size: int) -> None:
        fresh = self._new_region(size)
        if fresh is not None:
            await self._aunregister()
            await self.endpoint.shm_register(self.name, *fresh)
            self.registered = True

    async def _aunregister(self) -> None:
        if self.registered:
            self.registered = False
            try:
                await self.endpoint.shm_unregister(self.name)
            except Exception:  # noqa: BLE001
                pass

    async def aclose(self) -> None:
        await self._aunregister()
        self._forget()

    async def aevaluate(self, call):
        if self.alock is None:
            self.alock = asyncio.Lock()
        async with self.alock:
            layout, outputs, size = self._layout(call)
            for _ in range(2):
                try:
                    await self._aensure(size)
                except LossdError as exc:
                    self._refused(exc)
                    return None
                marks = self._marks(call, outputs)
                tensors, params = self._write(call, layout, marks)
                try:
                    answer = await self.endpoint.shm_infer(call.name, self.name, tensors, outputs, params)
                except RETRYABLE:
                    return None
                except LossdError as exc:
                    if not (_lost(exc, outputs) or isinstance(exc, InvalidInputError)
                            and self._taken(await self._akey_of())):
                        raise
                    self._replace()
                    continue
                if self._written(marks, answer, outputs):
                    return self._read(call, answer, outputs)
                self._replace()
            return self._give_up()

    async def _akey_of(self) -> str | Exception:
        try:
            return await self.endpoint.shm_key(self.name)
        except Exception as exc:  # noqa: BLE001
            return exc


# ------------------------------------------------------------------------- the requests, per transport
def _shm_params(region: str, offset: int, size: int) -> dict:
    return {"shared_memory_region": region, "shared_memory_offset": offset, "shared_memory_byte_size": size}


def http_infer_body(model: str, region: str, tensors: list, outputs: dict, params: dict) -> bytes:
    body = {"inputs": [{"name": n, "datatype": dt, "shape": shape, "parameters": _shm_params(region, off, size)}
                       for n, dt, shape, off, size in tensors],
            "outputs": [{"name": n, "parameters": _shm_params(region, off, size)}
                        for n, (off, size) in outputs.items()],
            "parameters": params}
    return json.dumps(body).encode()


def http_outputs(resp_json: dict) -> list:
    return [(o["name"], o["datatype"], list(o["shape"])) for o in resp_json["outputs"]]


def infer_parameter(oip_pb, value: Any):
    if isinstance(value, bool):
        return oip_pb.InferParameter(bool_param=value)
    if isinstance(value, int):
        return oip_pb.InferParameter(int64_param=value)
    if isinstance(value, float):
        return oip_pb.InferParameter(double_param=value)
    return oip_pb.InferParameter(string_param=str(value))


def grpc_infer_request(oip_pb, model: str, region: str, tensors: list, outputs: dict, params: dict):
    def p(d: dict) -> dict:
        return {k: infer_parameter(oip_pb, v) for k, v in d.items()}

    req = oip_pb.ModelInferRequest
    return req(model_name=model, parameters=p(params),
               inputs=[req.InferInputTensor(name=n, datatype=dt, shape=shape,
                                            parameters=p(_shm_params(region, off, size)))
                       for n, dt, shape, off, size in tensors],
               outputs=[req.InferRequestedOutputTensor(name=n, parameters=p(_shm_params(region, off, size)))
                        for n, (off, size) in outputs.items()])
