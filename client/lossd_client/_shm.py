"""Same-host calls through system shared memory (Triton's extension) instead of the socket.

When the client talks to one endpoint on this host (a loopback URL), a large loss call copies its inputs into a
POSIX shared-memory region registered with the server under a name of the client's own, sends only a small OIP
inference request naming where each tensor lies, and the server writes LOSS and GRAD into the same region: the
tensors never go through HTTP/gRPC or the kernel's socket buffers. A big answer (1 MiB or more) is handed to the
caller as arrays that are views of the region, not copies; that region is then lent to the caller and the next
call uses another one, until the caller lets go of the arrays. A client keeps at most MAX_REGIONS regions and
never lends its last free one (that call's answer is copied out), so keeping every answer costs no more regions.
Regions grow when a call needs more and are unregistered and removed on ``close()`` (or when the process exits);
arrays the caller still holds keep their memory until they go.

Anything that says the server cannot share memory with us (an older server without the extension, a server in
another container whose /dev/shm differs, a peer address it does not see as local, its region limit before we
hold any region) turns the shared-memory path off for this client; calls then go over the wire as before. The
server's region limit or a full /dev/shm once we hold regions only stops the client making more.

A region can also be lost while the client holds it: the server restarted, another local client unregistered
every region (Triton's example clients do at start), the region's name was unregistered and registered again on
someone else's object (the server then reads and writes that object, not ours), or our object was truncated.
Before each call the output areas are filled with a per-call sentinel (a signalling NaN with a random payload,
which arithmetic on finite inputs never produces); an answer whose outputs still hold it was written somewhere
else, and an input refused through shared memory is checked against the server's status of our region (does it
still name our object?). Inputs and outputs of a call always share one region, so an answer found in our object
was computed from our inputs. A lost region (``unknown_region``, ``region_truncated``, unregistered during the
call, the sentinel still there, or another object under our name) is replaced by a fresh object under a fresh
name and the call retried once; if that fails too, shared memory is turned off for this client and the call goes
over the wire. An answer is only ever taken from our own region, once.
"""

from __future__ import annotations

import asyncio
import errno
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

# copies this big are split in two, one half on a helper thread (numpy releases the GIL while it copies):
# the server is idle while the client copies into and out of the region, so the copy can use two cores
SPLIT_COPY_BYTES = 4 << 20
_copier = None
_copier_lock = threading.Lock()


def _copy_all(pairs: list[tuple[np.ndarray, np.ndarray]]) -> None:
    """dst[...] = src for each (dst, src) pair of flat arrays of one length; when there is much to copy, a helper
    thread takes half of the bytes (one hand-off for all the pairs)."""
    global _copier
    total = sum(dst.nbytes for dst, _ in pairs)
    if total < SPLIT_COPY_BYTES:
        for dst, src in pairs:
            dst[...] = src
        return
    if _copier is None:
        with _copier_lock:
            if _copier is None:
                from concurrent.futures import ThreadPoolExecutor

                _copier = ThreadPoolExecutor(1, thread_name_prefix="lossd-shm-copy")
    mine, theirs, taken = [], [], 0
    for dst, src in pairs:  # the first half of the bytes here, the rest on the helper
        room = max(0, total // 2 - taken) // max(dst.itemsize, 1)
        cut = min(len(dst), room)
        mine.append((dst[:cut], src[:cut]))
        theirs.append((dst[cut:], src[cut:]))
        taken += cut * dst.itemsize
    other = _copier.submit(_copy_pairs, theirs)
    _copy_pairs(mine)
    other.result()


def _copy_pairs(pairs: list) -> None:
    for dst, src in pairs:
        if len(dst):
            np.copyto(dst, src)


# a call on the caller's SharedInputs that must take the ordinary path (copy its inputs into a pool region)
COPY = object()
# below this many input bytes a call goes over the wire: registering a region and the extra request cost more
SHM_MIN_BYTES = 256 * 1024
# answers this big are handed to the caller as views of their region (_Region.lend) instead of being copied out
LEND_MIN_BYTES = 1 << 20
# regions one client keeps: the previous call's answer is usually still held while the next call runs
MAX_REGIONS = 3
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
    """Unregistered and forgotten: close and remove the object. A mapping that answers handed to the caller still
    view stays until the last of them goes (then Python unmaps it); only the descriptor is closed now."""
    try:
        mem.close()
    except BufferError:
        fd = getattr(mem, "_fd", -1)
        if fd >= 0:
            os.close(fd)
            mem._fd = -1
        mem._mmap = None  # the caller's arrays hold the mapping
    try:
        mem.unlink()
    except FileNotFoundError:
        pass


class NoRoom(Exception):
    """/dev/shm cannot hold another region."""


class _Region:
    """One shared-memory object registered with the server under a name of its own. A call writes its inputs into
    a free region and the server writes the outputs after them. A big answer is handed to the caller as views of
    the region (no copy out); the region is then ``lent`` and not written again until the last of those arrays
    is gone."""

    def __init__(self, size: int) -> None:
        self.name = f"lossd_client_{uuid.uuid4().hex[:16]}"
        self.mem = shared_memory.SharedMemory(self.name + f"_{size}", create=True, size=size)
        self.registered = False
        self.lent = False
        self._finalizer = weakref.finalize(self, _release, self.mem)
        fd = getattr(self.mem, "_fd", -1)
        if fd >= 0 and hasattr(os, "posix_fallocate"):
            # take the memory now: /dev/shm can be small (64 MB in a default Docker container), and a page the
            # object cannot get would otherwise kill this process (SIGBUS) when the copy touches it
            try:
                os.posix_fallocate(fd, 0, size)
            except OSError as exc:
                if exc.errno in (errno.ENOSPC, errno.ENOMEM, errno.EFBIG):
                    self.drop()
                    raise NoRoom(f"/dev/shm has no room for a {size}-byte region: {exc.strerror}") from None
                # a file system that cannot reserve space: used as before

    @property
    def key(self) -> str:
        return "/" + self.mem.name

    def intact(self) -> bool:
        """Whether our object still holds the whole region (someone with our user may have truncated it: writing
        into our mapping past the object's end would kill this process with SIGBUS)."""
        try:
            return os.fstat(self.mem._fd).st_size >= self.mem.size
        except (AttributeError, OSError):
            return True  # no descriptor kept on this platform: nothing to check

    def lend(self) -> np.ndarray:
        """The whole region as one array that every answer array is a view of: while any of them lives, the
        region is lent."""
        whole = np.frombuffer(self.mem.buf, dtype=np.uint8)
        self.lent = True
        weakref.finalize(whole, self._returned)
        return whole

    def _returned(self) -> None:
        self.lent = False

    def drop(self) -> None:
        """Close and remove the object (arrays the caller holds keep their memory until they go)."""
        self._finalizer()


_PATHS: "weakref.WeakSet[ShmPath]" = weakref.WeakSet()


def _before_fork() -> None:
    for path in list(_PATHS):
        path._before_fork()


def _after_fork_in_child() -> None:
    global _copier
    _copier = None  # its thread did not come along: a copy handed to it would wait forever
    for path in list(_PATHS):
        path._after_fork_in_child()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(before=_before_fork, after_in_child=_after_fork_in_child)


class ShmPath:
    """One client's shared-memory regions and the calls that use them (one call at a time: a lock guards it).
    ``endpoint``: a blocking transport (its shm_register / shm_unregister / shm_infer).

    Each call uses one free region for all its tensors. A big answer is lent to the caller (views of its region),
    so the next call takes another region: up to MAX_REGIONS, and the last free one is never lent (its answer is
    copied out), so a caller that keeps every answer still gets through without more regions."""

    def __init__(self, endpoint: Any) -> None:
        self.endpoint = endpoint
        self.pool: list[_Region] = []
        self.current: _Region | None = None  # the region of the latest call
        self.max_regions = MAX_REGIONS  # lowered when the server refuses more (its region limit)
        self.enabled = True
        self.calls = 0  # calls answered through shared memory
        self.replaced = 0  # regions found lost and replaced
        self.retired: list[_Region] = []  # lent when the process forked: never reused, unregistered at the next call
        self.shared: list[weakref.ref] = []  # the caller's SharedInputs (their regions are theirs, not the pool's)
        self.lock = threading.Lock()
        self._adopting = threading.Lock()
        _PATHS.add(self)

    # ------------------------------------------------------------------------------------------------ fork
    def _before_fork(self) -> None:
        """In the parent, just before a fork: a child gets views of every lent region (shared pages, not a copy
        on write), so those regions are never written again by us; their objects go now (removed from /dev/shm),
        their memory when the last view in any process does."""
        for region in [r for r in self.pool if r.lent]:
            self.pool.remove(region)
            if region is self.current:
                self.current = None
            try:
                region.mem.unlink()
            except FileNotFoundError:
                pass
            self.retired.append(region)
        for si in self._inputs():
            for slot in si.slots:
                slot.retired = slot.retired or slot.held

    def _after_fork_in_child(self) -> None:
        """In the child: the regions belong to the parent (their names are registered by it and it removes them):
        forget them without touching them; the child makes its own when it calls."""
        for region in self.pool + self.retired:
            region._finalizer.detach()
        for si in self._inputs():
            si.forked()
        self.pool, self.retired, self.current, self.shared = [], [], None, []
        self.lock, self._adopting = threading.Lock(), threading.Lock()

    def _retired_names(self) -> list[str]:
        gone, self.retired = self.retired, []
        return [r.name for r in gone if r.registered]

    @property
    def name(self) -> str | None:
        return self.current.name if self.current is not None else None

    @property
    def mem(self) -> shared_memory.SharedMemory | None:
        return self.current.mem if self.current is not None else None

    # ----------------------------------------------------------------------------------------- the regions
    def _replace(self) -> None:
        """Forget every region after one was lost: the next call registers a new one under a new name (the old
        names may now belong to someone else's object). The server is not asked to unregister the old names: a
        lost one no longer names our object, and unregistering it would tear down whoever registered it since.
        Arrays the caller holds keep their memory."""
        self._dropped()
        self.replaced += 1

    def _pick(self, size: int) -> tuple[_Region | None, _Region | None]:
        """A free region of at least ``size`` bytes: (region, None) when it is registered already, else (a new
        region to register, a free one it replaces, to unregister, or None); (None, None) when every region is
        lent and no more may be made (the call then goes over the wire)."""
        for region in [r for r in self.pool if not r.lent and not r.intact()]:
            # truncated by someone of our user: a fresh object under a fresh name
            self.pool.remove(region)
            region.drop()
            self.replaced += 1
        free = [r for r in self.pool if not r.lent]
        for region in free:
            if region.mem.size >= size:
                return region, None
        old = None
        if len(self.pool) >= self.max_regions:
            if not free:
                return None, None
            old = free[0]  # too small: replaced by a bigger one
            self.pool.remove(old)
        try:
            region = _Region(_rounded(size))
        except NoRoom:
            if old is not None:
                self.pool.append(old)
            # no room for more: use the regions there are (their answers copied out once the last is lent), and
            # this call goes over the wire
            self.max_regions = len(self.pool)
            if not self.pool and not self._inputs():
                self.enabled = False  # nothing shared with the server: off, calls go over the wire
            return None, None
        self.pool.append(region)
        return region, old

    def _lends(self, region: _Region, out_bytes: int) -> bool:
        """Whether this call's answer is handed over as views of its region: a big answer, and another region is
        free or can still be made."""
        if out_bytes < LEND_MIN_BYTES:
            return False
        return len(self.pool) < self.max_regions or any(not r.lent for r in self.pool if r is not region)

    def _registered(self, region: _Region) -> None:
        region.registered = True
        self.current = region

    def _not_registered(self, region: _Region, exc: LossdError) -> None:
        """The server refused a new region. With regions of ours already registered (all lent) this is its
        region limit for us: use no more than those, and send this call over the wire. Otherwise shared memory is
        off for this client unless the failure was transient."""
        self.pool.remove(region)
        region.drop()
        if any(r.registered for r in self.pool) and exc.code in UNSHAREABLE:
            self.max_regions = max(1, len(self.pool))
            return
        if exc.code in UNSHAREABLE or not isinstance(exc, RETRYABLE):
            self.enabled = False

    def _dropped(self) -> list[_Region]:
        """Forget every region; those registered, for the caller to unregister."""
        gone, self.pool, self.current = self.pool, [], None
        for region in gone:
            region.drop()
        return [r for r in gone if r.registered]

    # ---------------------------------------------------------------- the caller's SharedInputs (_inputs.py)
    def _adopt(self, si) -> None:
        with self._adopting:
            self.shared = [ref for ref in self.shared if ref() is not None] + [weakref.ref(si)]

    def _let_go(self, region: _Region) -> None:
        """A SharedInputs closed or gone: its object is removed now, its name unregistered at the next call."""
        region.drop()
        self.retired.append(region)

    def _inputs(self) -> list:
        return [si for si in (ref() for ref in self.shared) if si is not None]

    def _closed_inputs(self) -> list[_Region]:
        """close(): every SharedInputs closed; their registered regions, to unregister."""
        regions = []
        for si in self._inputs():
            if si.closed:
                continue  # closed by the caller: already among the retired
            si.closed = True
            if si.region is not None and si.region.registered:
                regions.append(si.region)
            if si.region is not None:
                si._finalizer.detach()
                si.region.drop()
        self.shared = []
        return regions

    def _in_place(self, call):
        """(SharedInputs, answer slot, tensors, outputs) when every tensor of the call lies in the inputs part of
        one of the caller's SharedInputs and one of its answer places is free; else None (the inputs are copied)."""
        arrays = {"PRED": call.pred, "TARGET": call.target}
        if call.weights is not None:
            arrays["WEIGHTS"] = call.weights
        if any(arr.dtype not in OIP_OF for arr in arrays.values()):
            return None
        for si in self._inputs():
            at = si.offsets(arrays)
            if at is None:
                continue
            slot = si.free_slot()
            if slot is None:
                return None
            n = call.pred.shape[0] if call.pred.ndim else 1
            itemsize = max(call.pred.itemsize, 4)
            outputs = si.outputs(slot, n, call.pred.size * itemsize, itemsize, call.return_grad)
            if outputs is None:
                return None
            tensors = [(name, OIP_OF[arr.dtype], list(arr.shape), at[name], arr.nbytes)
                       for name, arr in arrays.items()]
            return si, slot, tensors, outputs
        return None

    def _mark(self, si, call, outputs: dict) -> list:
        marks = self._marks(call, outputs)
        buf = si.buf  # not region.mem.buf: None once si is closed, maybe by another thread during this call
        for _, at, mark in marks:
            buf[at:at + len(mark)] = mark
        return marks

    def _not_in_place(self, si, exc: LossdError):
        """The server refused to register a SharedInputs region: the wire for a transient failure (None), else
        this and later calls on it copy their inputs (COPY)."""
        if isinstance(exc, RETRYABLE):
            return None
        si.shareable = False
        return COPY

    def _refused_in_place(self, si, exc: LossdError, outputs: dict, place) -> Any:
        """A refused call on a SharedInputs: its region lost or taken over (COPY: the call takes the ordinary path
        and the region is registered under a fresh name next time), or the call is wrong (raised)."""
        if _lost(exc, outputs) or isinstance(exc, InvalidInputError) and self._taken(si.region, place):
            return self._lost_in_place(si)
        raise exc

    def _lost_in_place(self, si):
        si.lost()
        self.replaced += 1
        return COPY

    def _answer_in_place(self, fast, call, marks: list, answer: list):
        si, slot, _, outputs = fast
        if not self._written(si.buf, marks, answer, outputs):
            return self._lost_in_place(si)  # answered, but not into our object: its name was taken over
        out_bytes = sum(size for _, size in outputs.values())
        whole = slot.lend(si.buf) if out_bytes >= LEND_MIN_BYTES else None
        return self._read(si.buf, call, answer, outputs, whole)

    def _call_in_place(self, fast, call):
        """A call on the caller's SharedInputs: its LossResult, None for the wire, or COPY for the ordinary path."""
        si, _, tensors, outputs = fast
        region = si.region
        if not region.registered:
            if not si.registrable():
                return COPY
            try:
                self.endpoint.shm_register(region.name, region.key, region.mem.size)
            except LossdError as exc:
                return self._not_in_place(si, exc)
            region.registered = True
        elif not si.whole():
            return COPY
        marks = self._mark(si, call, outputs)
        try:
            answer = self.endpoint.shm_infer(call.name, region.name, tensors, outputs, self._params(call))
        except RETRYABLE:
            return None
        except LossdError as exc:
            place = self._place_of(region) if isinstance(exc, InvalidInputError) else None
            return self._refused_in_place(si, exc, outputs, place)
        return self._answer_in_place(fast, call, marks, answer)

    def close(self) -> None:
        with self.lock:
            self.enabled = False  # a call after close() makes no region (the transport refuses it)
            for name in [r.name for r in self._dropped() + self._closed_inputs()] + self._retired_names():
                _quiet(self.endpoint.shm_unregister, name)

    # ------------------------------------------------------------------------------------------- the call
    def wants(self, call) -> bool:
        """Big calls, and any call on the caller's SharedInputs (nothing to copy)."""
        if not self.enabled:
            return False
        if call.pred.nbytes + call.target.nbytes >= SHM_MIN_BYTES:
            return True
        return any(si.offsets({"PRED": call.pred}) is not None for si in self._inputs())

    @staticmethod
    def _layout(call) -> tuple[list, dict, int, int]:
        """The inputs' places, the outputs' (offset, byte_size), the bytes all take, and the outputs' bytes."""
        layout, size = [], 0
        inputs = {"PRED": call.pred, "TARGET": call.target}
        if call.weights is not None:
            inputs["WEIGHTS"] = call.weights
        for name, arr in inputs.items():
            layout.append((name, np.ascontiguousarray(arr), size))
            size += -(-arr.nbytes // ALIGN) * ALIGN
        start = size
        n = call.pred.shape[0] if call.pred.ndim else 1
        itemsize = max(call.pred.itemsize, 4)
        outputs = {"LOSS": (size, max(n, 1) * itemsize)}
        size += -(-outputs["LOSS"][1] // ALIGN) * ALIGN
        if call.return_grad:
            outputs["GRAD"] = (size, call.pred.size * itemsize)
            size += call.pred.size * itemsize
        return layout, outputs, size, size - start

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

    @staticmethod
    def _written(buf, marks: list, answer: list, outputs: dict) -> bool:
        """Whether the server wrote its answer into our object (``buf``, its memory): no sentinel left inside what
        it says it wrote."""
        ends = {oname: outputs[oname][0] + int(np.prod(shape)) * NP_OF_OIP[datatype].itemsize
                for oname, datatype, shape in answer if oname in outputs}
        return all(bytes(buf[at:at + len(mark)]) != mark for oname, at, mark in marks
                   if at + len(mark) <= ends.get(oname, 0))

    @staticmethod
    def _write(region: _Region, call, layout: list, marks: list) -> tuple[list, dict]:
        buf = region.mem.buf
        _copy_all([(np.frombuffer(buf, dtype=arr.dtype, count=arr.size, offset=offset), arr.reshape(-1))
                   for _, arr, offset in layout])
        tensors = [(name, OIP_OF[arr.dtype], list(arr.shape), offset, arr.nbytes) for name, arr, offset in layout]
        for _, at, mark in marks:
            buf[at:at + len(mark)] = mark
        return tensors, ShmPath._params(call)

    @staticmethod
    def _params(call) -> dict:
        return {"box_format": call.box_format, "reduction": call.reduction, "return_grad": call.return_grad,
                **call.params}

    def _read(self, buf, call, answer: list, outputs: dict, whole: np.ndarray | None):
        """The answer: views of ``whole`` (the region, lent until the caller lets go of them), or copies out of
        ``buf`` (the region's memory) when ``whole`` is None."""
        from ._transport import LossResult

        out = {}
        for oname, datatype, shape in answer:
            dt = NP_OF_OIP[datatype]
            count = int(np.prod(shape))
            at = outputs[oname][0]
            if whole is not None:
                out[oname] = whole[at:at + count * dt.itemsize].view(dt).reshape(shape)
            else:
                arr = np.empty(count, dtype=dt)
                _copy_all([(arr, np.frombuffer(buf, dtype=dt, count=count, offset=at))])
                out[oname] = arr.reshape(shape)
        self.calls += 1
        loss = out["LOSS"]
        if call.reduction != "none":
            loss = float(loss.reshape(-1)[0])
        return LossResult(loss, out.get("GRAD"))

    def _refused_call(self, exc: LossdError, region: _Region, outputs: dict, place: tuple | Exception | None) -> bool:
        """Whether a refused call says our region is lost (then every region is forgotten and the call retried)
        rather than that the call is wrong. ``place``: what the server holds under the region's name, asked only
        for an input error (None otherwise)."""
        if _lost(exc, outputs) or isinstance(exc, InvalidInputError) and self._taken(region, place):
            self._replace()
            return True
        return False

    def evaluate(self, call):
        """A LossResult through shared memory, or None when the server cannot share memory with us now (for good
        unless the failure was transient); the caller then goes over the wire."""
        with self.lock:
            for name in self._retired_names():
                _quiet(self.endpoint.shm_unregister, name)
            fast = self._in_place(call)
            if fast is not None:
                out = self._call_in_place(fast, call)
                if out is not COPY:
                    return out
            layout, outputs, size, out_bytes = self._layout(call)
            for _ in range(2):
                region, old = self._pick(size)
                if region is None:
                    return None
                if old is not None:
                    old.drop()
                    if old.registered:
                        _quiet(self.endpoint.shm_unregister, old.name)
                if not region.registered:
                    try:
                        self.endpoint.shm_register(region.name, region.key, region.mem.size)
                    except LossdError as exc:
                        self._not_registered(region, exc)
                        return None
                self._registered(region)
                marks = self._marks(call, outputs)
                tensors, params = self._write(region, call, layout, marks)
                try:
                    answer = self.endpoint.shm_infer(call.name, region.name, tensors, outputs, params)
                except RETRYABLE:
                    return None  # overloaded or unavailable: the wire path retries with backoff and failover
                except LossdError as exc:
                    place = self._place_of(region) if isinstance(exc, InvalidInputError) else None
                    if not self._refused_call(exc, region, outputs, place):
                        raise
                    continue
                if self._written(region.mem.buf, marks, answer, outputs):
                    whole = region.lend() if self._lends(region, out_bytes) else None
                    return self._read(region.mem.buf, call, answer, outputs, whole)
                self._replace()  # answered, but not into our object: the region's name was taken over
            return self._give_up()

    def _place_of(self, region: _Region) -> tuple | Exception:
        try:
            return self.endpoint.shm_place(region.name)
        except Exception as exc:  # noqa: BLE001 (judged by _taken)
            return exc

    @staticmethod
    def _taken(region: _Region, place: tuple | Exception) -> bool:
        """Whether a refused call came from a region someone else registered under our name: it no longer names
        our whole object (another object, or ours at another offset or size), so the server read or checked
        something other than what we wrote. ``place``: the (key, offset, byte_size) the server holds under our
        name (or what asking raised)."""
        if isinstance(place, LossdError):
            return place.code in LOST
        if isinstance(place, Exception):
            return False  # cannot tell (an older server): the error stands
        key, offset, size = place
        return key.lstrip("/") != region.mem.name or offset != 0 or size != region.mem.size

    def _give_up(self) -> None:
        """The region was lost twice in one call: shared memory is off for this client, the call goes over the
        wire."""
        self.enabled = False
        self._dropped()
        return None


def _quiet(fn, *args) -> None:
    try:
        fn(*args)
    except Exception:  # noqa: BLE001 (the server may be gone; the region is removed here anyway)
        pass


async def _aquiet(fn, *args) -> None:
    try:
        await fn(*args)
    except Exception:  # noqa: BLE001
        pass


def _rounded(size: int) -> int:
    """A region's size: at least 1 MiB, rounded up to an eighth of a power of two (few re-registrations as calls
    grow, at most 12.5% unused)."""
    size = max(size, 1 << 20)
    step = 1 << max((size - 1).bit_length() - 3, 0)
    return -(-size // step) * step


class AsyncShmPath(ShmPath):
    """The same over an awaitable transport; one call at a time per client (an asyncio lock)."""

    def __init__(self, endpoint: Any) -> None:
        super().__init__(endpoint)
        self.alock: asyncio.Lock | None = None

    async def aclose(self) -> None:
        self.enabled = False
        for name in [r.name for r in self._dropped() + self._closed_inputs()] + self._retired_names():
            await _aquiet(self.endpoint.shm_unregister, name)

    def _after_fork_in_child(self) -> None:
        super()._after_fork_in_child()
        self.alock = None  # bound to the parent's event loop

    async def aevaluate(self, call):
        if self.alock is None:
            self.alock = asyncio.Lock()
        async with self.alock:
            for name in self._retired_names():
                await _aquiet(self.endpoint.shm_unregister, name)
            fast = self._in_place(call)
            if fast is not None:
                out = await self._acall_in_place(fast, call)
                if out is not COPY:
                    return out
            layout, outputs, size, out_bytes = self._layout(call)
            for _ in range(2):
                region, old = self._pick(size)
                if region is None:
                    return None
                if old is not None:
                    old.drop()
                    if old.registered:
                        await _aquiet(self.endpoint.shm_unregister, old.name)
                if not region.registered:
                    try:
                        await self.endpoint.shm_register(region.name, region.key, region.mem.size)
                    except LossdError as exc:
                        self._not_registered(region, exc)
                        return None
                self._registered(region)
                marks = self._marks(call, outputs)
                tensors, params = self._write(region, call, layout, marks)
                try:
                    answer = await self.endpoint.shm_infer(call.name, region.name, tensors, outputs, params)
                except RETRYABLE:
                    return None
                except LossdError as exc:
                    place = await self._aplace_of(region) if isinstance(exc, InvalidInputError) else None
                    if not self._refused_call(exc, region, outputs, place):
                        raise
                    continue
                if self._written(region.mem.buf, marks, answer, outputs):
                    whole = region.lend() if self._lends(region, out_bytes) else None
                    return self._read(region.mem.buf, call, answer, outputs, whole)
                self._replace()
            return self._give_up()

    async def _acall_in_place(self, fast, call):
        si, _, tensors, outputs = fast
        region = si.region
        if not region.registered:
            if not si.registrable():
                return COPY
            try:
                await self.endpoint.shm_register(region.name, region.key, region.mem.size)
            except LossdError as exc:
                return self._not_in_place(si, exc)
            region.registered = True
        elif not si.whole():
            return COPY
        marks = self._mark(si, call, outputs)
        try:
            answer = await self.endpoint.shm_infer(call.name, region.name, tensors, outputs, self._params(call))
        except RETRYABLE:
            return None
        except LossdError as exc:
            place = await self._aplace_of(region) if isinstance(exc, InvalidInputError) else None
            return self._refused_in_place(si, exc, outputs, place)
        return self._answer_in_place(fast, call, marks, answer)

    async def _aplace_of(self, region: _Region) -> tuple | Exception:
        try:
            return await self.endpoint.shm_place(region.name)
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
