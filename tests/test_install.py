"""requirements/install.py hands uv the package sources pip is configured with (issue 18 item 5).
The install itself against pip's is benchmarks/install_speed.sh (same `pip freeze --all`).

.venv/bin/pytest tests/test_install.py -x -q
"""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("omnidiff_install", REPO / "requirements" / "install.py")
install = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(install)

# `pip config list` as pip prints it on a machine like this one: files merged, PIP_* variables as :env:.
CONFIG_LIST = """\
global.cert='/etc/ssl/certs/ca-certificates.crt'
global.constraint='/etc/xdg/pip/constraints.txt'
global.extra-index-url='file:///opt/pypi/simple file:///opt/pypi-more/simple'
global.find-links='local-wheels'
global.index-url='https://mirror.example/simple'
install.index-url='https://install-mirror.example/simple'
freeze.find-links='/not/for/install'
:env:.default-timeout='180'
:env:.find-links='local-wheels more-wheels wheels'
"""


def test_pip_settings_take_the_install_sections_with_variables_last():
    s = install.pip_settings(CONFIG_LIST)
    assert s["index-url"] == "https://install-mirror.example/simple"  # [install] over [global]
    assert s["find-links"] == "local-wheels more-wheels wheels"  # PIP_FIND_LINKS over the files, [freeze] ignored
    assert s["extra-index-url"] == "file:///opt/pypi/simple file:///opt/pypi-more/simple"
    assert s["constraint"] == "/etc/xdg/pip/constraints.txt" and s["default-timeout"] == "180"


def test_uv_gets_every_source_and_merges_indexes_as_pip_does():
    args, env = install.uv_arguments(install.pip_settings(CONFIG_LIST))
    pairs = list(zip(args[::2], args[1::2], strict=False))
    assert ("--index-strategy", "unsafe-best-match") in pairs
    assert ("--default-index", "https://install-mirror.example/simple") in pairs
    assert [v for k, v in pairs if k == "--index"] == ["file:///opt/pypi/simple", "file:///opt/pypi-more/simple"]
    assert [v for k, v in pairs if k == "--find-links"] == ["local-wheels", "more-wheels", "wheels"]
    assert ("--constraint", "/etc/xdg/pip/constraints.txt") in pairs
    assert env == {"SSL_CERT_FILE": "/etc/ssl/certs/ca-certificates.crt", "UV_HTTP_TIMEOUT": "180"}
    assert install.uv_arguments({"no-index": "true"})[0][-1] == "--no-index"


def test_this_machines_pip_configuration_parses():
    listed = subprocess.run([sys.executable, "-m", "pip", "config", "list"], capture_output=True, text=True,
                            check=True).stdout
    args, _ = install.uv_arguments(install.pip_settings(listed))
    for line in listed.splitlines():  # every source pip is given here reaches uv
        option, _, value = line.partition("=")
        if option.rsplit(".", 1)[-1] in ("find-links", "extra-index-url", "constraint", "index-url"):
            for word in value.strip("'\"").split():
                assert word in args, f"{line}: {word} not handed to uv"


def test_a_bad_installer_choice_is_a_clear_error():
    got = subprocess.run([sys.executable, str(REPO / "requirements" / "install.py")], capture_output=True, text=True,
                         env={"OMNIDIFF_INSTALLER": "conda", "PATH": "/usr/bin:/bin"}, check=False)
    assert got.returncode == 2 and "OMNIDIFF_INSTALLER='conda': expected uv or pip" in got.stderr
