"""Rewrite the ``definitions`` of infra/prefect/prefect.yaml from configs/gpu/pipeline_sdxl.yaml.

A Prefect manifest cannot include files, so each anchored section (``base: &base``, ``serve: &serve``,
...) holds the resolved config; tests/test_prefect_manifest.py checks they are equal. Run after a
config field changes: ``.venv/bin/python infra/prefect/regenerate.py``.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

from omnidiff.config import load_any, to_dict  # noqa: E402


class _IndentedLists(yaml.SafeDumper):
    """Lists indented under their key (the manifest's yamllint style)."""

    def increase_indent(self, flow=False, indentless=False):
        return super().increase_indent(flow, False)


def regenerate(manifest: Path = REPO / "infra" / "prefect" / "prefect.yaml",
               config: Path = REPO / "configs" / "gpu" / "pipeline_sdxl.yaml") -> bool:
    text = manifest.read_text()
    resolved = to_dict(load_any(config))
    for name, value in resolved.items():
        head = f"    {name}: &{name}\n"
        if not isinstance(value, dict) or head not in text:
            continue
        body = yaml.dump(value, Dumper=_IndentedLists, sort_keys=False, default_flow_style=False, width=1000)
        start = text.index(head) + len(head)
        end = re.compile(r"^    \S", re.M).search(text, start).start()
        text = text[:start] + "".join(f"      {line}\n" for line in body.splitlines()) + text[end:]
    manifest.write_text(text)
    resolved.pop("kind", None)
    return yaml.safe_load(text)["definitions"]["pipeline_sdxl"] == resolved


if __name__ == "__main__":
    sys.exit(0 if regenerate() else "the definitions still differ from the config (a section without an anchor?)")
