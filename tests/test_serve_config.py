"""Serve stage without a server: config validation, request schemas, auth, the OpenAPI spec.

    .venv/bin/pytest tests/test_serve_config.py -q
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from pydantic import ValidationError

from omnidiff.config import ConfigError, load_any, load_config
from serve import auth
from serve.config import ServeConfig, parse_size
from serve.http_api import build_fastapi, settings_from_config
from serve.models import pin_model
from serve.schemas import request_models

# Nothing here may import Ray (serve.app does): an early `import ray` freezes Ray's constants before
# the `stack` fixture sets its environment (RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0), and a later driver
# then dials the machine's address instead of 127.0.0.1 and hangs (test_no_ray_at_import).

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("name", ["serve.yaml", "serve_test.yaml"])
def test_shipped_yaml_loads(name):
    cfg = load_any(REPO / "configs" / name)
    assert isinstance(cfg, ServeConfig)
    assert cfg.host == "127.0.0.1"  # not reachable from outside unless someone says so


@pytest.mark.parametrize(
    ("override", "key"),
    [
        ("port=70000", "port"),
        ("max_queued_requests=0", "max_queued_requests"),
        ("limits.sizes=['32']", "limits.sizes[0]"),
        ("limits.default_steps=99", "limits.default_steps"),
        ("batching.max_batch_size=2", "batching.max_batch_size"),  # < limits.max_n=4
        ("max_ongoing_requests=4", "max_ongoing_requests"),  # < max_batch_size=8
        ("route_prefix=api", "route_prefix"),
        ("auth.token_env='not a var'", "auth.token_env"),
        ("device=tpu", "device"),
    ],
)
def test_bad_config_names_the_key(override, key):
    with pytest.raises(ConfigError) as info:
        load_config(ServeConfig, REPO / "configs" / "serve.yaml", [override])
    assert str(info.value).startswith(f"{key}="), info.value


def test_parse_size():
    assert parse_size("32x16") == (32, 16)
    with pytest.raises(ValueError, match="size='0x3'"):
        parse_size("0x3")


def _models(**limits):
    cfg = load_config(ServeConfig, None, [f"limits.{k}={v}" for k, v in limits.items()])
    return request_models(cfg.limits)


def _field_of(exc: ValidationError) -> str:
    return ".".join(str(p) for p in exc.errors()[0]["loc"])


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({}, "prompt"),
        ({"prompt": ""}, "prompt"),
        ({"prompt": "   "}, "prompt"),
        ({"prompt": "x" * 101}, "prompt"),
        ({"prompt": "a", "n": 0}, "n"),
        ({"prompt": "a", "n": 5}, "n"),
        ({"prompt": "a", "n": "2"}, "n"),  # strict: no silent str -> int
        ({"prompt": "a", "n": True}, "n"),
        ({"prompt": "a", "size": "1024x1024"}, "size"),
        ({"prompt": "a", "response_format": "jpeg"}, "response_format"),
        ({"prompt": "a", "colour": "red"}, "colour"),
        ({"prompt": 7}, "prompt"),
        ({"prompt": "\ud800"}, "prompt"),  # lone surrogate: valid JSON escape, not valid text
    ],
)
def test_openai_request_rejects(body, field):
    with pytest.raises(ValidationError) as info:
        _models(max_prompt_chars=100).images.model_validate(body)
    assert _field_of(info.value) == field


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"prompt": "a", "steps": 0}, "steps"),
        ({"prompt": "a", "steps": 51}, "steps"),
        ({"prompt": "a", "steps": 2.5}, "steps"),
        ({"prompt": "a", "guidance_scale": -1}, "guidance_scale"),
        ({"prompt": "a", "guidance_scale": "3"}, "guidance_scale"),
        ({"prompt": "a", "seed": -1}, "seed"),
        ({"prompt": "a", "seed": 2**32}, "seed"),
        ({"prompt": "a", "negative_prompt": "y" * 101}, "negative_prompt"),
        ({"prompt": "a", "response_format": "gif"}, "response_format"),
    ],
)
def test_native_request_rejects(body, field):
    with pytest.raises(ValidationError) as info:
        _models(max_prompt_chars=100).generate.model_validate(body)
    assert _field_of(info.value) == field


def test_native_request_defaults_follow_config():
    body = _models(default_steps=7).generate.model_validate({"prompt": "蓝色背景上的红色圆形", "guidance_scale": 2})
    assert (body.steps, body.guidance_scale, body.n, body.seed, body.response_format) == (7, 2.0, 1, None, "json")


def test_token_from_env_or_file(tmp_path, monkeypatch):
    monkeypatch.delenv("SERVE_TOKEN_T", raising=False)
    assert auth.load_token("SERVE_TOKEN_T", None) is None
    secret = tmp_path / "token"
    secret.write_text("s3cret\n")
    os.chmod(secret, 0o644)
    with pytest.raises(ConfigError, match="auth.token_file=.*readable by group/others"):
        auth.load_token("SERVE_TOKEN_T", secret)
    os.chmod(secret, 0o600)
    assert auth.load_token("SERVE_TOKEN_T", secret) == "s3cret"
    monkeypatch.setenv("SERVE_TOKEN_T", "from-env")
    assert auth.load_token("SERVE_TOKEN_T", secret) == "from-env"
    with pytest.raises(ConfigError, match="no such file"):
        monkeypatch.delenv("SERVE_TOKEN_T")
        auth.load_token("SERVE_TOKEN_T", tmp_path / "missing")


def test_bearer_check():
    digest = auth.token_digest("s3cret")
    assert auth.bearer_ok("Bearer s3cret", digest)
    assert auth.bearer_ok("bearer s3cret", digest)
    for header in (None, "", "Bearer", "Bearer s3cre", "Basic s3cret", "s3cret"):
        assert not auth.bearer_ok(header, digest), header
    assert auth.bearer_ok(None, None)  # auth off


def test_spec_states_limits_and_400_not_422():
    cfg = load_config(ServeConfig, REPO / "configs" / "serve.yaml", ["limits.max_prompt_chars=1234", "limits.max_n=3"])
    spec = build_fastapi(settings_from_config(cfg, auth.token_digest("t")), None).openapi()
    assert set(spec["paths"]) == {"/", "/healthz", "/readyz", "/v1/models", "/v1/images/generations", "/v1/generate"}
    body = spec["components"]["schemas"]["ImagesGenerationRequest"]
    assert body["properties"]["prompt"]["maxLength"] == 1234
    assert body["properties"]["n"]["maximum"] == 3
    assert body["additionalProperties"] is False
    for path in ("/v1/images/generations", "/v1/generate"):
        responses = spec["paths"][path]["post"]["responses"]
        assert {"200", "400", "401", "413", "503"} <= set(responses) and "422" not in responses
        assert spec["paths"][path]["post"]["security"] == [{"HTTPBearer": []}]
    assert "image/png" in spec["paths"]["/v1/generate"]["post"]["responses"]["200"]["content"]
    seed = spec["components"]["schemas"]["GenerateRequest"]["properties"]["seed"]["anyOf"][0]
    assert (seed["minimum"], seed["maximum"]) == (0, 2**32 - 1)
    assert '"ge":' not in json.dumps(spec) and '"le":' not in json.dumps(spec)  # not JSON Schema: ignored by clients
    # Without a token there is no security requirement and no 401 in the spec.
    open_spec = build_fastapi(settings_from_config(cfg, None), None).openapi()
    assert "security" not in open_spec["paths"]["/v1/generate"]["post"]
    assert "401" not in open_spec["paths"]["/v1/generate"]["post"]["responses"]


def test_pin_model_folder_and_bad_refs(tmp_path, monkeypatch):
    folder = tmp_path / "pipe"
    folder.mkdir()
    with pytest.raises(ConfigError, match="no model_index.json"):
        pin_model(load_config(ServeConfig, None, [f"model={folder}"]))
    (folder / "model_index.json").write_text('{"_class_name": "OmniDiffusionPipeline"}')
    pinned = pin_model(load_config(ServeConfig, None, [f"model={folder}"]))
    assert pinned["ref"] == str(folder.resolve()) and pinned["version"] is None
    with pytest.raises(ConfigError, match="neither a pipeline folder nor a registry ref"):
        pin_model(load_config(ServeConfig, None, [f"model={tmp_path / 'nope' / 'x y'}"]))
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    with pytest.raises(ConfigError, match="needs MLFLOW_TRACKING_URI"):
        pin_model(load_config(ServeConfig, None, ["model=omnidiff-tiny"]))


def test_no_ray_at_import():
    import subprocess
    import sys

    code = "import sys, serve.http_api, serve.models, serve.cli, serve.schemas; print('ray' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=REPO)
    assert out.stdout.strip() == "False"
