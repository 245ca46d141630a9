"""Serve a world's images over HTTP on 127.0.0.1, so img2dataset collects them like a real corpus.

    with serve_world(world_dir) as base_url:      # in-process, a free port
        write_url_list(world_dir, base_url)
    omnidiff world serve --port 8765              # standalone process, until Ctrl-C / SIGTERM

Only ``GET/HEAD /images/<image_id>.png`` (and ``/healthz``) are answered; any
other path is a 404, so nothing but the images leaves the folder.
"""

from __future__ import annotations

import contextlib
import re
import threading
from collections.abc import Iterator
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

_IMAGE_PATH = re.compile(r"^/images/([A-Za-z0-9_-]+\.png)$")


def _handler(images_dir: Path) -> type[BaseHTTPRequestHandler]:
    class WorldImageHandler(BaseHTTPRequestHandler):
        server_version = "omnidiff-world/1"

        def _respond(self, head_only: bool) -> None:
            path = self.path.split("?", 1)[0]
            if path == "/healthz":
                body, ctype = b"ok\n", "text/plain; charset=utf-8"
            else:
                match = _IMAGE_PATH.match(path)
                file = images_dir / match.group(1) if match else None
                if file is None or not file.is_file():
                    self.send_error(HTTPStatus.NOT_FOUND, "no such image")
                    return
                body, ctype = file.read_bytes(), "image/png"
            self.send_response(HTTPStatus.OK)
            self.send_header("Content-Type", ctype)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            if not head_only:
                self.wfile.write(body)

        def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
            self._respond(head_only=False)

        def do_HEAD(self) -> None:  # noqa: N802
            self._respond(head_only=True)

        def log_message(self, format: str, *args) -> None:  # noqa: A002
            pass  # quiet: img2dataset makes thousands of requests

    return WorldImageHandler


def make_server(world_dir: str | Path, host: str = "127.0.0.1", port: int = 0) -> ThreadingHTTPServer:
    """A bound (not yet serving) threaded HTTP server for ``<world_dir>/images``."""
    images = Path(world_dir) / "images"
    if not images.is_dir():
        raise FileNotFoundError(f"{str(world_dir)!r} has no images/ folder; run `omnidiff world generate` first")
    server = ThreadingHTTPServer((host, port), _handler(images.resolve()))
    server.daemon_threads = True
    return server


def base_url_of(server: ThreadingHTTPServer) -> str:
    host, port = server.server_address[:2]
    return f"http://{host}:{port}"


@contextlib.contextmanager
def serve_world(world_dir: str | Path, host: str = "127.0.0.1", port: int = 0) -> Iterator[str]:
    """Serve ``<world_dir>/images`` in a background thread; yields the base url (``http://host:port``)."""
    server = make_server(world_dir, host, port)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.1}, daemon=True,
                              name="world-http")  # fmt: skip
    thread.start()
    try:
        yield base_url_of(server)
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=10)
