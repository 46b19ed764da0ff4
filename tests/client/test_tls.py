"""Both clients over TLS (https:// and grpcs://) against a real `lossd serve` with LOSSD_TLS_CERT/LOSSD_TLS_KEY:
the server takes TLS only, so an answer proves the channel was TLS, and an unknown CA is refused."""

import asyncio

import numpy as np
import pytest

from lossd_client import AsyncLossClient, LossClient, UnavailableError
from tests.conftest import self_signed_cert, start_server

PRED = np.array([[0, 0, 10, 10], [5, 5, 15, 20], [2, 3, 4, 9]], dtype=np.float32)
TARGET = np.array([[1, 1, 11, 11], [5, 5, 15, 15], [2, 2, 5, 8]], dtype=np.float32)


@pytest.fixture(scope="module")
def tls_server(tmp_path_factory):
    key, cert = self_signed_cert(tmp_path_factory.mktemp("tls"))
    server = start_server({"LOSSD_TLS_CERT": str(cert), "LOSSD_TLS_KEY": str(key)}, https=True, ca=str(cert))
    yield server, str(cert)
    server.proc.terminate()
    server.proc.wait(timeout=30)


@pytest.fixture(params=["https", "grpcs"])
def tls_url(request, tls_server):
    server, ca = tls_server
    if request.param == "https":
        return server.http_url.replace("http://", "https://").replace("127.0.0.1", "localhost"), ca
    return f"grpcs://{server.grpc_target.replace('127.0.0.1', 'localhost')}", ca


def check(engine, loss, streamed, catalog):
    np.testing.assert_allclose(loss, engine.evaluate("giou", PRED, TARGET).loss.numpy(), rtol=1e-6)
    np.testing.assert_allclose(streamed[1].loss, engine.evaluate("diou", PRED, TARGET).loss.numpy(), rtol=1e-6)
    assert len(catalog) == len(engine.losses())


def test_async_client_over_tls(tls_url, engine):
    url, ca = tls_url

    async def run():
        async with AsyncLossClient(url, ca_cert=ca) as c:
            loss, _ = await c.loss("giou", PRED, TARGET)
            streamed = await c.stream([dict(name="ciou", pred=PRED, target=TARGET),
                                       dict(name="diou", pred=PRED, target=TARGET, return_grad=False)])
            return loss, streamed, await c.losses()

    check(engine, *asyncio.run(run()))


def test_sync_client_over_tls(tls_url, engine):
    url, ca = tls_url
    with LossClient(url, ca_cert=ca) as c:
        loss, _ = c.loss("giou", PRED, TARGET)
        streamed = c.stream([dict(name="ciou", pred=PRED, target=TARGET),
                             dict(name="diou", pred=PRED, target=TARGET, return_grad=False)])
        check(engine, loss, streamed, c.losses())


def test_an_unknown_ca_or_plaintext_is_refused(tls_url):
    url, _ = tls_url

    async def untrusted():
        async with AsyncLossClient(url, retries=0, timeout=5) as c:  # the system's roots do not know this CA
            await c.loss("giou", PRED, TARGET)

    with pytest.raises(UnavailableError):
        asyncio.run(untrusted())
    plain = url.replace("https://", "http://").replace("grpcs://", "grpc://")

    async def plaintext():
        async with AsyncLossClient(plain, retries=0, timeout=5) as c:
            await c.loss("giou", PRED, TARGET)

    with pytest.raises(Exception):  # noqa: B017 (REST: a reset or a 400; gRPC: UNAVAILABLE)
        asyncio.run(plaintext())
