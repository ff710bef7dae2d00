"""The benchmarks still run end to end, in their small modes, and print what they measure.

Only that they run and what they print and write are checked; their timings are never asserted.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


def run_benchmark(script: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / script), *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_cpu_benchmark_smoke_run_prints_the_ratio_and_the_rerun_time():
    completed = run_benchmark("bench_cpu.py", "--smoke")
    assert completed.returncode == 0, completed.stderr[-3000:]
    out = completed.stdout
    assert re.search(r"^ratio A/B \(median of 1 pairs\): \d+\.\d{3} \(target <= 1\.25\)$", out, re.M), out
    assert re.search(r"^unchanged re-run \(no model, no pipeline\): \d+\.\d+ s; images rewritten: none$", out, re.M)
    assert "same pixels for image 1: yes" in out


def test_gpu_benchmark_smoke_run_times_every_row_and_writes_its_table(tmp_path):
    out = tmp_path / "results" / "bench.md"
    completed = run_benchmark("bench_gpu.py", "--smoke", "--out", str(out))

    assert completed.returncode == 0, completed.stderr[-3000:]
    printed = completed.stdout
    assert printed.startswith("device: CPU; torch ")
    assert "host syncs per step: not counted (CUDA only)" in printed
    # The tiny model at 2 PNDM steps: 3 UNet evaluations (PNDM makes one more than its steps).
    assert re.search(r"^counted: [\d.e-]+ TFLOP per UNet evaluation .* x 3 \+ [\d.e-]+ TFLOP VAE decode", printed, re.M)
    assert re.search(r"^best: .+: \d+\.\d images/min, \d+\.\d\dx the naive loop$", printed, re.M), printed
    # Every row ran through the whole style path (the script checks each row's PNG count).
    raw = json.loads(out.with_suffix(".json").read_text())
    assert raw["device"] == "CPU" and raw["auto_batch_size"] == 1
    flops = raw["tflop"]
    assert flops["unet_evaluations"] == 3
    assert flops["image"] == pytest.approx(3 * flops["unet_evaluation"] + flops["vae_decode"])
    rows = [(r["config"], r["batch"], r["images"]) for r in raw["results"]]
    assert rows == [
        ("naive diffusers loop", 1, 2),
        ("engine, eager", 1, 2),
        ("engine, eager", 2, 4),
        ("engine, eager+qkv", 2, 4),
        ("engine, eager+deepcache2", 2, 4),
    ]
    assert all(r["seconds"] > 0 for r in raw["results"])
    engine_rows = raw["results"][1:]
    assert all(r["gpu_profile"].startswith("CPU: no GPU utilisation measured") for r in engine_rows)
    assert all(r["denoise_share"] > 0 for r in engine_rows)
    # DeepCache's row is credited with the FLOPs it does: 2 of the 3 evaluations are full ones.
    exact, cached = engine_rows[-2]["tflop_per_image"], engine_rows[-1]["tflop_per_image"]
    assert exact == pytest.approx(flops["image"]) and flops["vae_decode"] + 2 * flops["unet_evaluation"] < cached < exact
    table = out.read_text()
    assert "| engine, eager+qkv | 2 | 4 |" in table and "| engine, eager+deepcache2 | 2 | 4 |" in table


def test_gpu_benchmark_names_a_bad_row_before_building_anything():
    completed = run_benchmark("bench_gpu.py", "--smoke", "--rows", "eager:1 eager+inductor:2")

    assert completed.returncode == 2
    assert "variant 'eager+inductor': 'inductor' needs 'compiled'" in completed.stderr
    assert "built pipeline" not in completed.stdout


def test_deep_cache_benchmark_smoke_run_prints_seconds_and_flops_per_branch():
    completed = run_benchmark("bench_deep_cache.py", "--smoke", "--branches", "0", "5")
    assert completed.returncode == 0, completed.stderr[-3000:]
    lines = completed.stdout.splitlines()
    assert re.match(r"^tiny UNet, 64x64, batch 1 with guidance, float32 on cpu, \d+ threads$", lines[0]), lines[0]
    assert re.match(r"^full evaluation: \d+\.\d ms$", lines[1]), lines[1]
    shares = {}
    for line in lines[2:]:
        match = re.match(r"^branch (\d): [\d.]+ ms = [\d.]+ of a full evaluation \(FLOPs: ([\d.]+)\); interval 3: ", line)
        assert match, line
        shares[int(match[1])] = float(match[2])
    # The deepest branch keeps most of the network: its short evaluations cost more.
    assert shares.keys() == {0, 5} and 0 < shares[0] < shares[5] < 1

    completed = run_benchmark("bench_deep_cache.py", "--smoke", "--branches", "6")
    assert completed.returncode == 2
    assert "this UNet has 6 skip branches (0 to 5)" in completed.stderr


def test_sensor_benchmark_small_run_reads_only_the_changed_list():
    completed = run_benchmark("bench_sensor.py", "--lists", "30")

    assert completed.returncode == 0, completed.stderr[-3000:]
    printed = completed.stdout
    assert re.search(r"^first look \(reads every list\): +\d+\.\d{3} s, 2 run requests$", printed, re.M), printed
    assert re.search(r"^nothing changed: +\d+\.\d{3} s, 0 run requests$", printed, re.M)
    assert re.search(r"^one list changed: +\d+\.\d{3} s, 2 run requests$", printed, re.M)
    assert "lists a further unchanged look reads: 0" in printed
