"""Admission at the edge (serve/edge.py; issue 15): Serve's proxy prices and refuses generation requests itself.

    .venv/bin/pytest tests/test_serve_edge.py -x -q

The pricing must equal the ingress's (serve/app.py HandleBackend.cost over the jobs serve/http_api.py
builds), the middleware must refuse only over budget and release what it admitted, and anything it
cannot price like the ingress passes through. The middleware is driven here as the ASGI callable it
is, around a plain ASGI app standing for the rest of the proxy; the real proxy path is the burst test
in tests/test_serve_admission.py (its 503s carry ``x-omnidiff-admission: edge``).
"""

from __future__ import annotations

import asyncio
import json
import os
import stat

import pytest

from serve import auth, edge
from serve.admission import job_cost


def policy(**changes) -> edge.EdgePolicy:
    values = dict(app="img", route_prefix="/api", token_digest=None, allowed_hosts=("127.0.0.1", "localhost"),
                  default_steps=12, max_steps=40, max_n=4, max_body_bytes=4096, sizes=("16x16", "32x16"),
                  native_size="16x16", unsupported_size="error", max_work=10_000, max_requests=50,
                  fallback_retry_after_s=2, max_retry_after_s=60, throughput_window_s=30.0)
    values.update(changes)
    return edge.EdgePolicy(**values)


def body(**fields) -> bytes:
    return json.dumps({"prompt": "a red circle", **fields}).encode()


def test_pricing_is_the_ingress_pricing():
    p = policy()
    native = "/api/v1/generate"
    openai = "/api/v1/images/generations"
    assert p.cost(native, body()) == job_cost(1, 12, 16, 16)  # defaults: n=1, default steps, native size
    assert p.cost(native, body(n=3, steps=7, size="32x16")) == job_cost(3, 7, 32, 16)
    assert p.cost(native, body(size="auto")) == job_cost(1, 12, 16, 16)
    # The OpenAI route always samples the default steps, whatever "steps" it is sent.
    assert p.cost(openai, body(n=2, steps=40, size="32x16")) == job_cost(2, 12, 32, 16)
    # No native size known: the largest listed size, as the ingress prices it until it has seen one.
    assert policy(native_size=None).cost(native, body()) == job_cost(1, 12, 32, 16)
    # No sizes listed: any WIDTHxHEIGHT is what it says.
    assert policy(sizes=()).cost(native, body(size="24x8")) == job_cost(1, 12, 24, 8)


@pytest.mark.parametrize("raw", [
    b"not json", b"[1, 2]", json.dumps({"n": 1}).encode(),  # no prompt
    body(n=0), body(n=5), body(n="2"), body(n=1.0), body(steps=41), body(steps=True),
    body(size="64x64"), body(size="big"), body(size=16),
])
def test_what_the_ingress_would_reject_is_not_priced(raw):
    assert policy().cost("/api/v1/generate", raw) is None


def test_openai_unlisted_sizes_follow_the_configured_leniency():
    openai = "/api/v1/images/generations"
    assert policy().cost(openai, body(size="1024x1024")) is None  # "error": the ingress's 400
    assert policy(unsupported_size="native").cost(openai, body(size="1024x1024")) == job_cost(1, 12, 16, 16)
    assert policy(unsupported_size="native").cost(openai, body(size="huge")) is None


def test_publish_is_private_and_read_back(tmp_path):
    folder = tmp_path / "edge"
    published = policy()
    written = edge.publish(folder, published)
    assert stat.S_IMODE(os.stat(folder).st_mode) == 0o700 and stat.S_IMODE(os.stat(written).st_mode) == 0o600
    (folder / "broken.json").write_text("{")
    routes = edge.read_policies(folder)
    assert set(routes) == {"/api/v1/generate", "/api/v1/images/generations"}
    assert routes["/api/v1/generate"] == published and routes["/api/v1/images/generations"] == published
    edge.withdraw(folder, "img")
    assert edge.read_policies(folder) == {}


# ----------------------------------------------------------------------------- the middleware


class Downstream:
    """The rest of the proxy: records what reached it, answers ``status`` once ``release`` is set."""

    def __init__(self, status: int = 200):
        self.status, self.seen, self.release = status, [], asyncio.Event()

    async def __call__(self, scope, receive, send):
        payload = b""
        while True:
            message = await receive()
            payload += message.get("body", b"")
            if not message.get("more_body", False):
                break
        self.seen.append((scope["path"], payload))
        await self.release.wait()
        await send({"type": "http.response.start", "status": self.status, "headers": []})
        await send({"type": "http.response.body", "body": b"{}"})


def call(middleware, path: str, payload: bytes, headers=None, chunks: int = 1):
    """Run one request through ``middleware``; returns (task, sent messages)."""
    headers = headers if headers is not None else [(b"host", b"127.0.0.1:8000")]
    scope = {"type": "http", "method": "POST", "path": path, "headers": headers}
    step = max(1, len(payload) // chunks)
    parts = [payload[i:i + step] for i in range(0, len(payload), step)] or [b""]
    incoming = [{"type": "http.request", "body": part, "more_body": i < len(parts) - 1} for i, part in enumerate(parts)]
    sent = []

    async def receive():
        if incoming:
            return incoming.pop(0)
        await asyncio.sleep(3600)

    async def send(message):
        sent.append(message)

    return asyncio.ensure_future(middleware(scope, receive, send)), sent


def response(sent) -> tuple[int, dict, dict]:
    start = next(m for m in sent if m["type"] == "http.response.start")
    payload = b"".join(m.get("body", b"") for m in sent if m["type"] == "http.response.body")
    return start["status"], {k.decode(): v.decode() for k, v in start["headers"]}, json.loads(payload or b"{}")


def test_the_edge_refuses_over_budget_and_releases_what_it_admitted(tmp_path):
    async def scenario():
        edge.publish(tmp_path, policy(max_work=3 * job_cost(4, 40, 32, 16)))
        app = Downstream()
        middleware = edge.EdgeAdmission(app, str(tmp_path))
        heavy = body(n=4, steps=40, size="32x16")
        admitted = [call(middleware, "/api/v1/generate", heavy, chunks=3) for _ in range(3)]
        await asyncio.sleep(0.05)
        refused_task, refused = call(middleware, "/api/v1/generate", heavy)
        await refused_task
        status, headers, error = response(refused)
        assert status == 503 and headers["x-omnidiff-admission"] == "edge"
        assert int(headers["retry-after"]) == 2  # nothing finished yet: the fallback
        assert error["error"]["code"] == "queue_full" and "pixel-steps" in error["error"]["message"]
        assert len(app.seen) == 3 and all(b == heavy for _, b in app.seen)  # bodies replayed whole, once
        budget = middleware.budget("img")
        assert budget.in_flight == 3 and budget.queued_work == 3 * job_cost(4, 40, 32, 16)
        app.release.set()
        for task, sent in admitted:
            await task
            assert response(sent)[0] == 200
        assert budget.in_flight == 0 and budget.queued_work == 0
        again, sent = call(middleware, "/api/v1/generate", heavy)
        await again
        assert response(sent)[0] == 200 and len(app.seen) == 4  # room again

    asyncio.run(scenario())


def test_the_edge_passes_on_what_only_the_ingress_can_answer(tmp_path):
    async def scenario():
        digest = auth.token_digest("s3cret")
        edge.publish(tmp_path, policy(max_work=1, token_digest=digest))  # nothing priced would fit now
        app = Downstream(status=400)
        app.release.set()
        middleware = edge.EdgeAdmission(app, str(tmp_path))
        good = [(b"host", b"localhost:1"), (b"authorization", b"Bearer s3cret")]
        cases = [
            ("/api/v1/generate", body(), [(b"host", b"localhost:1")]),  # no token: the ingress's 401
            ("/api/v1/generate", body(), [(b"host", b"evil.example"), good[1]]),  # foreign Host: its 400
            ("/api/v1/generate", body(size="64x64"), good),  # unlisted size: its 400
            ("/api/v1/generate", b"x" * 5000, good),  # over max_body_bytes: its 413
            ("/other/v1/generate", body(), good),  # not this app's route
        ]
        for path, payload, headers in cases:
            task, sent = call(middleware, path, payload, headers=headers, chunks=2)
            await task
            assert response(sent)[0] == 400, (path, headers)  # what Downstream answered: passed through
        assert len(app.seen) == len(cases)
        # A priced request over the (tiny) budget while something is in flight is refused at the edge.
        app.release.clear()
        first, _ = call(middleware, "/api/v1/generate", body(), headers=good)
        await asyncio.sleep(0.05)
        second, sent = call(middleware, "/api/v1/generate", body(), headers=good)
        await second
        assert response(sent)[0] == 503
        app.release.set()
        await first
        assert middleware.budget("img").in_flight == 0  # a 400 from downstream released too

    asyncio.run(scenario())


def test_a_withdrawn_or_changed_policy_is_followed(tmp_path, monkeypatch):
    monkeypatch.setattr(edge, "_RELOAD_EVERY_S", 0.0)

    async def scenario():
        app = Downstream()
        app.release.set()
        middleware = edge.EdgeAdmission(app, str(tmp_path))
        task, sent = call(middleware, "/api/v1/generate", body())
        await task
        assert middleware.budget("img") is None and len(app.seen) == 1  # no policy: passed through
        edge.publish(tmp_path, policy(route_prefix="/v2"))
        task, sent = call(middleware, "/v2/v1/generate", body())
        await task
        assert middleware.budget("img") is not None and middleware.budget("img").in_flight == 0
        edge.withdraw(tmp_path, "img")
        task, sent = call(middleware, "/v2/v1/generate", body())
        await task
        assert response(sent)[0] == 200 and middleware._routes == {}

    asyncio.run(scenario())
