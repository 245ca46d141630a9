"""Slow and oversized clients against the real Serve proxy, with raw sockets (issue 15 item 5).

    .venv/bin/pytest tests/test_serve_slow_clients.py -x -q

The app of tests/fixtures_serve.py runs with configs/serve_test.yaml's ``http:`` limits (3 s for the
headers, 4 s for a body, 100 header fields, 64 KiB of headers); serve/http_guard.py enforces them
in Serve's HTTP proxy. The first tests do the same against a bare uvicorn server with the guard
installed, so the protocol itself is checked in seconds without Ray.
"""

from __future__ import annotations

import asyncio
import socket
import threading
import time
from urllib.parse import urlsplit

import pytest


def _address(url: str) -> tuple[str, int]:
    parts = urlsplit(url)
    return parts.hostname, parts.port


def _exchange(address: tuple[str, int], data: bytes, wait_s: float) -> tuple[float, bytes, str]:
    """Send ``data`` (as far as the server takes it), then read until the server closes or ``wait_s``
    passes. Returns (seconds until closed or the wait ran out, what came back, how it ended)."""
    conn = socket.create_connection(address, timeout=10)
    conn.settimeout(wait_s)
    t0 = time.monotonic()
    answer, ended = b"", "closed"
    try:
        try:
            conn.sendall(data)
        except OSError:  # the server closed while we were still sending (a refused header)
            pass
        while True:
            chunk = conn.recv(65536)
            if not chunk:
                break
            answer += chunk
    except TimeoutError:
        ended = "still open"
    except ConnectionResetError:
        ended = "reset"
    finally:
        conn.close()
    return time.monotonic() - t0, answer, ended


def _status(answer: bytes) -> int | None:
    line = answer.split(b"\r\n", 1)[0].split()
    return int(line[1]) if len(line) >= 2 and line[1].isdigit() else None


def _refused(answer: bytes, ended: str) -> bool:
    """431 / 400 / a closed connection without a success."""
    status = _status(answer)
    return status in (400, 431) or (status is None and ended in ("closed", "reset"))


BIG_HEADER = b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Big: " + b"a" * 1_000_000 + b"\r\n\r\n"
MANY_HEADERS = (b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n" + b"".join(b"X-H%d: v\r\n" % i for i in range(5000))
                + b"\r\n")


# ----------------------------------------------------------------------------- the guard alone


@pytest.fixture(scope="module")
def guarded_server():
    """uvicorn with the guard (1 s headers, 1.5 s body), serving an app that echoes the body length."""
    import uvicorn
    from uvicorn import config as uvicorn_config

    from serve.http_guard import GuardLimits, install

    async def app(scope, receive, send):
        if scope["type"] != "http":
            return
        size = 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            size += len(message.get("body", b""))
            if not message.get("more_body"):
                break
        await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"text/plain")]})
        await send({"type": "http.response.body", "body": b"%d" % size})

    saved = uvicorn_config.HTTP_PROTOCOLS["auto"]
    install(GuardLimits(header_timeout_s=1.0, body_timeout_s=1.5, max_header_count=100, max_header_bytes=65536))
    assert uvicorn_config.HTTP_PROTOCOLS["auto"] == "serve.http_guard:GuardedHttpToolsProtocol"
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(app, log_level="error", lifespan="off"))  # http="auto", as Ray's proxy
    thread = threading.Thread(target=lambda: asyncio.run(server.serve(sockets=[sock])), daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not server.started and time.monotonic() < deadline:
        time.sleep(0.05)
    uvicorn_config.HTTP_PROTOCOLS["auto"] = saved  # loaded by now: the rest of the session keeps uvicorn's own
    yield sock.getsockname()
    server.should_exit = True
    thread.join(10)


def test_guard_times_out_unfinished_headers_and_bodies(guarded_server):
    seconds, answer, ended = _exchange(guarded_server, b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\n", wait_s=5)
    assert ended == "closed" and 0.9 < seconds < 2.5, (seconds, ended)
    assert _status(answer) == 408
    seconds, answer, ended = _exchange(guarded_server, b"POST / HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: 100\r\n\r\nab",
                                       wait_s=5)
    assert ended == "closed" and 1.4 < seconds < 3.0 and _status(answer) == 408, (seconds, answer)
    # A connection that sends nothing is closed too (no answer: there was no request).
    seconds, answer, ended = _exchange(guarded_server, b"", wait_s=5)
    assert ended == "closed" and seconds < 2.5 and answer == b""


def test_guard_refuses_big_and_many_headers_and_serves_normal_ones(guarded_server):
    for data in (BIG_HEADER, MANY_HEADERS):
        seconds, answer, ended = _exchange(guarded_server, data, wait_s=5)
        assert _status(answer) == 431 and ended in ("closed", "reset") and seconds < 2, (answer[:200], ended)
    ok = (b"POST / HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\nX-Big: " + b"a" * 30_000 + b"\r\n"
          + b"".join(b"X-H%d: v\r\n" % i for i in range(90)) + b"Content-Length: 5\r\n\r\nhello")
    _, answer, ended = _exchange(guarded_server, ok, wait_s=5)
    assert _status(answer) == 200 and b"\r\n\r\n1\r\n5\r\n" in answer, answer[-100:]


def test_guard_times_the_headers_of_each_request_on_a_kept_alive_connection(guarded_server):
    conn = socket.create_connection(guarded_server, timeout=5)
    try:
        conn.sendall(b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
        first = b""
        while not first.endswith(b"\r\n0\r\n\r\n"):  # the whole chunked answer
            first += conn.recv(65536)
        assert _status(first) == 200
        time.sleep(0.8)  # within uvicorn's keep-alive; the next request's deadline starts at its first byte
        conn.sendall(b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\n")
        t0 = time.monotonic()
        answer = b""
        while chunk := conn.recv(65536):
            answer += chunk
        assert _status(answer) == 408 and 0.9 < time.monotonic() - t0 < 2.5
    finally:
        conn.close()


# ----------------------------------------------------------------------------- the real Serve proxy


@pytest.mark.e2e
def test_unfinished_headers_are_closed_within_the_timeout(served):
    limit = served.cfg.http.header_timeout_s
    seconds, answer, ended = _exchange(_address(served.url), b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Slow: 1",
                                       wait_s=limit + 10)
    assert ended == "closed", f"headers never finished: connection {ended} after {seconds:.1f}s"
    assert seconds < limit + 2 and _status(answer) in (408, None), (seconds, answer)


@pytest.mark.e2e
def test_unfinished_body_is_a_408_and_closed(served):
    limit = served.cfg.http.body_timeout_s
    head = (f"POST /v1/generate HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {served.token}\r\n"
            "Content-Type: application/json\r\nContent-Length: 200\r\n\r\n").encode()
    seconds, answer, ended = _exchange(_address(served.url), head + b'{"prompt": "a red', wait_s=limit + 10)
    assert ended == "closed", f"body never finished: connection {ended} after {seconds:.1f}s"
    assert seconds < limit + 2 and _status(answer) in (408, None), (seconds, answer)


@pytest.mark.e2e
@pytest.mark.parametrize("data", [BIG_HEADER, MANY_HEADERS], ids=["1MB-header", "5000-headers"])
def test_oversized_headers_are_refused(served, data):
    seconds, answer, ended = _exchange(_address(served.url), data, wait_s=15)
    assert _refused(answer, ended), (answer[:300], ended)
    assert seconds < 5


@pytest.mark.e2e
def test_requests_within_the_limits_are_served_and_the_server_stays_up(served):
    import requests

    headers = {**served.headers, "X-Big": "a" * 30_000, **{f"X-H{i}": "v" for i in range(80)}}
    answer = requests.post(f"{served.url}/v1/generate", json={"prompt": "x", "steps": 1}, headers=headers, timeout=60)
    assert answer.status_code == 200, answer.text
    assert requests.get(f"{served.url}/healthz", timeout=10).status_code == 200
