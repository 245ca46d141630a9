"""Serve stage end to end: the real Ray Serve app on 127.0.0.1, called over HTTP.

    .venv/bin/pytest tests/test_serve.py -x -q

The app (tests/fixtures_serve.py ``served``) serves the registered ``serve-test`` model at
@production (a tiny random-weight llm_adapter pipeline) with a bearer token.
"""

from __future__ import annotations

import asyncio
import base64
import io
import json
from pathlib import Path

import numpy as np
import pytest
import requests
from PIL import Image

pytestmark = pytest.mark.e2e


def _production_version() -> str:
    from mlflow.tracking import MlflowClient

    return str(MlflowClient().get_model_version_by_alias("serve-test", "production").version)


def _image(data: bytes) -> Image.Image:
    image = Image.open(io.BytesIO(data))
    image.load()
    return image


def test_openai_client_generates_from_a_chinese_prompt(served):
    import openai

    client = openai.OpenAI(base_url=f"{served.url}/v1", api_key=served.token, max_retries=0, timeout=120)
    # 16x16: the size the test models were made at, the only one their cards list (issue 15 item 4).
    result = client.images.generate(model="serve-test", prompt="蓝色背景上的红色圆形，位于左上角", n=2, size="16x16",
                                    response_format="b64_json")
    assert len(result.data) == 2
    for item in result.data:
        image = _image(base64.b64decode(item.b64_json))
        assert (image.format, image.size, image.mode) == ("PNG", (16, 16), "RGB")
    as_url = client.images.generate(prompt="一个绿色的三角形", response_format="url")
    assert as_url.data[0].url.startswith("data:image/png;base64,")
    assert _image(base64.b64decode(as_url.data[0].url.split(",", 1)[1])).size == (16, 16)  # the model's own size

    with pytest.raises(openai.BadRequestError) as bad:
        client.images.generate(prompt="红色", n=99)
    assert bad.value.param == "n"
    with pytest.raises(openai.BadRequestError) as bad:
        client.images.generate(prompt="红色", model="dall-e-4")  # dall-e-3 is an accepted alias (openai.model_aliases)
    assert bad.value.param == "model"
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=f"{served.url}/v1", api_key="wrong", max_retries=0).images.generate(prompt="红色")


def test_native_generate_png_and_json(served):
    body = {"prompt": "ein gelbes Quadrat unten rechts", "seed": 7, "steps": 3, "size": "16x16"}
    png = requests.post(f"{served.url}/v1/generate", json={**body, "response_format": "png"}, headers=served.headers,
                        timeout=120)
    assert png.status_code == 200, png.text
    assert png.headers["content-type"] == "image/png"
    assert png.headers["x-seed"] == "7" and png.headers["x-model-version"] == _production_version()
    assert _image(png.content).size == (16, 16)

    answer = requests.post(f"{served.url}/v1/generate", json={**body, "n": 2}, headers=served.headers, timeout=120)
    assert answer.status_code == 200, answer.text
    data = answer.json()
    assert data["seeds"] == [7, 8] and data["size"] == "16x16" and data["steps"] == 3 and len(data["images"]) == 2
    assert data["model"] == "serve-test" and data["version"] == _production_version()
    first, second = (np.asarray(_image(base64.b64decode(b)), dtype=int) for b in data["images"])
    # An image depends on its prompt and seed, not on what else shared its batch (+-1 for float rounding).
    assert np.abs(first - np.asarray(_image(png.content), dtype=int)).max() <= 1
    assert np.abs(first - second).max() > 10  # seed 8 is another image


def test_health_readiness_and_model_lineage(served):
    assert requests.get(f"{served.url}/healthz", timeout=10).json() == {"status": "ok"}
    ready = requests.get(f"{served.url}/readyz", timeout=10)
    assert ready.status_code == 200 and ready.json()["ready"] is True
    assert ready.json()["version"] == _production_version()

    # Without the token: names, sizes and examples only (tests/test_serve_openai.py); a wrong token is a 401.
    assert "lineage" not in requests.get(f"{served.url}/v1/models", timeout=10).json()["data"][0]
    assert requests.get(f"{served.url}/v1/models", headers={"Authorization": "Bearer wrong"}, timeout=10).status_code == 401
    card = requests.get(f"{served.url}/v1/models", headers=served.headers, timeout=10).json()["data"][0]
    version = _production_version()
    assert (card["id"], card["version"], card["alias"], card["conditioning"]) == ("serve-test", version, "production",
                                                                                  "llm_adapter")
    lineage = card["lineage"]
    # Registry tags (run id, snapshot digest, cache fingerprint, parent) and the folder's lineage.json.
    assert lineage["snapshot_digest"] == f"snap{version}" and lineage["cache_fingerprint"] == f"fp{version}"
    assert lineage["run_id"] and lineage["parent_model"] and lineage["model_version"] == version
    assert lineage["runs.train"] == f"run-of-v{version}"


BAD_INPUT = [
    # (path, body: dict/list JSON or raw bytes, status, error.param)
    ("/v1/images/generations", b'{"prompt": "x",', 400, None),
    ("/v1/images/generations", b"", 400, None),
    ("/v1/images/generations", [1, 2], 400, None),
    ("/v1/images/generations", {}, 400, "prompt"),
    ("/v1/images/generations", {"prompt": None}, 400, "prompt"),
    ("/v1/images/generations", {"prompt": "x" * 8001}, 400, "prompt"),
    ("/v1/images/generations", {"prompt": "   "}, 400, "prompt"),
    ("/v1/images/generations", {"prompt": "x", "n": 0}, 400, "n"),
    ("/v1/images/generations", {"prompt": "x", "n": 5}, 400, "n"),
    ("/v1/images/generations", {"prompt": "x", "n": "2"}, 400, "n"),
    ("/v1/images/generations", {"prompt": "x", "size": "1024x1024"}, 400, "size"),
    ("/v1/images/generations", {"prompt": "x", "response_format": "jpeg"}, 400, "response_format"),
    ("/v1/images/generations", {"prompt": "x", "quality": "ultra"}, 400, "quality"),  # hd and co. are accepted
    ("/v1/images/generations", {"prompt": "x", "model": "dall-e-4"}, 400, "model"),  # dall-e-3 is an alias
    ("/v1/images/generations", {"prompt": "x", "size": "32x32"}, 400, "size"),  # the model was made at 16x16
    ("/v1/generate", {"prompt": "x", "size": "32x32"}, 400, "size"),
    ("/v1/generate", {"prompt": "x", "steps": 9}, 400, "steps"),
    ("/v1/generate", {"prompt": "x", "steps": "many"}, 400, "steps"),
    ("/v1/generate", {"prompt": "x", "guidance_scale": 21}, 400, "guidance_scale"),
    ("/v1/generate", {"prompt": "x", "seed": -1}, 400, "seed"),
    ("/v1/generate", {"prompt": "x", "negative_prompt": "y" * 8001}, 400, "negative_prompt"),
    ("/v1/generate", {"prompt": "x", "n": 2, "response_format": "png"}, 400, "response_format"),
    ("/v1/generate", {"prompt": 42}, 400, "prompt"),
    ("/v1/generate", {"prompt": "x" * 70000}, 413, None),  # over limits.max_body_bytes: refused unparsed
]


@pytest.mark.parametrize(("path", "body", "status", "param"), BAD_INPUT,
                         ids=[f"{p.rsplit('/', 1)[-1]}-{i}" for i, (p, *_) in enumerate(BAD_INPUT)])
def test_bad_input_is_a_4xx_naming_the_field(served, path, body, status, param):
    headers = {**served.headers, "Content-Type": "application/json"}
    raw = body if isinstance(body, bytes) else json.dumps(body).encode()
    answer = requests.post(f"{served.url}{path}", data=raw, headers=headers, timeout=60)
    assert answer.status_code == status, answer.text
    error = answer.json()["error"]
    assert error["param"] == param and error["message"]
    if param:
        assert error["message"].startswith(param)


def test_chunked_body_over_the_limit_is_413(served):
    def chunks():
        yield b'{"prompt": "'
        for _ in range(20):
            yield b"x" * 4096
        yield b'"}'

    answer = requests.post(f"{served.url}/v1/generate", data=chunks(),
                           headers={**served.headers, "Content-Type": "application/json"}, timeout=60)
    assert answer.status_code == 413 and answer.json()["error"]["code"] == "body_too_large"


def test_unknown_route_and_method_are_json(served):
    missing = requests.get(f"{served.url}/v1/nope", timeout=10)
    assert missing.status_code == 404 and missing.json()["error"]["code"] == "http_404"
    wrong = requests.get(f"{served.url}/v1/generate", headers=served.headers, timeout=10)
    assert wrong.status_code == 405 and "error" in wrong.json()


def test_bearer_token_guards_the_api_only(served):
    for method, path in (("get", "/v1/models"), ("post", "/v1/generate"), ("post", "/v1/images/generations")):
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": f"Basic {served.token}"}):
            if path == "/v1/models" and not headers:
                continue  # open without a token, but then shows no lineage (tests/test_serve_openai.py)
            answer = requests.request(method, f"{served.url}{path}", json={"prompt": "x"}, headers=headers, timeout=10)
            assert answer.status_code == 401, (path, headers)
            assert answer.headers["www-authenticate"] == "Bearer"
            assert answer.json()["error"]["type"] == "authentication_error"
    for path in ("/healthz", "/readyz", "/", "/openapi.json"):
        assert requests.get(f"{served.url}{path}", timeout=10).status_code == 200, path


def test_served_openapi_is_the_apps_spec(served):
    from serve import auth
    from serve.app import running
    from serve.http_api import build_fastapi, settings_from_config

    spec = requests.get(f"{served.url}/openapi.json", timeout=10).json()
    pinned = running(served.cfg.app_name)["model"]
    expected = build_fastapi(settings_from_config(served.cfg, auth.token_digest(served.token), pinned), None).openapi()
    assert spec == expected
    model = spec["components"]["schemas"]["ImagesGenerationRequest"]["properties"]["model"]["anyOf"][0]
    assert model["enum"] == ["serve-test", f"serve-test/{pinned['version']}", "serve-test@production",
                             *served.cfg.openai.model_aliases]
    # Every documented operation is routed (none answers 404/405).
    for path, operations in spec["paths"].items():
        for method in operations:
            answer = requests.request(method, f"{served.url}{path}", headers=served.headers, json={}, timeout=60)
            assert answer.status_code not in (404, 405), (method, path)


def test_no_endpoint_reads_a_path_from_the_request(served, tmp_path):
    secret = tmp_path / "secret.txt"
    secret.write_text("TOP-SECRET-MARKER")
    for value in (str(secret), f"file://{secret}", "../" * 12 + str(secret).lstrip("/")):
        answers = [
            requests.post(f"{served.url}/v1/images/generations", json={"prompt": value, "model": value},
                          headers=served.headers, timeout=60),
            requests.post(f"{served.url}/v1/generate", json={"prompt": value, "negative_prompt": value, "steps": 1},
                          headers=served.headers, timeout=60),
            requests.get(f"{served.url}/{value}", headers=served.headers, timeout=60),
            requests.get(f"{served.url}/v1/models", params={"path": value}, headers=served.headers, timeout=60),
        ]
        assert answers[0].status_code == 400 and answers[0].json()["error"]["param"] == "model"
        assert answers[1].status_code == 200  # a path is just a prompt
        for answer in answers:
            assert "TOP-SECRET-MARKER" not in answer.text


def test_concurrent_requests_share_a_sampling_loop(served):
    import httpx

    bodies = [{"prompt": f"红色的圆 {i}", "steps": 4, "seed": i, **({"negative_prompt": "模糊"} if i % 2 else {})}
              for i in range(6)]

    async def burst() -> list[dict]:
        async with httpx.AsyncClient(timeout=120, headers=served.headers) as client:
            calls = [client.post(f"{served.url}/v1/generate", json=body) for body in bodies]
            return [r.json() for r in await asyncio.gather(*calls)]

    answers = asyncio.run(burst())
    assert max(a["batch_size"] for a in answers) > 1, [a.get("batch_size") for a in answers]
    # Sharing a loop (with other prompts, seeds and negative prompts) does not change an image.
    for i in (2, 3):
        alone = requests.post(f"{served.url}/v1/generate", json=bodies[i], headers=served.headers, timeout=120).json()
        shared, solo = (np.asarray(_image(base64.b64decode(a["images"][0])), dtype=int) for a in (answers[i], alone))
        assert np.abs(shared - solo).max() <= 1, (i, answers[i]["batch_size"], alone["batch_size"])


def test_overload_is_a_quick_json_503_and_the_server_stays_healthy(served):
    import httpx

    async def storm():
        async with httpx.AsyncClient(timeout=120, headers=served.headers,
                                     limits=httpx.Limits(max_connections=100)) as client:
            body = {"prompt": "a red circle", "n": 4, "steps": 2}
            calls = [client.post(f"{served.url}/v1/generate", json=body) for _ in range(40)]
            health = [client.get(f"{served.url}/healthz") for _ in range(5)]
            return await asyncio.gather(*calls), await asyncio.gather(*health)

    answers, health = asyncio.run(storm())
    statuses = [a.status_code for a in answers]
    assert set(statuses) <= {200, 503}, statuses
    rejected = [a for a in answers if a.status_code == 503]
    assert rejected, "40 requests at once should overflow 8 in flight + a queue of 8"
    for answer in rejected:
        assert answer.headers["content-type"] == "application/json"
        # Computed from the measured drain rate (serve/admission.py), within the configured cap.
        assert 1 <= int(answer.headers["retry-after"]) <= served.cfg.admission.max_retry_after_s
        assert answer.json()["error"]["code"] == "queue_full"
    assert all(h.status_code == 200 for h in health)
    after = requests.post(f"{served.url}/v1/generate", json={"prompt": "x", "steps": 1}, headers=served.headers,
                          timeout=60)
    assert after.status_code == 200


def test_serve_status_command(served, capsys):
    from serve import cli

    config = str(Path(__file__).resolve().parents[1] / "configs" / "serve_test.yaml")
    code = cli.main(["status", "--config", config, f"port={served.cfg.port}", "--json"])
    report = json.loads(capsys.readouterr().out)
    assert code == 0, report
    assert report["status"] == "RUNNING" and report["ready"] is True
    assert report["model"]["version"] == _production_version()
    assert report["deployments"]["Generator"]["replicas"].get("RUNNING") == 1


def test_a_second_app_on_another_port_is_a_clear_error(served):
    """A Ray cluster has one Serve HTTP proxy: asking for another port names the live one instead of
    deploying an app nobody can reach where the config says."""
    from omnidiff.config import ConfigError, replace
    from serve import app as serve_app

    other = replace(served.cfg, port=served.cfg.port + 1, app_name="omnidiff-test-other")
    with pytest.raises(ConfigError, match=rf"already listens on 127\.0\.0\.1:{served.cfg.port}.*omnidiff-test"):
        serve_app.start_serve(other)
    assert requests.get(f"{served.url}/healthz", timeout=10).status_code == 200
