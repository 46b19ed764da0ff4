"""glibc malloc tuning for a server that moves tens of MB per request.

By default glibc serves every block over its dynamic mmap threshold with a fresh mmap and hands freed heap back
to the kernel above 128 KiB: each large request then pays page faults and the kernel's zeroing of every page it
touches, for each buffer (the received message, the decoded arrays, the results, the encoded answer). Keeping up
to ``retain_bytes`` of freed heap for reuse measured, for 1M box pairs over gRPC on 2 cores: server CPU 113 ->
86 ms per call, wall time 95 -> 76 ms (bench/run.py, service section). The price is resident memory kept after
a burst of large requests (after ten 1M-pair calls: 636 MiB instead of 531 MiB).

What a burst of big answers leaves beyond that (freed blocks in the middle of the heaps, the worker threads'
arenas, none of which glibc trims by itself) is handed back by ``give_back`` once the burst is over (the answer
budget in lossd.service calls it when it goes idle after holding more than the retained amount).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import sys

M_TRIM_THRESHOLD = -1
M_TOP_PAD = -2
M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD_MAX = 32 * 2**20  # glibc's ceiling for M_MMAP_THRESHOLD on 64-bit


_libc = None


def _load_libc():
    global _libc
    if _libc is None and sys.platform.startswith("linux"):
        try:
            _libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        except OSError:
            _libc = False
    return _libc or None


def give_back(keep_bytes: int) -> bool:
    """Return freed heap to the kernel (glibc ``malloc_trim``): every whole free page of every arena, keeping
    ``keep_bytes`` at the top of the main heap for reuse; True when glibc released something. Walks the free
    lists (milliseconds for a GiB), so call it off the event loop."""
    libc = _load_libc()
    trim = getattr(libc, "malloc_trim", None) if libc is not None else None
    if trim is None:
        return False
    trim.argtypes = (ctypes.c_size_t,)
    trim.restype = ctypes.c_int
    return trim(max(0, keep_bytes)) == 1


def tune_malloc(retain_bytes: int) -> bool:
    """Serve blocks up to 32 MiB from the heap and keep up to ``retain_bytes`` of freed heap; True when applied
    (glibc only; elsewhere, or with retain_bytes 0, nothing changes)."""
    if retain_bytes <= 0 or not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
    mallopt.restype = ctypes.c_int
    settings = ((M_MMAP_THRESHOLD, min(MMAP_THRESHOLD_MAX, retain_bytes)), (M_TRIM_THRESHOLD, retain_bytes),
                (M_TOP_PAD, min(64 * 2**20, retain_bytes)))
    return all(mallopt(param, value) == 1 for param, value in settings)
