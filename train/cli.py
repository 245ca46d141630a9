"""``omnidiff train``: run one training stage from a YAML config with dotted overrides.

    omnidiff train --config configs/train_stage1.yaml
    omnidiff train --config configs/train_stage2.yaml dist.num_workers=2 max_steps=400
    omnidiff train --config configs/train_stage1.yaml --print-config

Prints the result (export folder, MLflow run id, model version) as JSON on the last line.
"""

from __future__ import annotations

import argparse
import json
import sys


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="omnidiff train", description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", required=True, help="a YAML file with kind: train")
    parser.add_argument("overrides", nargs="*", help="dotted.key=value overrides (YAML values)")
    parser.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    args = parser.parse_args(argv)

    from omnidiff.config import ConfigError, dump_yaml, load_config
    from train.config import TrainConfig

    try:
        cfg = load_config(TrainConfig, args.config, args.overrides)
    except ConfigError as exc:
        print(f"omnidiff train: {exc}", file=sys.stderr)
        return 2
    if args.print_config:
        print(dump_yaml(cfg), end="")
        return 0
    # train.launch, not `from train import run`: an editable install made before train/__init__.py
    # existed maps `train` as a namespace package, which has no `run`.
    from omnidiff.contracts.cache import CacheError
    from omnidiff.contracts.snapshot import SnapshotError
    from train.data import CacheMismatchError
    from train.inputs import TrainingError
    from train.launch import run

    try:
        result = run(cfg)
    except (CacheMismatchError, CacheError, SnapshotError, TrainingError) as exc:
        print(f"omnidiff train: {exc}", file=sys.stderr)
        return 1
    print(json.dumps(result, default=str))
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
