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


# ------------------------------------------------------------------------ the image and object storage (issue 17)

DOCKERFILE = ROOT / "Dockerfile"
THIRD_PARTY_IMAGES = {"postgres:16"}  # images infra/ runs that are not built from the Dockerfile
SECRET_VARS = {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "MLFLOW_BACKEND_STORE_URI",
               "PREFECT_API_DATABASE_CONNECTION_URL", "POSTGRES_PASSWORD"}
SCRATCH = "/var/lib/omnidiff"


def _dockerfile_instructions(text: str) -> list[tuple[str, str]]:
    """``[(INSTRUCTION, arguments)]`` with continuation lines joined and comments dropped."""
    lines, current = [], ""
    for raw in text.splitlines():
        line = raw.strip()
        if not current and (not line or line.startswith("#")):
            continue
        current += " " + line.rstrip("\\").strip() if current else line.rstrip("\\").strip()
        if not line.endswith("\\"):
            lines.append(current)
            current = ""
    return [(line.split(None, 1)[0].upper(), line.split(None, 1)[1] if " " in line else "") for line in lines]


def _image_name() -> str:
    label = next(a for i, a in _dockerfile_instructions(DOCKERFILE.read_text()) if i == "LABEL")
    return label.split('org.opencontainers.image.ref.name="', 1)[1].split('"', 1)[0]


def _work_pool() -> dict:
    return json.loads((INFRA / "prefect" / "work-pool.json").read_text())


def _images_in(obj) -> list[str]:
    if isinstance(obj, dict):
        found = [v for k, v in obj.items() if k == "image" and isinstance(v, str)]
        return found + [i for v in obj.values() for i in _images_in(v)]
    if isinstance(obj, list):
        return [i for v in obj for i in _images_in(v)]
    return []


def test_the_dockerfile_builds_the_image_that_infra_names():
    import tomllib

    steps = _dockerfile_instructions(DOCKERFILE.read_text())
    args = dict(a.split("=", 1) for i, a in steps if i == "ARG" and "=" in a)
    args = {k: v.strip('"') for k, v in args.items()}
    froms = [a for i, a in steps if i == "FROM"]
    assert froms == ["python:${PYTHON_VERSION}-slim-bookworm"]
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    from packaging.specifiers import SpecifierSet

    assert f"{args['PYTHON_VERSION']}.0" in SpecifierSet(project["requires-python"])
    pins = dict(line.split("==", 1) for line in (ROOT / "requirements" / "constraints.txt").read_text().splitlines()
                if "==" in line and not line.startswith("#"))
    assert args["TORCH_VERSION"] == pins["torch"] and args["TORCH_VARIANT"].startswith("cu")
    runs = " && ".join(a for i, a in steps if i == "RUN")
    assert 'https://download.pytorch.org/whl/${TORCH_VARIANT}' in runs  # the CUDA (or cpu) build as a build arg
    assert "grep -v '^torch==' requirements/constraints.txt > /tmp/constraints.txt" in runs
    assert "pip install -c /tmp/constraints.txt -e ." in runs  # the project under its pins
    pull = yaml.safe_load((INFRA / "prefect" / "prefect.yaml").read_text())["pull"]
    workdir = pull[0]["prefect.deployments.steps.set_working_directory"]["directory"]
    assert [a for i, a in steps if i == "WORKDIR"] == [workdir]
    users = [a for i, a in steps if i == "USER"]
    assert users and users[-1] not in ("root", "0")
    env = " ".join(a for i, a in steps if i == "ENV")
    assert f"OMNIDIFF_HOME={SCRATCH}" in env

    name = _image_name()
    assert name == f"ghcr.io/omnidiff/omnidiff:{project['version']}-cuda"
    images = [i for path in YAML_FILES for doc in _documents(path) for i in _images_in(doc)]
    images.append(_work_pool()["variables"]["properties"]["image"]["default"])
    ours = {i for i in images if i not in THIRD_PARTY_IMAGES}
    assert ours == {name}, f"infra names images the Dockerfile does not build: {sorted(ours - {name})}"
    assert (ROOT / ".dockerignore").is_file() and ".venv" in (ROOT / ".dockerignore").read_text().split()


def artifact_problems(where: str, doc) -> list[str]:
    """What in one manifest would keep artifacts on a node or put a secret in the repository."""
    problems = []

    def walk(obj, path: str, pod_image: str | None = None) -> None:
        if isinstance(obj, dict):
            if "hostPath" in obj:
                problems.append(f"{where}{path}: hostPath volume (a node's own disk)")
            if "persistentVolumeClaim" in obj and pod_image not in THIRD_PARTY_IMAGES:
                problems.append(f"{where}{path}: a volume claim for artifacts (object storage holds them)")
            if isinstance(obj.get("name"), str) and obj["name"] in SECRET_VARS and "value" in obj:
                problems.append(f"{where}{path}: {obj['name']} inlined (reference a Secret)")
            if obj.get("name") == "OMNIDIFF_HOME" and obj.get("value") not in (None, SCRATCH):
                problems.append(f"{where}{path}: OMNIDIFF_HOME outside the scratch {SCRATCH}")
            for key, value in obj.items():
                walk(value, f"{path}.{key}", pod_image)
        elif isinstance(obj, list):
            for i, value in enumerate(obj):
                walk(value, f"{path}[{i}]", pod_image)

    if not isinstance(doc, dict):
        return problems
    kind = doc.get("kind")
    if kind == "PersistentVolumeClaim":
        problems.append(f"{where}: a PersistentVolumeClaim (artifacts live on object storage)")
    if kind == "Secret" and (doc.get("data") or doc.get("stringData")):
        problems.append(f"{where}: a Secret with its values in the repository")
    if kind == "ConfigMap":
        problems += [f"{where}: {k} in a ConfigMap (a Secret holds it)" for k in doc.get("data", {}) if k in SECRET_VARS]
        home = doc.get("data", {}).get("OMNIDIFF_HOME")
        if home not in (None, SCRATCH):
            problems.append(f"{where}: OMNIDIFF_HOME={home} is not the pod scratch {SCRATCH}")
    images = set(_images_in(doc))
    walk(doc, "", next(iter(images)) if len(images) == 1 else None)
    return problems


def _all_manifests() -> list[tuple[str, dict]]:
    docs = [(f"{p.relative_to(ROOT)}", d) for p in YAML_FILES for d in _documents(p)]
    return docs + [("infra/prefect/work-pool.json", _work_pool()["job_configuration"]["job_manifest"])]


def test_no_manifest_keeps_artifacts_on_a_node_or_inlines_a_secret():
    problems = [p for where, doc in _all_manifests() for p in artifact_problems(where, doc)]
    assert not problems, "\n".join(problems)


def test_the_artifact_check_can_fail():
    pod = {"spec": {"containers": [{"name": "x", "image": "ghcr.io/omnidiff/omnidiff:0.1.0-cuda",
                                    "env": [{"name": "AWS_SECRET_ACCESS_KEY", "value": "s3cr3t"}]}],
                    "volumes": [{"name": "a", "hostPath": {"path": "/data"}},
                                {"name": "b", "persistentVolumeClaim": {"claimName": "omnidiff-data"}}]}}
    found = artifact_problems("pod", pod)
    assert any("hostPath" in p for p in found) and any("volume claim" in p for p in found)
    assert any("AWS_SECRET_ACCESS_KEY inlined" in p for p in found)
    assert artifact_problems("pvc", {"kind": "PersistentVolumeClaim", "metadata": {"name": "d"}})
    assert artifact_problems("cm", {"kind": "ConfigMap", "data": {"OMNIDIFF_HOME": "/data/omnidiff"}})
    assert artifact_problems("secret", {"kind": "Secret", "stringData": {"AWS_ACCESS_KEY_ID": "x"}})


def _env_sources(container: dict) -> set[tuple[str, str]]:
    return {(kind, ref["name"]) for source in container.get("envFrom", []) for kind, ref in source.items()}


def test_every_omnidiff_pod_reaches_object_storage_through_the_configmap_and_the_secret():
    config = next(d for _, d in _all_manifests() if d.get("kind") == "ConfigMap" and d["metadata"]["name"] == "omnidiff-env")
    assert config["data"]["OMNIDIFF_STORAGE_ROOT"].startswith("s3://")
    assert config["data"]["AWS_ENDPOINT_URL"].startswith("http") and config["data"]["OMNIDIFF_HOME"] == SCRATCH
    pods = []
    for where, doc in _all_manifests():
        if doc.get("kind") in ("RayCluster", "RayJob"):
            cluster = doc["spec"] if doc["kind"] == "RayCluster" else doc["spec"]["rayClusterSpec"]
            pods += [(where, g["template"]) for g in [cluster["headGroupSpec"], *cluster.get("workerGroupSpecs", [])]]
        if doc.get("kind") == "RayJob":
            entrypoint = doc["spec"]["entrypoint"]
            assert 'storage.root="$OMNIDIFF_STORAGE_ROOT"' in entrypoint, where
            config_file = entrypoint.split("--config ", 1)[1].split()[0]
            assert (ROOT / config_file).is_file(), f"{where}: {config_file} does not exist"
    pods.append(("work-pool.json", _work_pool()["job_configuration"]["job_manifest"]["spec"]["template"]))
    assert len(pods) == 7
    for where, template in pods:
        for container in template["spec"]["containers"]:
            assert {("configMapRef", "omnidiff-env"), ("secretRef", "omnidiff-secrets")} <= _env_sources(container), where
        assert all(set(v) == {"name", "emptyDir"} for v in template["spec"].get("volumes", [])), where
    mlflow = next(d for _, d in _all_manifests() if d.get("kind") == "Deployment" and d["metadata"]["name"] == "mlflow")
    args = mlflow["spec"]["template"]["spec"]["containers"][0]["args"]
    assert any(a.startswith("--artifacts-destination=s3://") for a in args) and "--serve-artifacts" in args


def test_the_work_pool_template_renders_a_valid_kubernetes_job():
    """The base job template with its defaults filled in, as the Prefect Kubernetes worker renders it."""
    import copy
    import re
    import shlex

    import kubernetes_validate

    template = _work_pool()
    values = {k: v.get("default") for k, v in template["variables"]["properties"].items()}
    values.update(name="omnidiff-flow-run", command="prefect flow-run execute", env={"OMNIDIFF_PROBE": "1"})
    rendered = {"command": shlex.split(values["command"]), "env": [{"name": k, "value": v} for k, v in values["env"].items()]}

    def render(obj):
        if isinstance(obj, dict):
            return {k: render(v) for k, v in obj.items()}
        if isinstance(obj, list):
            return [render(v) for v in obj]
        if isinstance(obj, str):
            whole = re.fullmatch(r"\{\{ (\w+) \}\}", obj)
            if whole:
                return rendered.get(whole.group(1), values.get(whole.group(1)))
            return re.sub(r"\{\{ (\w+) \}\}", lambda m: str(values[m.group(1)]), obj)
        return obj

    job = render(copy.deepcopy(template["job_configuration"]["job_manifest"]))
    assert job["spec"]["template"]["spec"]["containers"][0]["image"] == _image_name()
    kubernetes_validate.validate(job, K8S_VERSION, strict=True)
    assert {p.strip("{} ") for p in re.findall(r"\{\{ \w+ \}\}", json.dumps(template["job_configuration"]))} <= set(
        template["variables"]["properties"])
