"""The `omnidiff` command: help lists the commands, unknown commands fail clearly.

    .venv/bin/pytest tests/test_cli.py -q
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

from omnidiff import cli


def _run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "omnidiff.cli", *args], capture_output=True, text=True, timeout=120)


def test_help_lists_every_available_command():
    out = _run("--help")
    assert out.returncode == 0, out.stderr
    listed = {line.split()[0] for line in out.stdout.splitlines() if line.startswith("  ")}
    available = {name for name, (_, target) in cli.COMMANDS.items() if cli._available(target)}
    assert "stack" in available
    assert listed == available
    for name in available:
        assert cli.COMMANDS[name][0] in out.stdout


def test_console_script_is_installed():
    exe = Path(sys.executable).parent / "omnidiff"
    exe = exe if exe.is_file() else shutil.which("omnidiff")
    assert exe, "the `omnidiff` console script is not installed (pip install -e .)"
    out = subprocess.run([str(exe), "--help"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and "usage: omnidiff <command>" in out.stdout


def test_unknown_command_is_named():
    out = _run("frobnicate")
    assert out.returncode == 2
    assert "unknown command 'frobnicate'" in out.stderr


def test_subcommand_help_goes_to_the_module():
    out = _run("stack", "--help")
    assert out.returncode == 0, out.stderr
    for word in ("up", "down", "status"):
        assert word in out.stdout


def test_version():
    out = _run("--version")
    assert out.returncode == 0 and out.stdout.strip() == __import__("omnidiff").__version__
