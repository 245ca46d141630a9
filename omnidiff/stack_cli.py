"""``omnidiff stack up | down | status | env``: the command line of omnidiff/stack.py.

    omnidiff stack up [--free-ports] [--prefect-port 4200] [--mlflow-port 5000] [--ray-port 6379]
                      [--ray-cpus 4] [--ray-object-store-mb 1024] [--timeout 120]
    omnidiff stack status
    omnidiff stack down
    omnidiff stack env        shell exports pointing at the running stack (with the Prefect API's auth string)
    omnidiff stack secret     the Prefect API's auth string, to paste into the Prefect UI's login page
"""

from __future__ import annotations

import argparse
import shlex
import sys
from pathlib import Path
from typing import Any

from omnidiff.stack import (
    client_env,
    down,
    read_state,
    recorded_services,
    running_services,
    start_flows_server,
    status,
    up,
)
from omnidiff.stack_services import DEFAULT_PORTS, StackError, read_secret, stack_dir

DESCRIPTION = "The local stack: a Prefect server, an MLflow tracking server and a Ray head, all on 127.0.0.1."


def _print_status(report: dict[str, Any]) -> None:
    for name, info in report.items():
        word = "healthy" if info["healthy"] else ("UNHEALTHY" if info["alive"] else "DOWN")
        print(f"{name:<8} {word:<9} pid {info['pid']:<8} {info['url']}")
        if not info["healthy"]:
            print(f"         log: {info['log']}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="omnidiff stack", description=DESCRIPTION)
    sub = parser.add_subparsers(dest="command", required=True)
    p_up = sub.add_parser("up", help="start Prefect, MLflow and a Ray head on 127.0.0.1 and wait until healthy")
    p_up.add_argument("--prefect-port", type=int, default=DEFAULT_PORTS["prefect"])
    p_up.add_argument("--mlflow-port", type=int, default=DEFAULT_PORTS["mlflow"])
    p_up.add_argument("--ray-port", type=int, default=DEFAULT_PORTS["ray"])
    p_up.add_argument("--free-ports", action="store_true", help="pick free ports instead of the defaults")
    p_up.add_argument("--ray-cpus", type=int, default=4, help="logical CPUs of the Ray head (default 4)")
    p_up.add_argument("--ray-object-store-mb", type=int, default=1024)
    p_up.add_argument("--mlflow-workers", type=int, default=1)
    p_up.add_argument("--timeout", type=float, default=120.0, help="seconds to wait for all three to be healthy")
    p_up.add_argument("--flows-config", default="configs/pipeline.yaml",
                      help="pipeline config whose deployments the flows-serving process creates")
    p_up.add_argument("--no-flows", action="store_true", help="do not start the Prefect deployment-serving process")
    p_up.add_argument("--object-storage", action="store_true",
                      help="also start SeaweedFS's S3 API (bucket s3://omnidiff; MLflow artifacts go there)")
    p_up.add_argument("--s3-port", type=int, default=DEFAULT_PORTS["seaweedfs"])
    sub.add_parser("down", help="stop exactly what `up` started")
    sub.add_parser("status", help="report each service's health")
    sub.add_parser("env", help="print shell exports pointing at the running stack")
    sub.add_parser("secret", help="print the Prefect API's auth string (the Prefect UI's login asks for it)")
    args = parser.parse_args(argv)

    try:
        if args.command == "up":
            state = up(
                prefect_port=args.prefect_port, mlflow_port=args.mlflow_port, ray_port=args.ray_port,
                free_ports=args.free_ports, ray_cpus=args.ray_cpus, ray_object_store_mb=args.ray_object_store_mb,
                mlflow_workers=args.mlflow_workers, timeout_s=args.timeout,
                object_storage=args.object_storage, s3_port=args.s3_port,
            )
            if state and not args.no_flows:
                if Path(args.flows_config).is_file():
                    if start_flows_server(args.flows_config) != 0:
                        print("omnidiff stack: the deployment-serving process did not start (see "
                              f"{stack_dir() / 'logs' / 'flows.log'})", file=sys.stderr)
                        return 1
                else:
                    print(f"flows: {args.flows_config} not found; deployments not served (--flows-config)")
            print("shell: eval \"$(omnidiff stack env)\"   (omnidiff commands find the stack themselves)")
            return 0 if state else 1
        if args.command == "down":
            down()
            return 0
        if args.command in ("env", "secret"):
            state = read_state()
            if not state or sorted(running_services(state)) != recorded_services(state):
                print(f"no running stack under {stack_dir()}", file=sys.stderr)
                return 1
            if args.command == "secret":
                if not state.get("prefect_auth_file"):
                    raise StackError("this stack was started without a Prefect auth string; `down` and `up` it again")
                print(read_secret(state["prefect_auth_file"]))
                return 0
            for key, value in client_env(state).items():
                print(f"export {key}={shlex.quote(value)}")
            return 0
        report = status()
        if not report:
            print(f"no stack recorded under {stack_dir()} (omnidiff stack up)")
            return 3
        _print_status(report)
        return 0 if all(info["healthy"] for info in report.values()) else 1
    except StackError as exc:
        print(f"omnidiff stack: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    raise SystemExit(main())
