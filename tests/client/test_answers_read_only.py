"""loss() answers behave the same whichever way they came: read-only arrays from one request over the wire (views
of the received bytes), from pieces of a split call, copied out of shared memory, or lent as views of a region.
Code that changes an answer in place fails the same way on every path (it used to work only for big calls on
the same host), and np.array() gives a copy to change."""

import numpy as np
import pytest

from lossd_client import LossClient

PATHS = {  # (rows, client options): the path a call takes
    "wire, one request": (2_000, dict(shared_memory=False)),
    "wire, split": (60_000, dict(shared_memory=False, max_request_bytes=1 << 20)),
    "shared memory, copied out": (20_000, {}),
    "shared memory, lent": (80_000, {}),
}


def boxes(n: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(n)
    xy = rng.uniform(0, 100, (n, 2))
    pred = np.concatenate([xy, xy + rng.uniform(1, 50, (n, 2))], 1).astype(np.float32)
    return pred, pred + np.float32(1.5)


@pytest.mark.parametrize("kind", ["http", "grpc"])
@pytest.mark.parametrize("path", list(PATHS))
def test_answers_are_read_only_on_every_path(live_server, kind, path):
    rows, options = PATHS[path]
    url = live_server.http_url if kind == "http" else live_server.grpc_url
    p, t = boxes(rows)
    with LossClient(url, **options) as c:
        before = c.shared_memory_calls
        loss, grad = c.loss("ciou", p, t)
        assert (c.shared_memory_calls > before) == path.startswith("shared")  # the path meant was taken
        for arr in (loss, grad):
            assert not arr.flags.writeable
            with pytest.raises(ValueError, match="read-only"):
                arr *= 2
        mine = np.array(grad)
        mine *= 2
        np.testing.assert_array_equal(mine, 2 * grad)
        _, summed_grad = c.loss("ciou", p, t, reduction="sum")
        assert not summed_grad.flags.writeable
