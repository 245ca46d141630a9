"""serve: the API answers only the Host names it is served under (issue 15 item 1, DNS rebinding)."""

from __future__ import annotations

import pytest
from starlette.testclient import TestClient

from omnidiff.config import from_dict
from serve.config import ServeConfig
from serve.http_api import allowed_hosts, build_fastapi, settings_from_config


def _config(**overrides) -> ServeConfig:
    return from_dict(ServeConfig, {"model": "m", **overrides})


@pytest.mark.parametrize(
    ("host", "http", "expected"),
    [
        ("127.0.0.1", {}, ("127.0.0.1", "localhost", "[::1]")),
        ("0.0.0.0", {}, ("*",)),
        ("0.0.0.0", {"allowed_hosts": ["images.example.org"]}, ("images.example.org",)),
    ],
)
def test_allowed_hosts_follow_the_bind_address(host, http, expected):
    assert allowed_hosts(_config(host=host, http=http)) == expected


@pytest.mark.parametrize(
    ("host", "status"),
    [("127.0.0.1:8000", 200), ("localhost", 200), ("[::1]:8000", 200), ("evil.example", 400),
     ("evil.example:8000", 400), ("127.0.0.1.evil.example", 400), ("", 400)],
)
def test_a_foreign_host_gets_a_json_400(host, status):
    app = build_fastapi(settings_from_config(_config(host="127.0.0.1"), None), None)
    with TestClient(app, base_url="http://127.0.0.1") as client:
        response = client.get("/healthz", headers={"host": host})
    assert response.status_code == status, response.text
    if status == 400:
        assert response.json()["error"]["code"] == "invalid_host"


def test_a_public_bind_answers_any_host():
    app = build_fastapi(settings_from_config(_config(host="0.0.0.0"), None), None)
    with TestClient(app) as client:
        assert client.get("/healthz", headers={"host": "images.example.org"}).status_code == 200
