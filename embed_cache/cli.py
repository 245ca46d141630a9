"""``omnidiff embed``: fill the embedding caches, check them, find them.

    omnidiff embed --config configs/embed.yaml [dotted.key=value ...]   # run the job (Ray Data)
    omnidiff embed where --config configs/embed.yaml                    # the cache folder of each kind
    omnidiff embed verify CACHE_DIR [--repair]                          # checksums, schema, NaN; names bad shards

``verify --repair`` unlists the corrupt shards (renamed ``*.corrupt``) so the next run recomputes their keys.
Exit status: 0 ok; 1 rejected keys (NaN/inf) or corrupt shards; 2 bad arguments or config.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from omnidiff.config import ConfigError, load_config


def _load(args) -> object:
    from embed_cache.config import EmbedConfig

    return load_config(EmbedConfig, args.config, args.overrides)


def _run(args) -> int:
    from embed_cache.job import run

    cfg = _load(args)
    summary = run(cfg)
    for kind, stats in summary["kinds"].items():
        print(
            f"{kind:<7} {stats['fingerprint']}  computed {stats['computed']:>7}  skipped {stats['skipped']:>7}  "
            f"rejected {len(stats['rejected']):>3}  {stats['tokens_per_s']:.0f} {'tok' if kind != 'pixels' else 'img'}/s  "
            f"{stats['bytes_per_token']:.1f} B/{'tok' if kind != 'pixels' else 'img'}  {stats['dir']}"
        )
        for key, why in list(stats["rejected"].items())[:20]:
            print(f"  rejected {kind} key {key}: {why}", file=sys.stderr)
    print(json.dumps({k: v for k, v in summary.items() if k != "kinds"}, indent=1, default=str))
    return 1 if summary["rejected"] else 0


def _location(value: str) -> Path | str:
    """A cache folder path, or an ``s3://`` URL kept as a string (a Path would fold its ``//``)."""
    from omnidiff.contracts.storage import is_remote

    return value.rstrip("/") if is_remote(value) else Path(value)


def _where(args) -> int:
    from embed_cache.plan import cache_dirs
    from omnidiff.contracts.storage import is_remote, open_folder

    cfg = _load(args)
    for kind, path in cache_dirs(cfg).items():
        built = (open_folder(path, cfg.storage.s3).exists("manifest.json") if is_remote(path)
                 else (path / "manifest.json").exists())
        print(f"{kind:<7} {path}{'' if built else '  (not built yet)'}")
    return 0


def _verify(args) -> int:
    from embed_cache.writer import CacheWriter
    from omnidiff.contracts.cache import CacheError, CacheStore

    try:
        store = CacheStore(args.cache_dir)
    except CacheError as exc:
        print(f"omnidiff embed verify: {exc}", file=sys.stderr)
        return 2
    report = store.verify(check_values=not args.fast)
    print(json.dumps(report.as_dict(), indent=1))
    if report.corrupt and args.repair:
        with CacheWriter(store.path, store.manifest["fingerprint_inputs"]) as writer:
            moved = writer.quarantine(report.corrupt)
        print(f"unlisted {len(moved)} corrupt shard(s); rerun 'omnidiff embed' to recompute their keys")
    return 0 if report.ok else 1


def main(argv: list[str]) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    if argv and argv[0] in ("verify", "where"):
        command, argv = argv[0], argv[1:]
    else:
        command = "run"
    parser = argparse.ArgumentParser(
        prog=f"omnidiff embed{'' if command == 'run' else ' ' + command}", description=__doc__.split("\n\n")[0]
    )
    if command == "verify":
        parser.add_argument("cache_dir", type=_location,
                            help="a cache folder or s3:// URL: <cache root>/<kind>/<fingerprint>")
        parser.add_argument("--repair", action="store_true", help="unlist corrupt shards so they are recomputed")
        parser.add_argument("--fast", action="store_true", help="skip decoding values (checksums and schema only)")
    else:
        parser.add_argument("--config", type=Path, default=None, help="an embed YAML (kind: embed)")
        parser.add_argument("overrides", nargs="*", help="dotted overrides, e.g. num_actors=2 llm.max_length=256")
    args = parser.parse_args(argv)
    try:
        return {"run": _run, "where": _where, "verify": _verify}[command](args)
    except (ConfigError, FileNotFoundError) as exc:
        print(f"omnidiff embed: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    import omnidiff  # noqa: F401  (offline switches)

    raise SystemExit(main(sys.argv[1:]))
