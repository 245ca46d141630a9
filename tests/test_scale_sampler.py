"""benchmarks/scale.py's memory sampler: ``workers`` is what the worker processes hold at once.

    .venv/bin/pytest tests/test_scale_sampler.py -x -q

A process pool that replaces its workers (img2dataset's ``maxtasksperchild``) runs more processes the more shards
there are; summing every process's own peak would count the same memory once per replacement.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap

from benchmarks.scale import TreeSampler

MIB = 2**20

PARENT = textwrap.dedent("""
    import subprocess, sys
    child = "b = bytearray(120 * 2**20); import time; time.sleep(1.2)"
    for _ in range(3):  # one after the other, never two at once
        subprocess.run([sys.executable, "-c", child], check=True)
""")


def test_workers_are_the_peak_held_at_once_not_the_sum_of_each_process_peak():
    proc = subprocess.Popen([sys.executable, "-c", PARENT])
    sampler = TreeSampler(proc.pid)
    sampler.start()
    assert proc.wait(timeout=60) == 0
    sampler.stop.set()
    sampler.join()
    summary = sampler.summary()
    assert summary["workers_procs"] == 3
    assert summary["workers_each"] > 3 * 120  # each child's own peak, summed
    assert 120 < summary["workers"] < 2 * 120  # one child at a time
