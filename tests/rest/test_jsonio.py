"""Big answers are written slice by slice: the bytes must be exactly one orjson call's."""

import asyncio

import numpy as np
import orjson
import pytest

from lossd.rest.jsonio import SLICE_VALUES, dumps, dumps_yielding


@pytest.mark.parametrize("shape", [(0,), (5,), (SLICE_VALUES + 7,), (3 * SLICE_VALUES + 1,), (SLICE_VALUES, 4),
                                   (700, 700), (1, 2 * SLICE_VALUES)])
@pytest.mark.parametrize("dtype", ["<f4", "<f8"])
def test_sliced_json_is_byte_identical(shape, dtype):
    g = np.random.default_rng(0)
    arr = g.standard_normal(shape).astype(dtype)
    payload = {"loss": arr, "grad": None, "scalar": 1.5, "rows": arr[:3]}
    got = asyncio.run(dumps_yielding(payload))
    assert got == dumps(payload)
    assert orjson.loads(got)["loss"] == arr.tolist() or arr.dtype == np.float32  # float32 text round trip
