"""Triton's system shared-memory extension: named regions of POSIX shared memory that inference inputs are read
from and outputs written to, so a client on the same host skips the socket for its tensors.

A region is (name, key, offset, byte_size): ``key`` names a POSIX shared-memory object (``/dev/shm/<key>``, as
``shm_open`` and Python's multiprocessing.shared_memory create it), ``offset``/``byte_size`` the part of it the
region covers. Registering opens that object in the server; a request then names a region, an offset into it and a
byte size per tensor (parameters shared_memory_region / shared_memory_offset / shared_memory_byte_size).

How a region is read and written depends on who can shrink its object. A process that truncates an object while the
server reads it through a mapping kills the server (SIGBUS), so:
  * an object only the server's own user can write (owned by the server's uid, not group- or world-writable; what
    multiprocessing.shared_memory and tritonclient create when client and server run as one user) is mapped:
    floating-point inputs are read in place, and per-sample outputs computed straight into it (target()) when
    they are aligned and overlap no input read in place; other outputs are computed, then copied in. Whoever
    could truncate it could signal the server anyway. A client that rewrites an input while its own call runs
    gets that call's numbers wrong (as with Triton); integer inputs, which index arrays, are always copied before
    they are checked. After an error the output areas hold whatever was written before it.
  * any other object is never mapped: inputs are copied out with pread and outputs written with pwrite, so a
    truncated object gives a clear error for that call and nothing else.

Bounds: at most ``max_regions`` regions at once (each holds a file descriptor, and a mapping when mapped), names
and keys are checked before they are used as keys, and only clients on this host (loopback or a unix socket) may
register or use regions: the server opens the key with its own permissions. A region unregistered while a call
uses it stays open until the call ends (the call's outputs are then refused); it is closed when the last call
lets go of it.
"""

from __future__ import annotations

import errno
import ipaddress
import mmap
import os
import re
import stat
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Iterator

import numpy as np

from .errors import ServiceError, quote

SHM_DIR = "/dev/shm"
# a region name and a shared-memory key: what tritonclient's examples use ("output_data", "/input_simple")
NAME = re.compile(r"[A-Za-z0-9_.\-]{1,128}")
KEY = re.compile(r"/?[A-Za-z0-9_.\-]{1,200}")
PARAMS = ("shared_memory_region", "shared_memory_offset", "shared_memory_byte_size")
NO_ROOM = (errno.ENOSPC, errno.ENOMEM, errno.EFBIG)


def _path(key: str) -> str:
    return os.path.join(SHM_DIR, key.lstrip("/"))


def is_local(host: str | None) -> bool:
    """Whether a peer address is on this host: loopback, or a unix socket (no address)."""
    if not host:
        return True
    if host.startswith("unix:"):
        return True
    for prefix in ("ipv4:", "ipv6:"):  # gRPC's peer form: ipv4:127.0.0.1:5000, ipv6:[::1]:5000
        if host.startswith(prefix):
            host = host[len(prefix):].rsplit(":", 1)[0].strip("[]")
    try:
        return ipaddress.ip_address(host.split("%")[0]).is_loopback
    except ValueError:
        return False


def not_local() -> ServiceError:
    return ServiceError("system shared memory is only for clients on the server's host (loopback or a unix "
                        "socket)", "forbidden", field="shared_memory")


@dataclass(eq=False)
class Region:
    name: str
    key: str
    offset: int
    byte_size: int
    fd: int
    mm: mmap.mmap | None  # None: others can write the object, so it is only read/written with pread/pwrite
    inode: tuple[int, int] = (0, 0)  # (st_dev, st_ino) of the object opened
    users: int = 0
    registered: bool = True
    last_used: float = field(default_factory=time.monotonic)

    def status(self) -> dict:
        return {"name": self.name, "key": self.key, "offset": self.offset, "byte_size": self.byte_size}

    @property
    def closed(self) -> bool:
        return self.fd < 0

    def close(self) -> None:
        if self.mm is not None:
            try:
                self.mm.close()
            except BufferError:  # a view still exists somewhere; the mapping goes when it does
                pass
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


def _whole(value, what: str) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < 0 or value > 2**62:
        raise ServiceError(f"{what} must be a non-negative whole number, got {quote(value)}", field=what)
    return value


def only_ours(info: os.stat_result) -> bool:
    """Whether only the server's own user can write (and so truncate) an object: then mapping it is safe."""
    return info.st_uid == os.geteuid() and not info.st_mode & (stat.S_IWGRP | stat.S_IWOTH)


def check_name(name) -> str:
    if not isinstance(name, str) or not NAME.fullmatch(name):
        raise ServiceError(f"shared-memory region name {quote(name)} must be 1-128 letters, digits, '_', '.' or "
                           "'-'", field="name")
    return name


class SharedMemory:
    """The server's registered regions (one table for both transports)."""

    # a region whose object is gone (a client killed before it unregistered) is dropped once it has not been
    # used for this long, so its memory is not held until the table fills; one whose client unlinked the object
    # early but still uses it is kept
    GONE_IDLE_S = 60.0
    SWEEP_EVERY_S = 10.0

    def __init__(self, max_regions: int) -> None:
        self.max_regions = max_regions
        self.regions: dict[str, Region] = {}
        self.lock = threading.Lock()
        self._swept = time.monotonic()

    # ------------------------------------------------------------------------------------------- management
    def register(self, name, key, offset=0, byte_size=0) -> None:
        name = check_name(name)
        if not isinstance(key, str) or not KEY.fullmatch(key) or key.lstrip("/") in (".", ".."):
            raise ServiceError(f"shared-memory key {quote(key)} must be a POSIX shared-memory name: an optional "
                               "'/' then 1-200 letters, digits, '_', '.' or '-'", field="key")
        offset, byte_size = _whole(offset, "offset"), _whole(byte_size, "byte_size")
        if byte_size == 0:
            raise ServiceError("byte_size must be at least 1", field="byte_size")
        with self.lock:
            if name in self.regions:
                raise ServiceError(f"shared-memory region {quote(name)} is already registered; unregister it "
                                   "first", field="name")
            self._evict_stale(idle=self.GONE_IDLE_S)
            if len(self.regions) >= self.max_regions:
                self._evict_stale()
            if self.max_regions == 0:
                raise ServiceError("shared memory is off on this server (LOSSD_MAX_SHM_REGIONS=0)",
                                   "too_many_regions", field="name")
            if len(self.regions) >= self.max_regions:
                raise ServiceError(f"this server holds at most {self.max_regions} shared-memory regions "
                                   "(LOSSD_MAX_SHM_REGIONS); unregister one first", "too_many_regions",
                                   field="name")
            fd, mm, inode = self._open(key, offset, byte_size)
            self.regions[name] = Region(name, key, offset, byte_size, fd, mm, inode)

    def _evict_stale(self, idle: float = 0.0) -> None:
        """Drop regions whose shared-memory object is gone (removed by its owner, e.g. a client that exited
        without unregistering) and that no call used for ``idle`` seconds: they hold memory and a place in the
        table. Called with the lock held."""
        self._swept = now = time.monotonic()
        for name, region in list(self.regions.items()):
            if now - region.last_used < idle:
                continue
            try:
                info = os.stat(_path(region.key), follow_symlinks=False)
                alive = (info.st_dev, info.st_ino) == region.inode
            except OSError:
                alive = False
            if not alive and region.users == 0:
                del self.regions[name]
                region.registered = False
                region.close()

    @staticmethod
    def _open(key: str, offset: int, byte_size: int) -> tuple[int, mmap.mmap | None, tuple[int, int]]:
        try:
            fd = os.open(_path(key), os.O_RDWR | os.O_NOFOLLOW | getattr(os, "O_CLOEXEC", 0))
        except OSError as exc:
            raise ServiceError(f"cannot open shared-memory key {quote(key)}: {exc.strerror}", field="key") from None
        try:
            info = os.fstat(fd)
            if not stat.S_ISREG(info.st_mode):
                raise ServiceError(f"shared-memory key {quote(key)} is not a shared-memory object", field="key")
            if offset + byte_size > info.st_size:
                raise ServiceError(f"region offset {offset} + byte_size {byte_size} runs past the end of "
                                   f"shared-memory key {quote(key)} ({info.st_size} bytes)", field="byte_size")
            mm = None
            if only_ours(info):
                # a write into a page the object cannot get (a hole in a sparse object on a full /dev/shm) would be
                # SIGBUS through a mapping: give the region its memory now, or refuse it
                try:
                    os.posix_fallocate(fd, offset, byte_size)
                except OSError as exc:
                    if exc.errno in NO_ROOM:
                        raise ServiceError(f"shared-memory key {quote(key)}: /dev/shm cannot hold the region's "
                                           f"{byte_size} bytes ({exc.strerror}); free some or register less",
                                           field="byte_size") from None
                    # a file system that cannot reserve space: mapped as before
                # mmap's own offset must be page aligned: map from the start and slice
                mm = mmap.mmap(fd, offset + byte_size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
            return fd, mm, (info.st_dev, info.st_ino)
        except BaseException:
            os.close(fd)
            raise

    def unregister(self, name: str = "") -> None:
        """One region, or every region when ``name`` is empty (Triton's semantics: an unknown name is an
        error)."""
        with self.lock:
            if name:
                region = self.regions.pop(check_name(name), None)
                if region is None:
                    raise ServiceError(f"no shared-memory region named {quote(name)} is registered", "unknown_region",
                                       field="name")
                gone = [region]
            else:
                gone = list(self.regions.values())
                self.regions.clear()
            for region in gone:
                region.registered = False
                if region.users == 0:
                    region.close()

    def status(self, name: str = "") -> list[dict]:
        with self.lock:
            self._evict_stale(idle=self.GONE_IDLE_S)
            if not name:
                return [r.status() for r in self.regions.values()]
            region = self.regions.get(check_name(name))
            if region is None:
                raise ServiceError(f"no shared-memory region named {quote(name)} is registered", "unknown_region",
                                   field="name")
            return [region.status()]

    def close(self) -> None:
        self.unregister("")

    # ------------------------------------------------------------------------------------------------ calls
    @contextmanager
    def call(self) -> Iterator["ShmCall"]:
        """One request's use of regions: the regions it touches stay mapped until it ends."""
        c = ShmCall(self)
        if time.monotonic() - self._swept > self.SWEEP_EVERY_S:
            with self.lock:
                self._evict_stale(idle=self.GONE_IDLE_S)
        try:
            yield c
        finally:
            with self.lock:
                for region in c.pinned.values():
                    region.users -= 1
                    region.last_used = time.monotonic()
                    if region.users == 0 and not region.registered:
                        region.close()


@dataclass(eq=False)
class ShmCall:
    owner: SharedMemory
    pinned: dict[str, Region] = field(default_factory=dict)
    # the bytes this call reads in place or computes into: (object, start, end); an output is only computed in
    # place when it overlaps none of them (two regions may name one object)
    in_place: list[tuple[tuple[int, int], int, int]] = field(default_factory=list)

    def _claim(self, region: Region, start: int, nbytes: int) -> bool:
        """Record a range of a mapped object as used in place by this call; False if it overlaps one already."""
        end = start + nbytes
        if nbytes and any(obj == region.inode and start < e and s < end for obj, s, e in self.in_place):
            return False
        self.in_place.append((region.inode, start, end))
        return True

    def _region(self, name, what: str) -> Region:
        if not isinstance(name, str) or not NAME.fullmatch(name):
            raise ServiceError(f"{what}: shared_memory_region {quote(name)} is not a region name", field=what)
        region = self.pinned.get(name)
        if region is not None:
            return region
        with self.owner.lock:
            region = self.owner.regions.get(name)
            if region is None:
                raise ServiceError(f"{what}: no shared-memory region named {quote(name)} is registered",
                                   "unknown_region", field=what)
            region.users += 1
            region.last_used = time.monotonic()
            self.pinned[name] = region
        return region

    def check(self, ref: tuple, what: str) -> tuple[Region, int]:
        """The region a tensor names and the tensor's start in its object: ``ref`` = (region, offset,
        byte_size), bounds checked against the registered region."""
        name, offset, size = ref
        region = self._region(name, what)
        if offset + size > region.byte_size:
            raise ServiceError(f"{what}: shared_memory_offset {offset} + shared_memory_byte_size {size} runs past "
                               f"the end of region {name!r} ({region.byte_size} bytes)", field=what)
        return region, region.offset + offset

    def apart(self, outputs: dict[str, tuple]) -> None:
        """Refuse outputs whose ranges (as given: offset and byte_size) share bytes of one object, also through
        two region names: each would overwrite the other."""
        placed = []
        for oname, ref in outputs.items():
            region, start = self.check(ref, f"outputs.{oname}")
            for other, inode, s, e in placed:
                if inode == region.inode and start < e and s < start + ref[2]:
                    raise ServiceError(f"outputs.{oname}: its shared-memory range overlaps outputs.{other}'s (same "
                                       "object); give each output bytes of its own", field=f"outputs.{oname}")
            placed.append((oname, region.inode, start, start + ref[2]))

    def read(self, ref: tuple, dtype: np.dtype, shape: list, what: str) -> np.ndarray:
        """A tensor from a region: floating point from a mapped region is a view (read in place); anything
        else is the server's own copy."""
        region, start = self.check(ref, what)
        size = ref[2]
        if region.mm is not None:
            self._whole(region, ref[0], what)
            view = np.frombuffer(memoryview(region.mm)[start:start + size], dtype=dtype).reshape(shape)
            if dtype.kind != "f":
                return view.copy()
            self._claim(region, start, size)
            return view
        arr = np.empty(shape, dtype=dtype)
        buf = memoryview(arr.reshape(-1)).cast("B") if arr.size else memoryview(bytearray())
        done = 0
        while done < size:
            try:
                got = os.preadv(region.fd, [buf[done:]], start + done)
            except OSError as exc:
                raise ServiceError(f"{what}: cannot read region {ref[0]!r} (shared-memory object "
                                   f"{region.key!r}): {exc.strerror}", field=what) from None
            if got <= 0:
                raise ServiceError(f"{what}: region {ref[0]!r} ends after {start + done - region.offset} of its "
                                   f"{region.byte_size} bytes: its shared-memory object {region.key!r} was "
                                   "truncated", "region_truncated", field=what)
            done += got
        return arr

    def target(self, ref: tuple, dtype: np.dtype, shape: tuple, what: str) -> np.ndarray | None:
        """A writable view of where an output of this dtype and shape goes in a mapped region, for the engine to
        compute into; None when it cannot be written in place (an object others can write, a start not aligned to
        the dtype, or ``ref``'s byte_size too small: then the output is computed elsewhere and write() copies it
        or names the error)."""
        dtype = np.dtype(dtype)
        nbytes = int(np.prod(shape)) * dtype.itemsize
        if nbytes > ref[2]:
            return None
        region, start = self.check((ref[0], ref[1], nbytes), what)
        if region.mm is None or start % dtype.itemsize or not self._claim(region, start, nbytes):
            return None  # (an output overlapping an input is computed elsewhere: the input stays whole)
        self._whole(region, ref[0], what)
        return np.frombuffer(memoryview(region.mm)[start:start + nbytes], dtype=dtype).reshape(shape)

    def write(self, ref: tuple, arr: np.ndarray, what: str) -> None:
        """Write an array into a region at ``ref``'s offset (``ref``'s byte_size already checked to hold it);
        nothing to copy when the array was computed there (target())."""
        region, start = self.check((ref[0], ref[1], arr.nbytes), what)
        src = np.ascontiguousarray(arr).reshape(-1)
        if region.mm is not None:
            self._whole(region, ref[0], what)
            dst = np.frombuffer(memoryview(region.mm)[start:start + arr.nbytes], dtype=arr.dtype)
            if dst.ctypes.data != src.ctypes.data:
                dst[...] = src
            return
        self._whole(region, ref[0], what)
        buf = memoryview(src).cast("B") if arr.size else memoryview(bytearray())
        done = 0
        while done < arr.nbytes:
            try:
                done += os.pwritev(region.fd, [buf[done:]], start + done)
            except OSError as exc:  # e.g. ENOSPC: a hole in the object on a full /dev/shm
                raise ServiceError(f"{what}: cannot write region {ref[0]!r} (shared-memory object "
                                   f"{region.key!r}): {exc.strerror}", field=what) from None

    @staticmethod
    def _whole(region: Region, name: str, what: str) -> None:
        """The object behind a region still holds all of it. For a mapped region this is what keeps a client
        that shrank its object since registering (or between calls) from killing the server with SIGBUS; a
        shrink during the very read or write is only prevented for objects the server does not map."""
        if os.fstat(region.fd).st_size < region.offset + region.byte_size:
            raise ServiceError(f"{what}: region {name!r} no longer fits its shared-memory object {region.key!r}: "
                               "the object was truncated; unregister the region and register it again",
                               "region_truncated", field=what)

    def check_registered(self, name: str, what: str) -> None:
        region = self.pinned.get(name)
        with self.owner.lock:
            if region is None or not region.registered or self.owner.regions.get(name) is not region:
                raise ServiceError(f"{what}: shared-memory region {name!r} was unregistered during the call; "
                                   "the result was not written", field=what)


def tensor_ref(params: dict, what: str) -> tuple[str, int, int] | None:
    """(region, offset, byte_size) from a tensor's parameters, or None when it does not use shared memory."""
    given = [p for p in PARAMS if p in params]
    if not given:
        return None
    if "shared_memory_region" not in params or "shared_memory_byte_size" not in params:
        raise ServiceError(f"{what}: shared memory needs both parameters.shared_memory_region and "
                           "parameters.shared_memory_byte_size", field=what)
    region = params["shared_memory_region"]
    if not isinstance(region, str):
        raise ServiceError(f"{what}: shared_memory_region must be a string, got {quote(region)}", field=what)
    offset = _whole(params.get("shared_memory_offset", 0), f"{what}.shared_memory_offset")
    size = _whole(params["shared_memory_byte_size"], f"{what}.shared_memory_byte_size")
    return region, offset, size
