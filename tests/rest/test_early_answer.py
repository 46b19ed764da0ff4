"""A request answered before its body is all here (a 404 for an unknown loss is sent as soon as the path is
read) must not spoil the connection: the rest of its body is that request's, read and dropped, and the next
request on the same keep-alive connection is answered normally (it used to be refused as a 431: the leftover
body was counted as the next request's head)."""

import numpy as np

from lossd_client import LossClient, NotFoundError


def test_the_call_after_an_early_404_on_a_big_body_works(live_server):
    n = 100_000  # 3.2 MB of inputs: far more than one read of the socket
    p = np.tile(np.float32([0, 0, 5, 5]), (n, 1))
    with LossClient(live_server.http_url, shared_memory=False) as c:
        for _ in range(2):
            try:
                c.loss("nosuch", p, p + 1)
            except NotFoundError as exc:
                assert exc.code == "unknown_loss"
            else:
                raise AssertionError("an unknown loss was accepted")
            out = c.loss("ciou", p, p + 1)
            assert out.loss.shape == (n,) and np.isfinite(out.loss).all()
