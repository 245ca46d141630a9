"""Slow and oversized clients, refused at Ray Serve's HTTP proxy (issue 15).

Serve's proxy is a uvicorn server whose ``uvicorn.Config`` Ray builds itself: of the knobs that
matter here it exposes only the keep-alive timeout (``HTTPOptions.keep_alive_timeout_s``, set by
serve/app.py). uvicorn has no header-read or body-read timeout at all, and its httptools parser (the
one used when httptools is installed, as here) has no limit on header count or size: a client that
never finishes its headers or its body holds a connection forever, and a 1 MB header is parsed.
An ASGI middleware cannot help with headers (the app is only called once they are complete), so the
limits live in the HTTP protocol itself:

* :class:`GuardedHttpToolsProtocol` is uvicorn's httptools protocol plus a timer and two counters:
  the request line and headers must arrive within ``header_timeout_s`` of the connection opening
  (or of the request's first byte on a kept-alive connection), the body within ``body_timeout_s`` of
  the headers (else 408 and the connection is closed); more than ``max_header_count`` header fields
  or ``max_header_bytes`` bytes of request line + headers is 431 and a closed connection, counted
  while they arrive, so an endless header is cut off at the limit, not buffered.
* It gets into the proxy through Ray's own per-proxy startup hook: ``RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH``
  names :func:`proxy_callback`, which runs in the proxy process before its server starts and registers
  the guarded class as uvicorn's ``auto`` HTTP protocol (``uvicorn.config.HTTP_PROTOCOLS``; Ray's
  proxy asks uvicorn for ``auto``). The variables reach the proxy as the Serve controller's
  ``runtime_env`` (``serve.start(controller_options=...)``, inherited by the proxy actors it starts),
  so they apply when Serve starts; a Serve instance already running keeps what it started with.

What is not enforced here: a slow *reader* of the response (uvicorn's flow control pauses the app;
the body has left the generator by then), and HTTP/2 (the proxy speaks HTTP/1.1 only). The same hook adds serve/edge.py's admission middleware to the proxy. This module
imports no Ray and no FastAPI: it is loaded in the proxy process.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import asdict, dataclass

log = logging.getLogger("omnidiff.serve")

ENV = "OMNIDIFF_SERVE_HTTP_GUARD"
CALLBACK_ENV = "RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH"
CALLBACK = "serve.http_guard.proxy_callback"
EDGE_ENV = "OMNIDIFF_SERVE_EDGE_DIR"  # serve/edge.py (kept in step with serve.edge.ENV)
_PROTOCOL = "serve.http_guard:GuardedHttpToolsProtocol"


@dataclass(frozen=True)
class GuardLimits:
    header_timeout_s: float = 10.0
    body_timeout_s: float = 30.0
    max_header_count: int = 100
    max_header_bytes: int = 65536


def proxy_env(limits: GuardLimits, edge_dir: str | None = None) -> dict[str, str]:
    """Environment variables that make a Serve proxy install the guard with ``limits`` (and, with
    ``edge_dir``, admission at the edge from the policies published there: serve/edge.py)."""
    env = {CALLBACK_ENV: CALLBACK, ENV: json.dumps(asdict(limits))}
    if edge_dir:
        env[EDGE_ENV] = str(edge_dir)
    return env


def proxy_callback() -> list:
    """Ray's HTTP-proxy callback: install the guard from ``$OMNIDIFF_SERVE_HTTP_GUARD``; the edge's
    admission middleware when ``$OMNIDIFF_SERVE_EDGE_DIR`` names a policy folder."""
    install(GuardLimits(**json.loads(os.environ.get(ENV) or "{}")))
    directory = os.environ.get(EDGE_ENV)
    if not directory:
        return []
    from starlette.middleware import Middleware

    from serve.edge import EdgeAdmission

    log.info("edge admission from %s", directory)
    return [Middleware(EdgeAdmission, directory=directory)]


def install(limits: GuardLimits) -> None:
    """Make ``limits`` the guard's and the guarded protocol uvicorn's ``auto`` HTTP protocol (this process)."""
    from uvicorn import config as uvicorn_config

    GuardedHttpToolsProtocol.limits = limits
    uvicorn_config.HTTP_PROTOCOLS["auto"] = _PROTOCOL
    log.info("HTTP guard: %s", limits)


def _raw_response(status: int, reason: str, message: str, code: str) -> bytes:
    body = json.dumps({"error": {"message": message, "type": "invalid_request_error", "param": None,
                                 "code": code}}).encode()
    head = (f"HTTP/1.1 {status} {reason}\r\ncontent-type: application/json\r\ncontent-length: {len(body)}\r\n"
            "connection: close\r\n\r\n").encode("ascii")
    return head + body


class _Refused(Exception):
    """Raised from a parser callback to stop parsing (httptools turns it into HttpParserCallbackError)."""


try:
    from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol
except ImportError:  # pragma: no cover - httptools is a dependency (uvicorn[standard])
    HttpToolsProtocol = None  # type: ignore[assignment,misc]


if HttpToolsProtocol is not None:

    class GuardedHttpToolsProtocol(HttpToolsProtocol):  # type: ignore[valid-type,misc]
        """uvicorn's httptools protocol with header/body deadlines and header limits (see the module docstring)."""

        limits = GuardLimits()

        def connection_made(self, transport) -> None:
            self._guard_timer = None
            self._guard_refusal: bytes | None = None
            self._guard_in_headers = False
            self._guard_header_count = 0
            self._guard_header_bytes = 0
            self._guard_request_bytes = 0  # of the request being read, before its headers completed
            super().connection_made(transport)
            self._guard_arm(self.limits.header_timeout_s, "header")

        def connection_lost(self, exc) -> None:
            self._guard_disarm()
            super().connection_lost(exc)

        # -- timers -----------------------------------------------------------------------

        def _guard_arm(self, seconds: float, what: str) -> None:
            self._guard_disarm()
            self._guard_timer = self.loop.call_later(seconds, self._guard_expired, what)

        def _guard_disarm(self) -> None:
            if self._guard_timer is not None:
                self._guard_timer.cancel()
                self._guard_timer = None

        def _guard_expired(self, what: str) -> None:
            self._guard_timer = None
            if self.transport.is_closing():
                return
            seconds = self.limits.header_timeout_s if what == "header" else self.limits.body_timeout_s
            cycle = self.cycle if what == "body" else None
            started = self._guard_request_bytes > 0 or what == "body"
            if started and (cycle is None or not cycle.response_started):
                self.transport.write(_raw_response(408, "Request Timeout",
                                                   f"request {what} not received within {seconds:g}s",
                                                   "request_timeout"))
            if cycle is not None:  # the app, waiting on the body, is told the client is gone
                cycle.disconnected = True
                cycle.message_event.set()
            self.transport.close()

        # -- header limits ----------------------------------------------------------------

        def _guard_refuse(self, why: str) -> None:
            self._guard_refusal = _raw_response(431, "Request Header Fields Too Large", why,
                                                "request_header_fields_too_large")
            raise _Refused(why)

        def send_400_response(self, msg: str) -> None:
            if self._guard_refusal is None:
                return super().send_400_response(msg)
            self._guard_disarm()
            self.transport.write(self._guard_refusal)
            self.transport.close()

        def data_received(self, data: bytes) -> None:
            if self._guard_refusal is not None or self.transport.is_closing():
                return
            reading_headers = self._guard_in_headers or self.cycle is None or self.cycle.response_complete
            super().data_received(data)
            if reading_headers and self._guard_in_headers and not self.transport.is_closing():
                # All of ``data`` went to a request line and headers that are still unfinished: an
                # endless header is cut off here, before the parser has buffered more than the limit.
                self._guard_request_bytes += len(data)
                if self._guard_request_bytes > self.limits.max_header_bytes:
                    self._guard_refusal = _raw_response(
                        431, "Request Header Fields Too Large",
                        f"request line and headers over {self.limits.max_header_bytes} bytes",
                        "request_header_fields_too_large")
                    self.send_400_response("")

        def on_message_begin(self) -> None:
            super().on_message_begin()
            self._guard_in_headers = True
            self._guard_header_count = 0
            self._guard_header_bytes = 0
            self._guard_request_bytes = 0
            if self._guard_timer is None:  # a kept-alive connection: the deadline runs from this first byte
                self._guard_arm(self.limits.header_timeout_s, "header")

        def on_url(self, url: bytes) -> None:
            self._guard_header_bytes += len(url)
            if self._guard_header_bytes > self.limits.max_header_bytes:
                self._guard_refuse(f"request line and headers over {self.limits.max_header_bytes} bytes")
            super().on_url(url)

        def on_header(self, name: bytes, value: bytes) -> None:
            self._guard_header_count += 1
            self._guard_header_bytes += len(name) + len(value) + 4
            if self._guard_header_count > self.limits.max_header_count:
                self._guard_refuse(f"more than {self.limits.max_header_count} header fields")
            if self._guard_header_bytes > self.limits.max_header_bytes:
                self._guard_refuse(f"request line and headers over {self.limits.max_header_bytes} bytes")
            super().on_header(name, value)

        def on_headers_complete(self) -> None:
            self._guard_in_headers = False
            self._guard_arm(self.limits.body_timeout_s, "body")
            super().on_headers_complete()

        def on_message_complete(self) -> None:
            self._guard_disarm()
            super().on_message_complete()
