"""``omnidiff collect``: url lists -> pair snapshot.

    omnidiff collect --config configs/collect.yaml                       # lists already served somewhere
    omnidiff collect --config configs/collect.yaml --serve-world world/default
                                   # serve the tiny world on 127.0.0.1:8765 for the run, write its url list
    omnidiff collect --config configs/collect.yaml download.processes=4 track=false
    omnidiff collect show tiny                                           # counts of the LATEST snapshot

Overrides are dotted ``key=value`` pairs (omnidiff.config). Exit status 0 on
success, 2 on bad input or config (the message names the file/key), 1 when
the download did not finish (rerun to resume).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
from collections.abc import Iterator
from pathlib import Path

DEFAULT_WORLD_PORT = 8765


@contextlib.contextmanager
def served_world(world_dir: str | Path, port: int = DEFAULT_WORLD_PORT,
                 list_dir: Path | None = None) -> Iterator[tuple[Path, Path]]:
    """Serve a tiny world on 127.0.0.1 and yield (url list, parallel list) written for that server.

    The url list goes to ``<list_dir or world_dir>/urls.parquet``. A fixed port keeps the urls,
    and so the snapshot digest, the same from run to run.
    """
    from data_prep.readers import resolve_path
    from omnidiff.world import serve_world, write_url_list

    root = resolve_path(Path(world_dir))
    try:
        server = serve_world(root, port=port)
        base_url = server.__enter__()
    except OSError as exc:
        raise OSError(f"cannot serve the world on 127.0.0.1:{port} ({exc}); pass --world-port 0 for any free port "
                      "(the urls, and so the digest, then change from run to run)") from None
    try:
        out_path = (Path(list_dir) / "urls.parquet") if list_dir is not None else None
        yield write_url_list(root, base_url, out_path=out_path), root / "parallel.parquet"
    finally:
        server.__exit__(None, None, None)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="omnidiff collect", description="url lists -> img2dataset -> pair snapshot",
                                epilog=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="configs/collect.yaml", help="collect YAML (kind: collect)")
    p.add_argument("--serve-world", metavar="DIR", default=None,
                   help="serve this tiny world folder during the run and collect its url list and parallel texts "
                        "(replaces url_lists/parallel_lists)")
    p.add_argument("--world-port", type=int, default=DEFAULT_WORLD_PORT, help="port for --serve-world (0 = any)")
    p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. download.processes=4")
    return p


def _show(args: list[str]) -> int:
    from omnidiff.contracts.snapshot import Snapshot, SnapshotError, latest_snapshot

    if len(args) != 1:
        print("usage: omnidiff collect show NAME|PATH", file=sys.stderr)
        return 2
    try:
        path = Path(args[0]) if Path(args[0]).is_dir() else latest_snapshot(args[0])
        snap = Snapshot.open(path)
    except SnapshotError as exc:
        print(f"omnidiff collect: {exc}", file=sys.stderr)
        return 2
    print(json.dumps({"path": str(snap.path), "digest": snap.digest, "counts": snap.counts}, indent=2,
                     ensure_ascii=False))
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["show"]:
        return _show(argv[1:])
    args = _parser().parse_args(argv)

    from data_prep.collect import run
    from data_prep.config import CollectConfig
    from data_prep.download import DownloadError
    from data_prep.quarantine import InvariantError
    from data_prep.readers import CollectError
    from omnidiff.config import ConfigError, load_config

    try:
        with contextlib.ExitStack() as stack:
            overrides = list(args.overrides)
            if args.serve_world:
                url_list, parallel_list = stack.enter_context(served_world(args.serve_world, args.world_port))
                overrides += [f"url_lists=[{json.dumps(str(url_list))}]",
                              f"parallel_lists=[{json.dumps(str(parallel_list))}]"]
            cfg = load_config(CollectConfig, args.config, overrides)
            path = run(cfg)
    except (ConfigError, CollectError, OSError) as exc:  # bad input: the message names the file or key
        print(f"omnidiff collect: {exc}", file=sys.stderr)
        return 2
    except DownloadError as exc:  # transient: a rerun resumes
        print(f"omnidiff collect: {exc}", file=sys.stderr)
        return 1
    except InvariantError as exc:
        print(f"omnidiff collect: internal error: {exc}", file=sys.stderr)
        return 1
    print(path)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
