#!/usr/bin/env bash
# The install step (requirements/install.py) with uv against pip, each into a new virtualenv with an empty
# download cache, as on a fresh machine (issue 18 item 5), then the two installed package sets compared.
#
#   nice benchmarks/install_speed.sh [WORKDIR]        # WORKDIR default: a new /tmp/install_speed.XXXX
#
# Runs from this checkout (the editable install points at it). Prints each one's wall seconds, the ratio,
# and the diff of `pip freeze --all` of the two environments (empty: the same packages and versions).
# Measured 2026-12-07 on a scratch clone (2 cores, under the heavy lock, empty caches): pip 198.4 s, uv 58.9 s
# (installing uv itself included), ratio 3.36x; 264 packages, the same.
set -euo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
work=${1:-$(mktemp -d /tmp/install_speed.XXXX)}
mkdir -p "$work"
declare -A secs
for installer in pip uv; do
  venv=$work/venv-$installer
  rm -rf "$venv" "$work/cache-$installer"
  start=$(date +%s.%N)
  python3 -m venv "$venv"
  (cd "$repo" && OMNIDIFF_INSTALLER=$installer PIP_CACHE_DIR=$work/cache-$installer/pip \
     UV_CACHE_DIR=$work/cache-$installer/uv "$venv/bin/python" requirements/install.py </dev/null)
  secs[$installer]=$(echo "$(date +%s.%N) - $start" | bc)
  echo "$installer: $(printf %.1f "${secs[$installer]}") s" >&2
  "$venv/bin/pip" freeze --all | sort > "$work/freeze-$installer.txt"
done
echo "pip $(printf %.1f "${secs[pip]}") s, uv $(printf %.1f "${secs[uv]}") s," \
     "ratio $(echo "scale=2; ${secs[pip]} / ${secs[uv]}" | bc)x ($(wc -l < "$work/freeze-pip.txt") packages)"
if diff "$work/freeze-pip.txt" "$work/freeze-uv.txt"; then echo "installed packages: the same"; else
  echo "installed packages DIFFER (above)"; exit 1; fi
