"""Every manifest under infra/ is linted and validated against its resource's schema.

- yamllint on every YAML file;
- core Kubernetes kinds (Deployment, Service, ConfigMap, ...) with kubernetes-validate (bundled schemas, offline);
- KubeRay RayCluster/RayJob specs against infra/schemas/*.schema.json, and every pod template inside
  them against the Kubernetes PodTemplateSpec schema;
- the Ray cluster-launcher YAML against ray's own ray-schema.json;
- prefect.yaml: every deployment's entrypoint names a file and a function that exists, crons parse.
"""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

import jsonschema
import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
INFRA = ROOT / "infra"
YAML_FILES = sorted(p for p in INFRA.rglob("*.yaml"))
K8S_VERSION = "1.33.0"


def _documents(path: Path) -> list[dict]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc]


def _k8s_documents() -> list[tuple[str, dict]]:
    out = []
    for path in YAML_FILES:
        for doc in _documents(path):
            if isinstance(doc, dict) and "apiVersion" in doc and "kind" in doc:
                out.append((f"{path.relative_to(ROOT)}:{doc['kind']}/{doc['metadata'].get('name')}", doc))
    return out


def _pod_template_validator() -> jsonschema.Draft7Validator:
    import kubernetes_validate

    base = Path(kubernetes_validate.__file__).parent / "kubernetes-json-schema"
    schema_dir = sorted(base.glob("v*-local-strict"))[-1]
    schema = json.loads((schema_dir / "podtemplatespec-v1.json").read_text())
    store = {}
    for name in ("_definitions.json",):
        store[name] = json.loads((schema_dir / name).read_text())
    resolver = jsonschema.RefResolver(base_uri=f"{schema_dir.as_uri()}/", referrer=schema, store={
        f"{schema_dir.as_uri()}/{k}": v for k, v in store.items()
    })
    return jsonschema.Draft7Validator(schema, resolver=resolver)


def test_infra_has_every_piece():
    kinds = {doc["kind"] for _, doc in _k8s_documents()}
    assert {"RayCluster", "RayJob", "Deployment", "Service", "StatefulSet"} <= kinds
    assert (INFRA / "ray-launcher" / "aws-gpu.yaml").is_file()
    assert (INFRA / "prefect" / "prefect.yaml").is_file()


@pytest.mark.parametrize("path", YAML_FILES, ids=lambda p: str(p.relative_to(ROOT)))
def test_yamllint(path: Path):
    config = "{extends: default, rules: {line-length: {max: 160}, document-start: disable, truthy: {check-keys: false}, comments: {min-spaces-from-content: 1}}}"
    result = subprocess.run(
        [sys.executable, "-m", "yamllint", "-f", "parsable", "-d", config, str(path)],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize("name,doc", _k8s_documents(), ids=lambda x: x if isinstance(x, str) else "")
def test_kubernetes_resource_schema(name: str, doc: dict):
    if doc["apiVersion"].startswith("ray.io/"):
        schema_name = {"RayCluster": "raycluster-spec", "RayJob": "rayjob-spec"}[doc["kind"]]
        schema = json.loads((INFRA / "schemas" / f"{schema_name}.schema.json").read_text())
        jsonschema.validate(doc["spec"], schema)
        assert doc["apiVersion"] == "ray.io/v1", name
        cluster = doc["spec"] if doc["kind"] == "RayCluster" else doc["spec"]["rayClusterSpec"]
        jsonschema.validate(cluster, json.loads((INFRA / "schemas" / "raycluster-spec.schema.json").read_text()))
        validator = _pod_template_validator()
        templates = [cluster["headGroupSpec"]["template"]] + [g["template"] for g in cluster.get("workerGroupSpecs", [])]
        for template in templates:
            errors = sorted(validator.iter_errors(template), key=str)
            assert not errors, f"{name}: {errors[0].message} at {list(errors[0].absolute_path)}"
    else:
        import kubernetes_validate

        kubernetes_validate.validate(doc, K8S_VERSION, strict=True)


def test_kuberay_schema_rejects_a_broken_cluster():
    """The hand-written CRD schema must be able to fail: a worker group without a name is refused."""
    schema = json.loads((INFRA / "schemas" / "raycluster-spec.schema.json").read_text())
    broken = {"headGroupSpec": {"template": {}}, "workerGroupSpecs": [{"template": {}}]}
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(broken, schema)


def test_ray_cluster_launcher_schema():
    import ray

    schema = json.loads((Path(ray.__file__).parent / "autoscaler" / "ray-schema.json").read_text())
    for path in (INFRA / "ray-launcher").glob("*.yaml"):
        jsonschema.validate(yaml.safe_load(path.read_text()), schema)


def test_prefect_yaml_entrypoints_exist():
    from prefect.client.schemas.schedules import CronSchedule

    spec = yaml.safe_load((INFRA / "prefect" / "prefect.yaml").read_text())
    names = [d["name"] for d in spec["deployments"]]
    assert {"omnidiff-pipeline", "nightly-reembed"} <= set(names)
    for deployment in spec["deployments"]:
        file_name, _, func = deployment["entrypoint"].partition(":")
        source = ROOT / file_name
        assert source.is_file(), f"{deployment['name']}: {file_name} does not exist"
        functions = {n.name for n in ast.walk(ast.parse(source.read_text())) if isinstance(n, ast.FunctionDef)}
        assert func in functions, f"{deployment['name']}: no function {func} in {file_name}"
        for schedule in deployment.get("schedules", []):
            CronSchedule(cron=schedule["cron"], timezone=schedule.get("timezone", "UTC"))
    json.loads((INFRA / "prefect" / "work-pool.json").read_text())
