"""Input arrays that already lie in shared memory with the server (``LossClient.shared_inputs``).

The shared-memory path copies a call's inputs into a region before the server reads them there (32 MB for a
million box pairs). A caller that builds its inputs anyway can build them in the region instead: ``SharedInputs``
is one region of the client's, laid out as the inputs (pred, target, optionally weights) and two places for
answers. A ``loss()`` call whose tensors all lie in its inputs part (the whole arrays or any contiguous part, such
as ``pred[:k]``) names them by offset: nothing is copied in, and the server writes LOSS and GRAD into one of the
two answer places. The same guards hold as for the client's own regions: inputs and outputs of a call share one
region, the outputs are filled with a sentinel first, and a big answer is lent to the caller (views of the
region), so an answer place is never written again while the caller holds its arrays. When both places are held,
or the region was lost (unregistered, taken over), a call takes the ordinary path and copies its inputs; the
region is registered again under a fresh name at the next call, or given up on when its object is no longer ours.

Without a shared-memory path (a remote server, ``shared_memory=False``, a server that cannot share memory with
this process, no room in /dev/shm) the arrays are ordinary numpy arrays and calls on them go as any other.
"""

from __future__ import annotations

import math
import os
import sys
import uuid
import weakref
from typing import Any

import numpy as np

from ._errors import InvalidInputError

ALIGN = 64


def _aligned(nbytes: int) -> int:
    return -(-nbytes // ALIGN) * ALIGN


def _invalid(field: str, message: str) -> InvalidInputError:
    return InvalidInputError("invalid_request", f"{field}: {message}", None, {"field": field})


def _shape(field: str, shape: Any) -> tuple[int, ...]:
    if isinstance(shape, (int, np.integer)) and not isinstance(shape, bool):
        shape = (int(shape), 4)  # n boxes
    if isinstance(shape, (str, bytes)):
        raise _invalid(field, f"must be a shape (a tuple of sizes, e.g. (n, 4)) or a number of boxes, got the "
                       f"string {shape!r:.40}")
    try:
        dims = tuple(shape)
    except TypeError:
        raise _invalid(field, f"must be a shape (a tuple of sizes, e.g. (n, 4)) or a number of boxes, got "
                       f"{type(shape).__name__}") from None
    if not all(isinstance(d, (int, np.integer)) and not isinstance(d, (bool, np.bool_)) and d >= 0 for d in dims):
        raise _invalid(field, f"sizes must be whole numbers of 0 or more, got {dims!r:.80}")
    if not dims:
        raise _invalid(field, "must have at least one dimension (the rows)")
    return tuple(int(d) for d in dims)


def _dtype(field: str, value: Any, allowed: tuple[str, ...]) -> np.dtype:
    try:
        dt = np.dtype(value)
    except TypeError:
        dt = None
    if dt is None or dt.newbyteorder("<") not in [np.dtype(a) for a in allowed] or dt.byteorder == ">":
        names = ", ".join(np.dtype(a).name for a in allowed)
        raise _invalid(field, f"must be one of {names}, got {value!r:.40}")
    return dt.newbyteorder("<")


class _Slot:
    """One place for a call's LOSS and GRAD in the region: lent to the caller while they hold a big answer."""

    def __init__(self, offset: int) -> None:
        self.offset = offset
        self.held = False
        self.retired = False  # held when the process forked: a child views it, so it is never written again

    def lend(self, buf) -> np.ndarray:
        whole = np.frombuffer(buf, dtype=np.uint8)
        self.held = True
        weakref.finalize(whole, self._returned)
        return whole

    def _returned(self) -> None:
        self.held = False

    @property
    def free(self) -> bool:
        return not self.held and not self.retired


class SharedInputs:
    """Arrays to fill with a loss call's inputs: ``pred``, ``target`` and (when asked for) ``weights``. With a
    client that passes tensors through shared memory they lie in a region shared with the server, and
    ``loss()`` on them, or on a contiguous part of them such as ``pred[:k]``, copies and sends no tensor bytes;
    otherwise they are ordinary arrays (``shared`` says which). Big answers come back as views of the region,
    as from any shared-memory call; holding more than two of them at once sends further calls the ordinary way.
    ``close()`` (or the client's) unregisters the region; the arrays stay readable as long as they are held.
    The arrays are shared memory: a process forked from this one writes into the same memory."""

    def __init__(self, path: Any, pred_shape: Any, target_shape: Any = None, *, dtype: Any = "float32",
                 target_dtype: Any = None, weights: bool = False) -> None:
        from ._shm import NoRoom, _Region

        pred_shape = _shape("pred_shape", pred_shape)
        target_shape = pred_shape if target_shape is None else _shape("target_shape", target_shape)
        dt = _dtype("dtype", dtype, ("<f4", "<f8"))
        tdt = dt if target_dtype is None else _dtype("target_dtype", target_dtype, (dt.str, "<i8"))
        if not isinstance(weights, (bool, np.bool_)):
            raise _invalid("weights", f"must be true or false, got {type(weights).__name__}")
        rows = pred_shape[0]
        specs = {"pred": (pred_shape, dt), "target": (target_shape, tdt)}
        if weights:
            specs["weights"] = ((rows,), dt)
        places, size = {}, 0
        for name, (shape, d) in specs.items():
            places[name] = size
            size += _aligned(math.prod(shape) * d.itemsize)  # Python ints: np.prod wraps around past int64
        self.inputs_bytes = size
        self.loss_bytes = _aligned(max(rows, 1) * dt.itemsize)  # LOSS at a slot's start, GRAD after it
        slot_bytes = _aligned(self.loss_bytes + math.prod(pred_shape) * dt.itemsize)
        self.slots = [_Slot(size), _Slot(size + slot_bytes)]
        self.slot_bytes = slot_bytes
        size += 2 * slot_bytes
        if size > sys.maxsize:  # no object or mapping can be this big (and SharedMemory would leave one behind)
            raise _invalid("pred_shape" if target_shape is pred_shape or math.prod(target_shape) <= math.prod(
                pred_shape) else "target_shape", f"{size} bytes (inputs and two answer places) is more than can be "
                f"mapped ({sys.maxsize})")

        self.region = None
        self._path = weakref.ref(path) if path is not None else None
        if path is not None and path.enabled:
            try:
                self.region = _Region(max(size, ALIGN))
            except NoRoom:
                self.region = None
        arrays = {}
        for name, (shape, d) in specs.items():
            count = math.prod(shape)
            if self.region is None or count == 0:
                arrays[name] = np.zeros(shape, d)
            else:
                arrays[name] = np.frombuffer(self.region.mem.buf, dtype=d, count=count,
                                             offset=places[name]).reshape(shape)
        self.pred: np.ndarray = arrays["pred"]
        self.target: np.ndarray = arrays["target"]
        self.weights: np.ndarray | None = arrays.get("weights")
        self.shareable = self.region is not None  # False once the region cannot be used again
        self.closed = False
        if self.region is not None:
            # the region's memory as the in-place calls see it: a view of its own, so that close() from another
            # thread while a call uses the region (SharedMemory.buf is then None) leaves it mapped and usable
            self.buf = self.region.mem.buf[:]
            whole = np.frombuffer(self.region.mem.buf, dtype=np.uint8)
            self.base = whole.ctypes.data
            del whole
            self._finalizer = weakref.finalize(self, path._let_go, self.region)
            path._adopt(self)

    @property
    def shared(self) -> bool:
        """Whether the arrays lie in shared memory with the server and calls on them use it (copy nothing)."""
        path = self._path() if self._path is not None else None
        return self.shareable and not self.closed and path is not None and path.enabled

    def close(self) -> None:
        """Unregister the region (at the client's next call or close) and remove its object; the arrays and any
        answer still held stay readable until they go. Closing twice is harmless."""
        self.closed = True
        if self.region is not None:
            self._finalizer()

    def __enter__(self) -> "SharedInputs":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    # ------------------------------------------------------------------------- used by the shared-memory path
    def offsets(self, arrays: dict[str, np.ndarray]) -> dict[str, int] | None:
        """Each array's byte offset in the region when all of them lie whole in its inputs part (contiguous,
        aligned to their dtype), else None."""
        if not self.shared:
            return None
        out = {}
        for name, arr in arrays.items():
            ptr = arr.ctypes.data
            at = ptr - self.base
            if (arr.size == 0 or not arr.flags.c_contiguous or at < 0 or at + arr.nbytes > self.inputs_bytes
                    or ptr % arr.itemsize):
                return None
            out[name] = at
        return out

    def free_slot(self) -> _Slot | None:
        return next((s for s in self.slots if s.free), None)

    def outputs(self, slot: _Slot, rows: int, grad_bytes: int, itemsize: int, return_grad: bool) -> dict | None:
        """Where this call's LOSS and GRAD go in ``slot`` ((offset, byte_size) each), or None if they do not
        fit (a call in another dtype than the region was made for)."""
        loss = max(rows, 1) * itemsize
        if loss > self.loss_bytes or self.loss_bytes + (grad_bytes if return_grad else 0) > self.slot_bytes:
            return None
        out = {"LOSS": (slot.offset, loss)}
        if return_grad:
            out["GRAD"] = (slot.offset + self.loss_bytes, grad_bytes)
        return out

    def lost(self) -> None:
        """The server no longer holds the region under our name as ours: register it under a fresh name next
        time (the old name may be someone else's now), if the object is still ours."""
        self.region.registered = False
        self.region.name = f"lossd_client_{uuid.uuid4().hex[:16]}"

    def whole(self) -> bool:
        """Whether the registered region's object still holds all of it: someone of our user may have shrunk it
        (maybe to just its inputs part), and writing the sentinel into an answer place past its end would kill this
        process (SIGBUS); calls on it then copy from now on."""
        if self.region.intact():
            return True
        self.shareable = False
        return False

    def registrable(self) -> bool:
        """Whether the region's object can be registered (again): our object still holds all of it and its name
        in /dev/shm still names it (another process may have removed it and made its own under the name)."""
        if not self.whole():
            return False
        fd = getattr(self.region.mem, "_fd", -1)
        if fd >= 0:
            try:
                mine, named = os.fstat(fd), os.stat(f"/dev/shm/{self.region.mem.name}")
                if (mine.st_dev, mine.st_ino) != (named.st_dev, named.st_ino):
                    self.shareable = False
                    return False
            except OSError:
                self.shareable = False
                return False
        return True

    def forked(self) -> None:
        """In a child process: the region is the parent's (registered and removed by it); never use it here."""
        self._finalizer.detach()
        self.region._finalizer.detach()
        self.shareable = False

    def __repr__(self) -> str:
        where = "shared memory" if self.shared else "ordinary memory"
        return (f"SharedInputs(pred={self.pred.shape} {self.pred.dtype}, target={self.target.shape} "
                f"{self.target.dtype}, weights={None if self.weights is None else self.weights.shape}; {where})")
