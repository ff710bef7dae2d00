"""Benchmark 1 still runs end to end: both sides make the same images and it prints its ratio.

Only that it runs and what it prints are checked; its timings are never asserted.
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def test_cpu_benchmark_smoke_run_prints_the_ratio_and_the_rerun_time():
    completed = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / "bench_cpu.py"), "--smoke"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert completed.returncode == 0, completed.stderr[-3000:]
    out = completed.stdout
    assert re.search(r"^ratio A/B \(median of 1 pairs\): \d+\.\d{3} \(target <= 1\.25\)$", out, re.M), out
    assert re.search(r"^unchanged re-run \(no model, no pipeline\): \d+\.\d+ s; images rewritten: none$", out, re.M)
    assert "same pixels for image 1: yes" in out
