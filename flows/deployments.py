"""Prefect deployments of every flow, served by one long-running process (``flow.serve`` style).

    omnidiff flows deploy        # start the serving process in the background (omnidiff stack up does it)
    python -m flows.deployments  # the serving process itself, in the foreground

Deployments: ``omnidiff-pipeline/omnidiff-pipeline`` (manual trigger, the Prefect UI's Run button),
``nightly-reembed/nightly-reembed`` (cron, default 02:00), and one per stage: prepare-base, collect,
embed, train, evaluate, deploy. Each carries its stage's default config (from configs/) as its
typed parameter, so the UI shows a filled-in form.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

from omnidiff.config import to_dict

PIPELINE_CONFIG_ENV = "OMNIDIFF_PIPELINE_CONFIG"
DEFAULT_PIPELINE_CONFIG = "configs/pipeline.yaml"
NIGHTLY_CRON_ENV = "OMNIDIFF_NIGHTLY_CRON"
DEFAULT_NIGHTLY_CRON = "0 2 * * *"

DEPLOYMENT_NAMES = ("omnidiff-pipeline/omnidiff-pipeline", "nightly-reembed/nightly-reembed",
                    "prepare-base/prepare-base", "collect/collect", "embed/embed", "train/train",
                    "evaluate/evaluate", "deploy/deploy")


def _params(cfg) -> dict:
    data = to_dict(cfg)
    data.pop("kind", None)
    return data


def pipeline_parameters(cfg) -> dict:
    """The omnidiff-pipeline flow's parameters for a loaded pipeline config (what its deployment is built with)."""
    return {"config": _params(cfg)}


def build_deployments(pipeline_config: str | Path | None = None, nightly_cron: str | None = None) -> list:
    """The RunnerDeployments, parameterised from the pipeline config (so every stage form is filled in)."""
    from prefect.deployments.runner import EntrypointType

    from flows.base import prepare_base_flow
    from flows.collect import collect_flow
    from flows.config import load_pipeline_config
    from flows.deploy import deploy
    from flows.embed import embed_flow, nightly_reembed
    from flows.evaluate import evaluate_flow
    from flows.pipeline import omnidiff_pipeline
    from flows.training import train_flow

    path = pipeline_config or os.environ.get(PIPELINE_CONFIG_ENV, DEFAULT_PIPELINE_CONFIG)
    cfg = load_pipeline_config(path)
    cron = nightly_cron or os.environ.get(NIGHTLY_CRON_ENV, DEFAULT_NIGHTLY_CRON)
    tags = ["omnidiff"]
    # Load flows by module path (flows.pipeline.omnidiff_pipeline), not by file: Prefect puts a script's
    # folder on sys.path, where a flows/<name>.py would shadow a package of the same name.
    kw = {"tags": tags, "entrypoint_type": EntrypointType.MODULE_PATH}
    from train.registry import model_name_for

    model = model_name_for(cfg.stage3, cfg.collect.name)  # the pipeline's snapshot is collect's
    return [
        omnidiff_pipeline.to_deployment(name="omnidiff-pipeline", parameters=pipeline_parameters(cfg), **kw,
                                        description="url lists -> collect -> embed -> stages 1-3 -> evaluate -> deploy"),
        nightly_reembed.to_deployment(name="nightly-reembed", cron=cron, **kw,
                                      parameters={"cfg": _params(cfg.embed)},
                                      description="embed whatever is new in the latest snapshots"),
        prepare_base_flow.to_deployment(name="prepare-base", **kw,
                                        parameters={"base": _params(cfg.base),
                                                    "world": _params(cfg.world) if cfg.world else None}),
        collect_flow.to_deployment(name="collect", **kw, parameters={"cfg": _params(cfg.collect)}),
        embed_flow.to_deployment(name="embed", **kw, parameters={"cfg": _params(cfg.embed)}),
        train_flow.to_deployment(name="train", **kw, parameters={"cfg": _params(cfg.stage1)}),
        evaluate_flow.to_deployment(name="evaluate", **kw,
                                    parameters={"models": {"candidate": f"{model}@candidate"},
                                                "cfg": _params(cfg.evaluate)}),
        deploy.to_deployment(name="deploy", **kw, parameters={"model": model}),
    ]


def serve_deployments(pipeline_config: str | Path | None = None) -> None:
    """Create/update every deployment in the Prefect server and run their flow runs until stopped."""
    from prefect import serve

    serve(*build_deployments(pipeline_config), print_starting_message=True)


if __name__ == "__main__":
    import omnidiff  # noqa: F401  (offline switches)
    from omnidiff.stack import apply_env

    apply_env()
    serve_deployments(sys.argv[1] if len(sys.argv) > 1 else None)
