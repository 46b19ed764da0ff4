"""A missing or wrong API key is the same error class over REST and gRPC (it was InvalidInputError over HTTP and
ServerError over gRPC): AuthError, a kind of InvalidInputError, with code "unauthorized"; the right key works."""

import numpy as np
import pytest

from lossd_client import AuthError, InvalidInputError, LossClient, ServerError
from tests.conftest import start_server


@pytest.fixture(scope="module")
def keyed():
    server = start_server({"LOSSD_API_KEYS": "right-key"})
    yield server
    server.proc.terminate()
    server.proc.wait(timeout=30)


@pytest.mark.parametrize("kind", ["http", "grpc"])
@pytest.mark.parametrize("key", [None, "wrong-key"])
def test_a_refused_key_is_an_auth_error_on_both_transports(keyed, kind, key):
    url = keyed.http_url if kind == "http" else keyed.grpc_url
    p = np.float32([[0, 0, 4, 4], [1, 1, 3, 5]])
    with LossClient(url, api_key=key) as c:
        with pytest.raises(AuthError) as err:
            c.loss("ciou", p, p + 1)
    assert err.value.code == "unauthorized"
    assert isinstance(err.value, InvalidInputError) and not isinstance(err.value, ServerError)
    with LossClient(url, api_key="right-key") as c:
        assert c.loss("ciou", p, p + 1).loss.shape == (2,)
