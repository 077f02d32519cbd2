"""A real `crfasrnn serve` process stops on Ctrl+C even while a client holds a request body open, and slow bodies
time out: exit status 130, no traceback."""

from __future__ import annotations

import signal
import socket
import subprocess
import sys
import time

import pytest

httpx = pytest.importorskip("httpx")
pytest.importorskip("fastapi")


def _answers(port: int) -> bool:
    """Whether the server on ``port`` answers /api/info with 200 (False while it is not listening yet)."""
    try:
        return httpx.get(f"http://127.0.0.1:{port}/api/info", timeout=1).status_code == 200
    except httpx.HTTPError:
        return False


def _start(*args):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen(
        [sys.executable, "-m", "crfasrnn", "serve", "--port", str(port), *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    for _ in range(600):
        if _answers(port):
            return proc, port
        time.sleep(0.1)
    proc.kill()
    pytest.fail("the server did not start")


def _hold_a_body_open(port: int) -> socket.socket:
    client = socket.create_connection(("127.0.0.1", port))
    client.sendall(
        b"POST /api/refine HTTP/1.1\r\nHost: localhost\r\nContent-Type: image/png\r\n"
        b"Content-Length: 100000\r\n\r\n\x89PNG"
    )  # 4 of the 100000 bytes announced
    time.sleep(0.3)
    return client


def _read_until_closed(client: socket.socket) -> bytes:
    """Everything the server sends until it closes the connection (its answers say ``connection: close``)."""
    chunks = []
    while chunk := client.recv(4096):
        chunks.append(chunk)
    return b"".join(chunks)


@pytest.mark.parametrize("presses", [1, 2])
def test_ctrl_c_stops_the_server_while_a_client_holds_a_body_open(presses):
    proc, port = _start("--body-timeout", "60")
    client = _hold_a_body_open(port)
    try:
        start = time.monotonic()
        proc.send_signal(signal.SIGINT)
        if presses == 2:
            time.sleep(0.5)
            proc.send_signal(signal.SIGINT)  # a second Ctrl+C: stop now
        _, err = proc.communicate(timeout=30)
        elapsed = time.monotonic() - start
    finally:
        client.close()
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 130, err
    assert "Traceback" not in err and "CancelledError" not in err, err
    assert elapsed < (3 if presses == 2 else 10), elapsed  # the grace period is 5 s


def test_a_body_that_does_not_arrive_in_time_gets_408():
    proc, port = _start("--body-timeout", "1")
    try:
        client = _hold_a_body_open(port)
        client.settimeout(10)
        start = time.monotonic()
        answer = _read_until_closed(client).decode(errors="replace")  # headers and body may come apart
        assert time.monotonic() - start < 5
        assert answer.startswith("HTTP/1.1 408") and "did not arrive within 1 s" in answer, answer
        client.close()
        assert (
            httpx.post(
                f"http://127.0.0.1:{port}/api/refine", data={"sample": "true", "num_iterations": "1"}, timeout=120
            ).status_code
            == 200
        )  # and the server goes on serving
    finally:
        proc.send_signal(signal.SIGINT)
        proc.communicate(timeout=30)
