"""``omnidiff world``: generate the tiny world, write its url list, serve its images.

    omnidiff world generate --config configs/world.yaml [seed=1 num_captions=200 ...] [--force]
    omnidiff world urls --base-url http://127.0.0.1:8765 [--format csv] [--config ... | --world-dir D]
    omnidiff world serve [--port 8765] [--config ... | --world-dir D] [--url-file F]
"""

from __future__ import annotations

import argparse
import json
import signal
import sys
import threading
from pathlib import Path

from omnidiff.config import ConfigError, load_config
from omnidiff.world.config import WorldConfig
from omnidiff.world.generate import URL_LIST_FORMATS, generate_world, load_world_meta, write_url_list
from omnidiff.world.server import base_url_of, make_server

DEFAULT_CONFIG = "configs/world.yaml"


def _add_world_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", default=None, help=f"WorldConfig YAML (default: {DEFAULT_CONFIG} if it exists)")
    p.add_argument("--world-dir", type=Path, default=None, help="an already generated world folder")
    p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. seed=1 num_captions=200")


def _load(args: argparse.Namespace) -> WorldConfig:
    path = args.config or (DEFAULT_CONFIG if Path(DEFAULT_CONFIG).is_file() else None)
    return load_config(WorldConfig, path, args.overrides)


def _world_dir(args: argparse.Namespace) -> Path:
    if args.world_dir is not None:
        if args.overrides or args.config:
            raise ConfigError("--world-dir names a generated world; do not combine it with --config or overrides")
        return args.world_dir
    return _load(args).world_dir()


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="omnidiff world", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="cmd", required=True)
    gen = sub.add_parser("generate", help="generate (or reuse) the world described by a config")
    _add_world_args(gen)
    gen.add_argument("--force", action="store_true", help="regenerate even if the same world exists")
    urls = sub.add_parser("urls", help="write the LAION-style url list for a base url")
    _add_world_args(urls)
    urls.add_argument("--base-url", required=True, help="where the images are served, e.g. http://127.0.0.1:8765")
    urls.add_argument("--format", default="parquet", choices=sorted(URL_LIST_FORMATS))
    urls.add_argument("--out", type=Path, default=None, help="output path (default <world>/urls.<format>)")
    serve = sub.add_parser("serve", help="serve the world's images over HTTP until interrupted")
    _add_world_args(serve)
    serve.add_argument("--host", default="127.0.0.1")
    serve.add_argument("--port", type=int, default=8765, help="0 picks a free port (printed)")
    serve.add_argument("--url-file", type=Path, default=None, help="also write the base url to this file")
    args = parser.parse_args(argv)

    try:
        if args.cmd == "generate":
            if args.world_dir is not None:
                raise ConfigError("generate takes --config and overrides (set out_dir=... for the folder)")
            out = generate_world(_load(args), force=args.force)
            meta = load_world_meta(out)
            print(json.dumps({"world_dir": str(out), "digest": meta["digest"], **meta["counts"]}, ensure_ascii=False))
        elif args.cmd == "urls":
            print(write_url_list(_world_dir(args), args.base_url, args.format, args.out))
        else:
            return _serve(_world_dir(args), args.host, args.port, args.url_file)
    except (ConfigError, FileNotFoundError, FileExistsError, ValueError) as exc:
        print(f"omnidiff world: {exc}", file=sys.stderr)
        return 2
    return 0


def _serve(world_dir: Path, host: str, port: int, url_file: Path | None) -> int:
    load_world_meta(world_dir)
    server = make_server(world_dir, host, port)
    url = base_url_of(server)
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.1}, daemon=True)
    thread.start()
    if url_file is not None:  # atomically: a watcher that sees the file reads the whole url
        from omnidiff.contracts.io import atomic_write

        atomic_write(url_file, url + "\n")
    print(f"serving {world_dir}/images at {url} (Ctrl-C to stop)", flush=True)
    try:
        stop.wait()
    finally:
        server.shutdown()
        server.server_close()
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
