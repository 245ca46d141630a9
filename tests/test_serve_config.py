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
        ("limits.sizes=['16x16','16x16']", "limits.sizes"),
        ("openai.unsupported_size=stretch", "openai.unsupported_size"),
        ("openai.model_aliases=['dall e']", "openai.model_aliases[0]"),
        ("openai.model_aliases=['a','a']", "openai.model_aliases"),
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
    return request_models(cfg.limits, sizes=("16x16", "32x32"))  # a model whose card lists these


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
    with pytest.raises(ConfigError, match="unet/config.json has no sample_size"):  # what it draws is unknown
        pin_model(load_config(ServeConfig, None, [f"model={folder}"]))
    (folder / "unet").mkdir()
    (folder / "unet" / "config.json").write_text('{"sample_size": 16}')
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


# ----------------------------------------------------------------------------- sizes and the model card (issue 15)


def _unet_folder(root: Path, sample_size, vae_blocks: int = 0, card: dict | None = None) -> Path:
    """The JSON files of a pipeline folder that say what it can draw (no weights needed to read them)."""
    root.mkdir(parents=True, exist_ok=True)
    (root / "model_index.json").write_text('{"_class_name": "OmniDiffusionPipeline", "conditioning": "llm_adapter"}')
    (root / "unet").mkdir(exist_ok=True)
    (root / "unet" / "config.json").write_text(json.dumps({"sample_size": sample_size}))
    if vae_blocks:
        (root / "vae").mkdir(exist_ok=True)
        (root / "vae" / "config.json").write_text(json.dumps({"block_out_channels": [128] * vae_blocks}))
    if card is not None:
        (root / "card.json").write_text(json.dumps(card, ensure_ascii=False))
    return root


def test_model_facts_native_size_card_sizes_and_examples(tmp_path):
    from serve.models import _folder_reader, model_facts

    tiny = model_facts(_folder_reader(_unet_folder(tmp_path / "tiny", 16)), "tiny")
    assert tiny == {"native_size": "16x16", "sizes": ["16x16"], "example_prompts": []}
    # An SDXL-like folder: 128 latents x a 4-level VAE (8x) = 1024, and a card that lists its buckets.
    sdxl = _unet_folder(tmp_path / "sdxl", 128, vae_blocks=4,
                        card={"sizes": ["1024x1024", "1152x896", "896x1152"],
                              "example_prompts": ["a castle", {"prompt": "一座城堡", "lang": "zh"}]})
    facts = model_facts(_folder_reader(sdxl), "sdxl")
    assert facts["native_size"] == "1024x1024" and facts["sizes"] == ["1024x1024", "1152x896", "896x1152"]
    assert facts["example_prompts"] == [{"prompt": "a castle", "lang": None}, {"prompt": "一座城堡", "lang": "zh"}]
    assert model_facts(_folder_reader(_unet_folder(tmp_path / "wide", [16, 32])), "wide")["native_size"] == "32x16"
    for card, message in (({"sizes": ["big"]}, "size='big'"), ({"sizes": ["16x16", "16x16"]}, "distinct"),
                          ({"example_prompts": [" "]}, "example_prompts"), ([], "JSON object")):
        with pytest.raises(ConfigError, match=message):
            model_facts(_folder_reader(_unet_folder(tmp_path / "bad", 16, card=card)), "bad")


def test_pin_model_serves_the_cards_sizes_and_limits_may_only_narrow_them(tmp_path):
    folder = _unet_folder(tmp_path / "m", 16, card={"sizes": ["16x16", "32x32"], "example_prompts": ["a red circle"]})
    pinned = pin_model(load_config(ServeConfig, None, [f"model={folder}"]))
    assert (pinned["sizes"], pinned["native_size"]) == (["16x16", "32x32"], "16x16")
    assert pinned["example_prompts"] == [{"prompt": "a red circle", "lang": None}]
    narrowed = pin_model(load_config(ServeConfig, None, [f"model={folder}", "limits.sizes=['32x32']"]))
    assert narrowed["sizes"] == ["32x32"]
    with pytest.raises(ConfigError, match=r"limits.sizes\[1\]='64x64': .* its card lists \['16x16', '32x32'\]"):
        pin_model(load_config(ServeConfig, None, [f"model={folder}", "limits.sizes=['16x16','64x64']"]))
    # Without a card: the size it was trained at, only (the tiny model: 16x16, issue 15 item 4).
    plain = pin_model(load_config(ServeConfig, None, [f"model={_unet_folder(tmp_path / 'p', 16)}"]))
    assert plain["sizes"] == ["16x16"] and plain["example_prompts"] == []


def _pinned(tmp_path, **card) -> dict:
    return pin_model(load_config(ServeConfig, None, [f"model={_unet_folder(tmp_path / 'm', 16, card=card or None)}"]))


def test_spec_lists_the_models_sizes_and_the_openai_names(tmp_path):
    cfg = load_config(ServeConfig, REPO / "configs" / "serve.yaml", [])
    pinned = _pinned(tmp_path)
    spec = build_fastapi(settings_from_config(cfg, None, pinned), None).openapi()
    props = spec["components"]["schemas"]["ImagesGenerationRequest"]["properties"]
    assert props["size"]["anyOf"][0]["enum"] == ["16x16", "auto"]
    native = spec["components"]["schemas"]["GenerateRequest"]["properties"]["size"]["anyOf"][0]
    assert native["enum"] == ["16x16", "auto"]
    assert props["model"]["anyOf"][0]["enum"] == ["m", "dall-e-2", "dall-e-3", "gpt-image-1", "gpt-image-1-mini",
                                                  "gpt-image-1.5", "gpt-image-2"]
    assert "hd" in props["quality"]["anyOf"][0]["enum"] and props["style"]["anyOf"][0]["enum"] == ["vivid", "natural"]
    # unsupported_size=native: the OpenAI route takes any WIDTHxHEIGHT (drawn at 16x16), the native one does not.
    lenient = load_config(ServeConfig, REPO / "configs" / "serve.yaml", ["openai.unsupported_size=native"])
    spec = build_fastapi(settings_from_config(lenient, None, pinned), None).openapi()
    size = spec["components"]["schemas"]["ImagesGenerationRequest"]["properties"]["size"]["anyOf"][0]
    assert "enum" not in size and size["pattern"]
    assert spec["components"]["schemas"]["GenerateRequest"]["properties"]["size"]["anyOf"][0]["enum"] == ["16x16", "auto"]


@pytest.mark.parametrize(
    "body",
    [
        {"prompt": "a", "model": "dall-e-3", "quality": "hd", "style": "vivid"},
        {"prompt": "a", "model": "gpt-image-1", "quality": "high", "output_format": "png", "background": "opaque"},
        {"prompt": "a", "quality": "standard", "style": "natural", "size": "auto"},
    ],
)
def test_openai_request_accepts_what_openai_clients_send(body):
    models = request_models(load_config(ServeConfig, None, []).limits, ("m", "dall-e-3", "gpt-image-1"), ("16x16",))
    parsed = models.images.model_validate(body)
    assert parsed.prompt == "a"


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"prompt": "a", "quality": "ultra"}, "quality"),
        ({"prompt": "a", "style": "noir"}, "style"),
        ({"prompt": "a", "output_format": "jpeg"}, "output_format"),  # only PNGs are made
        ({"prompt": "a", "background": "transparent"}, "background"),  # the images are opaque
        ({"prompt": "a", "model": "dall-e-4"}, "model"),
        ({"prompt": "a", "size": "32x32"}, "size"),
    ],
)
def test_openai_request_still_rejects_what_it_cannot_honour(body, field):
    models = request_models(load_config(ServeConfig, None, []).limits, ("m", "dall-e-3"), ("16x16",))
    with pytest.raises(ValidationError) as info:
        models.images.model_validate(body)
    assert _field_of(info.value) == field
