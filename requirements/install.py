"""Install the project and its pins into a virtualenv (the Makefile's install step; stdlib only).

    .venv/bin/python requirements/install.py                     # uv, falling back to pip
    OMNIDIFF_INSTALLER=pip .venv/bin/python requirements/install.py   # pip only

Runs with the virtualenv's own interpreter. It upgrades pip / wheel / setuptools with pip, then installs
``-e ".[test]"`` under requirements/constraints.txt with uv (pinned below, installed with pip into
``<venv>/.uv``, outside the environment's site-packages, so the installed set is the one pip would
install) in a fraction of pip's time (benchmarks/install_speed.sh, issue 18 item 5). uv does not read
pip's configuration, so the package sources pip would use here (``pip config list``: index-url,
extra-index-url, find-links, constraint files, no-index, trusted hosts, certificate, timeout; files and
PIP_* variables) are handed to it, and it merges the indexes as pip does (best version over all of
them). If uv cannot be installed or fails, pip installs, after a warning. Last, the obsolete
``dataclasses`` backport that img2dataset pulls is removed: it breaks Prefect (NOTES.md).
"""

from __future__ import annotations

import os
import shlex
import subprocess
import sys
from pathlib import Path

UV_VERSION = "0.13.10"
REPO = Path(__file__).resolve().parents[1]
CONSTRAINTS = REPO / "requirements" / "constraints.txt"
TARGET = f"{REPO}[test]"
# ``pip config list`` names options ``<section>.<option>`` (its files already merged): the sections an
# install reads, lowest precedence first (PIP_* variables are ``:env:``); other commands' are skipped.
SECTIONS = ("global", "install", ":env:")


def pip(*args: str) -> list[str]:
    return [sys.executable, "-m", "pip", *args]


def pip_settings(config_list: str) -> dict[str, str]:
    """``pip config list`` output (``scope.option='value'`` lines) -> option -> value pip uses."""
    found: dict[str, dict[str, str]] = {}
    for line in config_list.splitlines():
        key, sep, value = line.partition("=")
        section, _, option = key.strip().rpartition(".")
        if not sep or section not in SECTIONS:
            continue
        words = shlex.split(value)  # pip prints the value quoted: one word
        found.setdefault(option, {})[section] = words[0] if len(words) == 1 else value.strip().strip("'\"")
    rank = {s: i for i, s in enumerate(SECTIONS)}
    return {opt: by_section[max(by_section, key=rank.__getitem__)] for opt, by_section in found.items()}


def uv_arguments(settings: dict[str, str]) -> tuple[list[str], dict[str, str]]:
    """pip's package sources as ``uv pip install`` arguments and environment variables."""
    args, env = ["--index-strategy", "unsafe-best-match"], {}  # pip's rule: the best version on any index
    if settings.get("index-url"):
        args += ["--default-index", settings["index-url"]]
    for url in settings.get("extra-index-url", "").split():
        args += ["--index", url]
    for place in settings.get("find-links", "").split():
        args += ["--find-links", place]
    for path in settings.get("constraint", "").split():
        args += ["--constraint", path]
    for host in settings.get("trusted-host", "").split():
        args += ["--allow-insecure-host", host]
    if settings.get("no-index", "").lower() in ("1", "true", "yes", "on"):
        args.append("--no-index")
    if settings.get("cert"):
        env["SSL_CERT_FILE"] = settings["cert"]
    timeout = settings.get("default-timeout") or settings.get("timeout")
    if timeout:
        env["UV_HTTP_TIMEOUT"] = timeout
    return args, env


def install_with_uv(venv: Path) -> bool:
    uv = venv / ".uv" / "bin" / "uv"
    if not uv.exists():
        got = subprocess.run(pip("install", "-q", "--target", str(venv / ".uv"), f"uv=={UV_VERSION}"), check=False)
        if got.returncode != 0 or not uv.exists():
            print(f"warning: could not install uv=={UV_VERSION}", file=sys.stderr)
            return False
    listed = subprocess.run(pip("config", "list"), capture_output=True, text=True, check=False)
    args, env = uv_arguments(pip_settings(listed.stdout))
    cmd = [str(uv), "pip", "install", "-q", "--python", sys.executable, *args,
           "--constraint", str(CONSTRAINTS), "-e", TARGET]
    ran = subprocess.run(cmd, env={**os.environ, **env}, cwd=REPO, stdin=subprocess.DEVNULL, check=False)
    if ran.returncode != 0:
        print(f"warning: uv failed ({ran.returncode}): {shlex.join(cmd)}", file=sys.stderr)
    return ran.returncode == 0


def main() -> int:
    venv = Path(sys.prefix)
    if venv == Path(sys.base_prefix):
        print("requirements/install.py: run it with the virtualenv's python (.venv/bin/python)", file=sys.stderr)
        return 2
    installer = os.environ.get("OMNIDIFF_INSTALLER", "uv")
    if installer not in ("uv", "pip"):
        print(f"OMNIDIFF_INSTALLER={installer!r}: expected uv or pip", file=sys.stderr)
        return 2
    subprocess.run(pip("install", "-q", "--upgrade", "pip", "wheel", "setuptools"), check=True)
    if installer == "pip" or not install_with_uv(venv):
        if installer == "uv":
            print("warning: installing with pip instead (slower)", file=sys.stderr)
        subprocess.run(pip("install", "-q", "-c", str(CONSTRAINTS), "-e", TARGET), cwd=REPO, check=True)
    # img2dataset pulls the obsolete `dataclasses` backport, which breaks Prefect (NOTES.md).
    subprocess.run(pip("uninstall", "-y", "-q", "dataclasses"), check=False)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
