import os
import socket
import ssl
import subprocess
import sys
import tempfile
import time
from typing import NamedTuple

import httpx
import pytest
import torch

from lossd.engine import Engine


@pytest.fixture(scope="session")
def engine() -> Engine:
    return Engine(device="cpu")


@pytest.fixture
def gen() -> torch.Generator:
    return torch.Generator().manual_seed(1234)


class LiveServer(NamedTuple):
    http_url: str
    grpc_url: str
    grpc_target: str
    proc: subprocess.Popen
    log_path: str = ""

    def log(self) -> str:
        """What the server wrote so far (stdout and stderr go to a file: a pipe nobody reads would fill and block
        the server's next log line)."""
        with open(self.log_path, errors="replace") as f:
            return f.read()


def start_server(extra_env: dict | None = None, https: bool = False, ca: str | None = None,
                 timeout: float = 240) -> LiveServer:
    """Start `lossd serve` as a user does, on free loopback ports, and wait for /v2/health/ready."""
    port, grpc_port = free_port(), free_port()
    env = dict(os.environ, LOSSD_DEVICE="cpu", PYTHONUNBUFFERED="1", **(extra_env or {}))
    log = tempfile.NamedTemporaryFile("w", prefix="lossd-serve-", suffix=".log", delete=False)
    proc = subprocess.Popen([sys.executable, "-m", "lossd.cli", "serve", "--http-port", str(port),
                             "--grpc-port", str(grpc_port)], env=env, stdout=log, stderr=subprocess.STDOUT,
                            text=True)
    log.close()
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + timeout
    while True:
        if proc.poll() is not None:
            raise RuntimeError(f"lossd serve exited: {open(log.name).read()[-5000:]}")
        try:
            probe = url.replace("http://", "https://") if https else url
            verify = ssl.create_default_context(cafile=ca) if ca else True
            if httpx.get(f"{probe}/v2/health/ready", timeout=1, verify=verify).status_code == 200:
                break
        except httpx.TransportError:
            pass
        if time.monotonic() > deadline:
            proc.kill()
            raise RuntimeError(f"lossd serve did not become ready in {timeout:.0f} s")
        time.sleep(0.05)
    return LiveServer(url, f"grpc://127.0.0.1:{grpc_port}", f"127.0.0.1:{grpc_port}", proc, log.name)


@pytest.fixture(scope="session")
def live_server():
    """One real `lossd serve` process shared by the end-to-end tests."""
    server = start_server()
    yield server
    server.proc.terminate()
    server.proc.wait(timeout=30)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def self_signed_cert(directory) -> tuple[str, str]:
    """(key, cert): a throw-away certificate for localhost and 127.0.0.1, for LOSSD_TLS_KEY / LOSSD_TLS_CERT."""
    key, cert = f"{directory}/key.pem", f"{directory}/cert.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", key, "-out", cert,
                    "-days", "2", "-subj", "/CN=localhost", "-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1"],
                   check=True, capture_output=True)
    return key, cert
