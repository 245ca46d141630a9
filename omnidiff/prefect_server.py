"""The local stack's Prefect server: Prefect's own app, behind a check of the Host header.

    python -m omnidiff.prefect_server --host 127.0.0.1 --port 4200 [--allowed-host 127.0.0.1 ...]

``omnidiff stack up`` runs this instead of ``prefect server start``. It does what that command
does in the foreground with one worker (``uvicorn.run(create_app(final=True))``, Prefect 3.9's
``cli/_server_utils.py``) with Starlette's ``TrustedHostMiddleware`` around the app: a request
whose ``Host`` is not one of ``--allowed-host`` (default ``127.0.0.1`` and ``localhost``) gets 400
"Invalid host header" before Prefect sees it. Prefect has no setting for that; without it a page
that rebinds its own DNS name to 127.0.0.1 talks to the server as a same-origin client (issue 15).

Everything else comes from Prefect's settings in the environment, as for ``prefect server
start``: the API auth string (``PREFECT_SERVER_API_AUTH_STRING``), the CORS allow-list
(``PREFECT_SERVER_CORS_ALLOWED_*``), analytics, keep-alive and websocket ping times, log level.
omnidiff/stack_services.py sets them.
"""

from __future__ import annotations

import argparse

DEFAULT_ALLOWED_HOSTS = ("127.0.0.1", "localhost")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m omnidiff.prefect_server", description=__doc__.split("\n")[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--allowed-host", action="append", dest="allowed_hosts",
                        help="a Host header value (no port) the server answers; repeatable "
                             f"(default: {', '.join(DEFAULT_ALLOWED_HOSTS)})")
    args = parser.parse_args(argv)
    allowed = args.allowed_hosts or list(DEFAULT_ALLOWED_HOSTS)
    if "*" in allowed:
        parser.error("--allowed-host '*' would switch the Host check off")

    import uvicorn
    from prefect.server.api.server import create_app
    from prefect.settings import get_current_settings
    from starlette.middleware.trustedhost import TrustedHostMiddleware

    settings = get_current_settings().server
    app = TrustedHostMiddleware(create_app(final=True), allowed_hosts=allowed, www_redirect=False)
    uvicorn.run(
        app,
        host=args.host,
        port=args.port,
        timeout_keep_alive=settings.api.keepalive_timeout,
        ws_ping_interval=settings.api.websocket_ping_interval,
        ws_ping_timeout=settings.api.websocket_ping_timeout,
        log_level=settings.logging_level.lower(),
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
