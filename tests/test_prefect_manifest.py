"""infra/prefect/prefect.yaml against the flows it deploys, and the typed forms the Prefect UI shows.

    .venv/bin/pytest tests/test_prefect_manifest.py -q

Every deployment's parameters are parameters of its flow function (and fill every one without a
default), validate against the flow's type hints as Prefect validates a run's parameters, and the
resolved configs under ``definitions`` are those of configs/gpu/pipeline_sdxl.yaml. Prefect builds a
deployment's form from its flow's signature: the config parameters must come out as typed objects.
"""

from __future__ import annotations

import importlib
import inspect
from pathlib import Path

import pytest
import yaml

from omnidiff.config import load_any, to_dict

REPO = Path(__file__).resolve().parents[1]
MANIFEST = REPO / "infra" / "prefect" / "prefect.yaml"
DEPLOYMENTS = yaml.safe_load(MANIFEST.read_text())["deployments"]


def _flow(entrypoint: str):
    """``flows/pipeline.py:omnidiff_pipeline`` -> the Flow object (imported by module path)."""
    path, _, name = entrypoint.partition(":")
    return getattr(importlib.import_module(path.removesuffix(".py").replace("/", ".")), name)


def test_manifest_is_a_valid_prefect_yaml():
    from prefect.cli.deploy._models import PrefectYamlModel

    model = PrefectYamlModel.model_validate(yaml.safe_load(MANIFEST.read_text()))
    assert [d.name for d in model.deployments] == [d["name"] for d in DEPLOYMENTS]


@pytest.mark.parametrize("deployment", DEPLOYMENTS, ids=[d["name"] for d in DEPLOYMENTS])
def test_parameters_match_the_flow_signature(deployment):
    flow = _flow(deployment["entrypoint"])
    signature = inspect.signature(flow.fn)
    params = deployment.get("parameters") or {}
    unknown = sorted(set(params) - set(signature.parameters))
    assert not unknown, f"{deployment['name']}: {unknown} are not parameters of {flow.fn.__name__}{signature}"
    required = {n for n, p in signature.parameters.items() if p.default is inspect.Parameter.empty}
    missing = sorted(required - set(params))
    assert not missing, f"{deployment['name']}: the manifest leaves required {missing} unset"
    flow.validate_parameters(params)  # what Prefect does with a run's parameters


def test_definitions_are_the_resolved_gpu_configs():
    """Regenerate with `.venv/bin/python infra/prefect/regenerate.py` when this fails."""
    definitions = yaml.safe_load(MANIFEST.read_text())["definitions"]
    resolved = to_dict(load_any(REPO / "configs" / "gpu" / "pipeline_sdxl.yaml"))
    resolved.pop("kind")
    assert definitions["pipeline_sdxl"] == resolved


def _resolve(schema: dict, node: dict) -> dict:
    while "$ref" in node:
        node = schema["definitions"][node["$ref"].rsplit("/", 1)[-1]]
    return node


@pytest.mark.parametrize("deployment", DEPLOYMENTS, ids=[d["name"] for d in DEPLOYMENTS])
def test_the_ui_form_has_typed_fields(deployment):
    """A config parameter is a typed object in the form (not a bare JSON object), its fields with
    types, bounds and defaults, nested sections included."""
    from prefect.utilities.callables import parameter_schema

    from omnidiff.config import ConfigModel

    flow = _flow(deployment["entrypoint"])
    schema = parameter_schema(flow.fn).model_dump()
    for name in inspect.signature(flow.fn).parameters:
        annotation = flow.fn.__annotations__.get(name)
        node = schema["properties"][name]
        if not any(f"{cls.__name__}" in str(annotation) for cls in _config_classes(ConfigModel)):
            assert node.get("type") or node.get("anyOf") or "$ref" in node, (name, node)
            continue
        if "anyOf" in node:  # an optional config: one branch is the config
            node = next(n for n in node["anyOf"] if "$ref" in n)
        config = _resolve(schema, node)
        assert config.get("type") == "object" and config.get("properties"), (name, config)
        for field, prop in config["properties"].items():
            prop = _resolve(schema, prop)
            typed = prop.get("type") or prop.get("enum") or prop.get("anyOf") or prop.get("properties")
            assert typed, f"{deployment['name']}: {name}.{field} has no type in the form: {prop}"


def _config_classes(base: type) -> list[type]:
    out = []
    for sub in base.__subclasses__():
        out += [sub, *_config_classes(sub)]
    return out


def test_pipeline_form_shows_bounds_and_sections():
    from prefect.utilities.callables import parameter_schema

    from flows.pipeline import omnidiff_pipeline

    schema = parameter_schema(omnidiff_pipeline.fn).model_dump()
    train = schema["definitions"]["TrainConfig"]["properties"]
    assert train["max_steps"] == {"default": 100, "minimum": 1, "title": "Max Steps", "type": "integer"}
    assert train["stage"]["enum"] == [1, 2, 3]
    assert {"$ref": "#/definitions/AlignSection"} in train["align"]["anyOf"]
    assert schema["definitions"]["AlignSection"]["additionalProperties"] is False  # unknown keys refused


def _local_deployments():
    from flows.deployments import build_deployments

    return build_deployments(REPO / "configs" / "pipeline_test.yaml")


def test_the_server_accepts_every_deployment_s_parameters():
    """What the Prefect server runs on a new deployment (``enforce_parameter_schema``): the
    parameters validated against the form's schema with ``ignore_required``, which drops every key
    named ``required`` from the schema, properties included (a config field named ``required``
    made the server refuse the pipeline deployment with a 422)."""
    from prefect._internal.schemas.validators import validate_values_conform_to_schema
    from prefect.utilities.callables import parameter_schema

    checked = 0
    for deployment in _local_deployments():
        schema = deployment._parameter_openapi_schema.model_dump()
        validate_values_conform_to_schema(deployment.parameters, schema, ignore_required=True)
        checked += 1
    for deployment in DEPLOYMENTS:
        flow = _flow(deployment["entrypoint"])
        schema = parameter_schema(flow.fn).model_dump()
        validate_values_conform_to_schema(deployment.get("parameters") or {}, schema, ignore_required=True)
        checked += 1
    assert checked == len(DEPLOYMENTS) + 8
