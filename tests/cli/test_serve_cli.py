"""`lossd serve` start-up and stop as a user sees them: a setting it cannot start with is one line naming the
setting (exit 2, no traceback); list settings take a JSON list or comma-separated values; Ctrl-C ends with the
graceful shutdown logged and no traceback."""

import os
import signal
import socket
import subprocess
import sys
import time

import httpx
import pytest
import torch

from lossd.settings import Settings

from ..conftest import free_port, start_server


def _serve(*args, env=None, timeout=120):
    return subprocess.run([sys.executable, "-m", "lossd.cli", "serve", *args], capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, "LOSSD_DEVICE": "cpu", **(env or {})})


def _one_error_line(r) -> str:
    assert r.returncode == 2, r.stderr[-3000:]
    assert "Traceback" not in r.stderr, r.stderr[-3000:]
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1, r.stderr[-3000:]
    return lines[0]


@pytest.mark.parametrize("flag, setting", [("--grpc-port", "LOSSD_GRPC_PORT"), ("--http-port", "LOSSD_HTTP_PORT")])
def test_a_port_in_use_is_named(flag, setting):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        other = "--http-port" if flag == "--grpc-port" else "--grpc-port"
        line = _one_error_line(_serve(flag, str(port), other, "0"))
    assert f"{setting} / {flag} {port}" in line and "already in use" in line


def test_one_port_for_both_transports_is_named():
    port = str(free_port())
    line = _one_error_line(_serve("--http-port", port, "--grpc-port", port))
    assert "--http-port" in line and "--grpc-port" in line and "a port each" in line


def test_unreadable_tls_files_are_named(tmp_path):
    line = _one_error_line(_serve("--http-port", "0", "--grpc-port", "0",
                                  env={"LOSSD_TLS_CERT": str(tmp_path / "nope.pem"),
                                       "LOSSD_TLS_KEY": str(tmp_path / "nope.key")}))
    assert f"LOSSD_TLS_CERT={tmp_path / 'nope.pem'}: cannot read it" in line


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without a CUDA GPU")
def test_cuda_without_a_gpu_is_named():
    line = _one_error_line(_serve("--http-port", "0", "--grpc-port", "0", env={"LOSSD_DEVICE": "cuda"}))
    assert "LOSSD_DEVICE / --device cuda" in line and "no CUDA GPU" in line


@pytest.mark.parametrize("value, expected", [("secret", ["secret"]), ("k1, k2", ["k1", "k2"]),
                                             ('["k1","k,2"]', ["k1", "k,2"]), ("", [])])
def test_list_settings_take_json_or_commas(monkeypatch, value, expected):
    monkeypatch.setenv("LOSSD_API_KEYS", value)
    monkeypatch.setenv("LOSSD_CORS_ORIGINS", value)
    s = Settings()
    assert s.api_keys == expected and s.cors_origins == expected


def test_a_broken_json_list_names_the_setting():
    line = _one_error_line(_serve("--http-port", "0", "--grpc-port", "0", env={"LOSSD_API_KEYS": "[oops"}))
    assert line.startswith("lossd serve: error: LOSSD_API_KEYS:") and "JSON list" in line and "comma" in line


def test_comma_separated_keys_and_ctrl_c_stops_cleanly():
    server = start_server({"LOSSD_API_KEYS": "k1,k2", "LOSSD_CORS_ORIGINS": "*"})
    try:
        assert httpx.get(f"{server.http_url}/v1/losses", timeout=10).status_code == 401
        assert httpx.get(f"{server.http_url}/v1/losses", headers={"x-api-key": "k2"}, timeout=10).status_code == 200
        server.proc.send_signal(signal.SIGINT)
        rc = server.proc.wait(timeout=60)
    finally:
        if server.proc.poll() is None:
            server.proc.kill()
    log = server.log()
    assert rc in (0, 130), log[-3000:]
    assert "Traceback" not in log and "CancelledError" not in log, log[-3000:]
    assert "lossd stopped" in log


def _has_ipv6_loopback() -> bool:
    try:
        with socket.socket(socket.AF_INET6) as s:
            s.bind(("::1", 0))
        return True
    except OSError:
        return False


def _free_port_v6() -> int:
    with socket.socket(socket.AF_INET6) as s:
        s.bind(("::1", 0))
        return s.getsockname()[1]


@pytest.mark.skipif(not _has_ipv6_loopback(), reason="this machine has no IPv6 loopback")
@pytest.mark.parametrize("host", ["::1", "[::1]", "::"])
def test_an_ipv6_host_serves_rest_and_grpc(host, tmp_path):
    # gRPC wants [::1]:PORT; "::1:PORT" failed to bind (a traceback, exit 3 and a misleading "in use")
    from lossd_client import LossClient

    http_port, grpc_port = _free_port_v6(), _free_port_v6()
    with open(tmp_path / "serve.log", "w") as log:
        proc = subprocess.Popen([sys.executable, "-m", "lossd.cli", "serve", "--host", host, "--http-port",
                                 str(http_port), "--grpc-port", str(grpc_port)], stdout=log,
                                stderr=subprocess.STDOUT, env={**os.environ, "LOSSD_DEVICE": "cpu",
                                                               "PYTHONUNBUFFERED": "1"})
    try:
        url = f"http://[::1]:{http_port}"
        deadline = time.monotonic() + 240
        while True:
            assert proc.poll() is None, (tmp_path / "serve.log").read_text()[-3000:]
            try:
                if httpx.get(f"{url}/v2/health/ready", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, "not ready in 240 s"
            time.sleep(0.05)
        assert httpx.get(f"{url}/v1/losses", timeout=10).status_code == 200
        for client_url in (url, f"grpc://[::1]:{grpc_port}"):
            with LossClient(client_url) as client:
                assert client.loss("iou", [[0, 0, 10, 10]], [[0, 0, 10, 5]]).loss.tolist() == [0.5]
    finally:
        proc.terminate()
        proc.wait(timeout=60)
    assert "Traceback" not in (tmp_path / "serve.log").read_text()


@pytest.mark.parametrize("value, expected", [("[::1]", "::1"), ("::", "::"), ("127.0.0.1", "127.0.0.1")])
def test_a_bracketed_ipv6_host_is_the_address(monkeypatch, value, expected):
    monkeypatch.setenv("LOSSD_HOST", value)
    assert Settings().host == expected


@pytest.mark.parametrize("device", ["tpu", "mps", "meta", "cuda:x"])
def test_a_device_that_is_not_cpu_or_cuda_is_named(device):
    # tpu was a torch traceback (exit 3); mps and meta started, failed in the warm-up and never became ready
    line = _one_error_line(_serve("--http-port", "0", "--grpc-port", "0", env={"LOSSD_DEVICE": device}))
    assert line == f"lossd serve: error: LOSSD_DEVICE / --device {device!r}: expected auto, cpu, cuda or cuda:N"


def test_the_device_flag_takes_cuda_n_as_the_setting_does():
    # --device cuda:0 was refused by the flag's choices (auto, cpu, cuda) though LOSSD_DEVICE takes cuda:N
    import torch

    if torch.cuda.is_available():
        pytest.skip("a GPU is here: cuda:0 would start a server")
    line = _one_error_line(_serve("--http-port", "0", "--grpc-port", "0", "--device", "cuda:0"))
    assert line == "lossd serve: error: LOSSD_DEVICE / --device cuda:0: torch sees no CUDA GPU here; use cpu or auto"


def test_a_log_level_that_is_not_one_is_named():
    line = _one_error_line(_serve("--http-port", "0", "--grpc-port", "0", env={"LOSSD_LOG_LEVEL": "loud"}))
    assert line.startswith("lossd serve: error: LOSSD_LOG_LEVEL: 'loud' is not a log level") and "debug" in line


def test_a_tls_certificate_that_is_not_pem_is_named(tmp_path):
    bad = tmp_path / "cert.pem"
    bad.write_text("not a certificate\n")
    line = _one_error_line(_serve("--http-port", "0", "--grpc-port", "0",
                                  env={"LOSSD_TLS_CERT": str(bad), "LOSSD_TLS_KEY": str(bad)}))
    assert f"LOSSD_TLS_CERT={bad}" in line and "not a PEM certificate" in line, line


@pytest.mark.parametrize("flag", ["--http-port", "--grpc-port"])
def test_a_port_that_is_not_a_number_names_the_flag(flag):
    r = _serve(flag, "abc")
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
    line = r.stderr.strip().splitlines()[-1]  # after argparse's usage lines
    assert line.endswith(f"argument {flag}: must be a port in [0, 65535], got 'abc'"), line


def test_a_closed_pipe_ends_quietly():
    # `lossd losses | head -1`: the reader is gone before the catalog is written
    proc = subprocess.Popen([sys.executable, "-m", "lossd.cli", "losses"], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE)
    proc.stdout.close()
    err = proc.stderr.read().decode()
    assert proc.wait(timeout=120) == 141 and err == "", err


def test_ctrl_c_while_the_parser_is_built_exits_130_without_a_traceback():
    # a real SIGINT at the moment the parser imports the quality package (~0.5 s after start): was a
    # KeyboardInterrupt traceback and exit -2
    code = ("import os, signal, sys\n"
            "class Interrupt:\n"
            "    @staticmethod\n"
            "    def find_spec(name, *a):\n"
            "        if name == 'lossd.quality':\n"
            "            os.kill(os.getpid(), signal.SIGINT)\n"
            "sys.meta_path.insert(0, Interrupt)\n"
            "from lossd.cli import main\n"
            "sys.exit(main(['losses']))\n")
    r = subprocess.run([sys.executable, "-c", code], check=False, capture_output=True, text=True, timeout=120)
    assert r.returncode == 130 and r.stderr == "lossd: interrupted\n", r.stderr[-2000:]
