"""The server's side of a full /dev/shm. A region whose object is sparse (tritonclient and multiprocessing create
objects with ftruncate: no memory behind them until written) would be written through a mapping; on a full
/dev/shm a write into a hole is SIGBUS, which would kill the server. So registering a mapped region gives it its
memory first, and a region /dev/shm cannot hold is refused with a 400 naming byte_size. ENOSPC is simulated."""

import errno
import os
import uuid
from multiprocessing import shared_memory

import numpy as np
import pytest

from lossd import shm as shm_mod
from lossd.errors import ServiceError


@pytest.fixture
def sparse():
    mem = shared_memory.SharedMemory(f"lossd_test_{uuid.uuid4().hex[:12]}", create=True, size=8 << 20)
    yield mem
    mem.close()
    mem.unlink()


def test_registering_gives_a_sparse_object_its_memory(sparse):
    assert os.fstat(sparse._fd).st_blocks * 512 < 1 << 20  # nothing behind it yet
    table = shm_mod.SharedMemory(max_regions=4)
    try:
        table.register("r", "/" + sparse.name, 1 << 20, 4 << 20)
        blocks = os.fstat(sparse._fd).st_blocks * 512
        assert 4 << 20 <= blocks < 6 << 20  # the region's range, not the whole object
    finally:
        table.close()


def test_a_region_dev_shm_cannot_hold_is_refused(sparse, monkeypatch):
    def full(fd, offset, size):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(shm_mod.os, "posix_fallocate", full)
    table = shm_mod.SharedMemory(max_regions=4)
    with pytest.raises(ServiceError) as err:
        table.register("r", "/" + sparse.name, 0, 8 << 20)
    assert err.value.field == "byte_size" and "/dev/shm cannot hold" in err.value.message
    assert err.value.code == "invalid_request" and table.status() == []


def test_a_failed_pwrite_is_an_error_for_that_call(sparse, monkeypatch):
    """Objects others can write are written with pwrite; ENOSPC there is a 400 for that output, not a 500."""
    os.fchmod(sparse._fd, 0o666)  # others can write it: never mapped
    table = shm_mod.SharedMemory(max_regions=4)
    try:
        table.register("r", "/" + sparse.name, 0, 8 << 20)
        assert table.regions["r"].mm is None

        def full(*a):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

        monkeypatch.setattr(shm_mod.os, "pwritev", full)
        with table.call() as call, pytest.raises(ServiceError) as err:
            call.write(("r", 0, 400), np.ones(100, np.float32), "outputs.LOSS")
        assert err.value.field == "outputs.LOSS" and "No space left" in err.value.message
    finally:
        table.close()
