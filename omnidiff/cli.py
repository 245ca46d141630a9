"""The ``omnidiff`` command. Each subcommand is a ``main(argv) -> int`` in its own module.

Subcommands are listed here without importing them (``omnidiff --help`` stays
fast); the module is imported only when its command runs. A stage adds its
command by adding one row to :data:`COMMANDS`.
"""

from __future__ import annotations

import importlib
import importlib.util
import sys

# name -> (one-line help, "module:function"); function(argv: list[str]) -> int
COMMANDS: dict[str, tuple[str, str]] = {
    "config": ("validate config files and print them resolved (config check FILE...)", "omnidiff.config:main"),
    "stack": ("start/stop/inspect the local Prefect + MLflow + Ray stack", "omnidiff.stack_cli:main"),
    "world": ("generate the tiny world and serve its images over HTTP", "omnidiff.world.cli:main"),
    "llm": ("convert/inspect the LLM text encoder (Gemma 3 270M by default)", "omnidiff.models.llm_folders:main"),
    "base": ("pretrain the base text-to-image model and its evaluator", "omnidiff.base.cli:main"),
    "collect": ("collect image-caption pairs with img2dataset into a pair snapshot", "data_prep.cli:main"),
    "embed": ("precompute LLM/CLIP/pixel states into the Parquet cache (Ray Data)", "embed_cache.cli:main"),
    "train": ("train a stage (1 align, 2 end-to-end, 3 aesthetic) with DeepSpeed on Ray Train", "train.cli:main"),
    "evaluate": ("score a model per language and prompt length against the base", "train.evaluate_cli:main"),
    "serve": ("serve a registered model on Ray Serve (up/down/status)", "serve.cli:main"),
    "flows": ("create Prefect deployments (pipeline, nightly-reembed, one per stage)", "flows.cli:main"),
    "lineage": ("print a model's lineage from MLflow", "flows.lineage:main"),
    "pipeline": ("run the whole pipeline once, in-process", "flows.cli:pipeline_main"),
    "demo": ("stack up, trigger the pipeline deployment on the tiny world, print the report", "flows.cli:demo_main"),
}


def _available(target: str) -> bool:
    module = target.partition(":")[0]
    try:
        return importlib.util.find_spec(module) is not None
    except ModuleNotFoundError:
        return False


def _usage() -> str:
    lines = ["usage: omnidiff <command> [args...]", "", "commands:"]
    for name, (help_text, target) in COMMANDS.items():
        if _available(target):
            lines.append(f"  {name:<10} {help_text}")
    lines += ["", "Run 'omnidiff <command> --help' for a command's options."]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(_usage())
        return 0
    if argv[0] == "--version":
        from omnidiff import __version__

        print(__version__)
        return 0
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS or not _available(COMMANDS[name][1]):
        print(f"omnidiff: unknown command {name!r}\n\n{_usage()}", file=sys.stderr)
        return 2
    module_name, _, func_name = COMMANDS[name][1].partition(":")
    import omnidiff  # noqa: F401  (offline switches before any heavy import)
    from omnidiff.stack import apply_env

    # Prefect reads PREFECT_API_URL once, at import: point every command at the running stack first.
    apply_env()

    func = getattr(importlib.import_module(module_name), func_name)
    return int(func(rest) or 0)


if __name__ == "__main__":
    raise SystemExit(main())
