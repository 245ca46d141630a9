"""``omnidiff serve up | down | status``: the registered model on Ray Serve.

    omnidiff stack up                                   # Prefect + MLflow + Ray on 127.0.0.1
    omnidiff serve up --config configs/serve.yaml       # deploy; http://127.0.0.1:8000/ is the playground
    omnidiff serve up model=exports/stage3 port=8001    # a pipeline folder, another port
    omnidiff serve status                               # app + replica states, readiness, served version
    omnidiff serve down

With a running stack (RAY_ADDRESS) the app lives in that Ray cluster and ``up`` returns;
without one, ``up`` starts a private Ray and keeps serving in the foreground until Ctrl-C.
"""

import argparse
import json
import os
import sys
import time
from pathlib import Path

from omnidiff.config import ConfigError, load_config

DEFAULT_CONFIG = "configs/serve.yaml"


def _load(args) -> "ServeConfig":  # noqa: F821
    from serve.config import ServeConfig

    path = args.config if args.config and Path(args.config).is_file() else None
    if args.config and path is None and args.config != DEFAULT_CONFIG:
        raise ConfigError(f"--config {args.config!r}: no such file")
    return load_config(ServeConfig, path, args.overrides)


def _up(args) -> int:
    from omnidiff import stack
    from serve import app as serve_app

    cfg = _load(args)
    stack.apply_env()
    private_ray = not os.environ.get("RAY_ADDRESS")
    print(f"[serve] deploying {cfg.model!r} as app {cfg.app_name!r} on {cfg.host}:{cfg.port} ...", flush=True)
    t0 = time.perf_counter()
    result = serve_app.run(cfg)
    model = result["model"]
    print(f"[serve] ready in {time.perf_counter() - t0:.1f}s: {model['source']}"
          + (f" (version {model['version']})" if model["version"] else ""))
    print(f"[serve] {result['url']}/  (playground)   {result['url']}/v1/images/generations   "
          f"{result['url']}/openapi.json")
    if not private_ray:
        return 0
    print("[serve] no stack running (RAY_ADDRESS unset): serving from this process; Ctrl-C stops it", flush=True)
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        serve_app.shutdown(cfg)
    return 0


def _down(args) -> int:
    from omnidiff import stack
    from serve import app as serve_app

    cfg = _load(args)
    stack.apply_env()
    if not os.environ.get("RAY_ADDRESS"):
        print("[serve] no stack running (RAY_ADDRESS unset): nothing to stop", file=sys.stderr)
        serve_app.forget(cfg.app_name)
        return 0
    serve_app.shutdown(cfg)
    print(f"[serve] app {cfg.app_name!r} deleted")
    return 0


def _status(args) -> int:
    from omnidiff import stack
    from serve import app as serve_app

    cfg = _load(args)
    stack.apply_env()
    if not os.environ.get("RAY_ADDRESS"):
        report = {"app": cfg.app_name, "status": "NOT_RUNNING", "why": "no stack running (RAY_ADDRESS unset)"}
    else:
        report = serve_app.status(cfg)
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        print(f"app {report['app']}: {report['status']}" + (f" ({report['why']})" if report.get("why") else ""))
        for name, info in report.get("deployments", {}).items():
            print(f"  {name:<10} {info['status']:<10} replicas {info['replicas']}")
        if report.get("url"):
            print(f"  url      {report['url']}/")
        if report.get("ready") is not None:
            print(f"  ready    {report['ready']}")
        if report.get("model"):
            model = report["model"]
            print(f"  model    {model.get('source')}  version {model.get('version')}")
            for key, value in sorted(model.get("lineage", {}).items()):
                print(f"    {key}: {value}")
    return 0 if report["status"] == "RUNNING" and report.get("ready") else 1


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="omnidiff serve", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    for name, help_text in (("up", "deploy (or roll) the app and wait until it is ready"),
                            ("down", "delete the app (and Serve, when no other app is left)"),
                            ("status", "app and replica states, readiness, the served model and its lineage")):
        p = sub.add_parser(name, help=help_text)
        p.add_argument("--config", default=DEFAULT_CONFIG, help=f"serve YAML (default {DEFAULT_CONFIG})")
        p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. port=8001 batching.enabled=false")
        if name == "status":
            p.add_argument("--json", action="store_true", help="print the report as JSON")
    args = parser.parse_args(argv)
    try:
        return {"up": _up, "down": _down, "status": _status}[args.command](args)
    except ConfigError as exc:
        print(f"omnidiff serve: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
