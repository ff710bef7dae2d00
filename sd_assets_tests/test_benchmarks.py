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


def test_gpu_benchmark_that_has_no_time_for_any_row_says_why_and_fails(tmp_path):
    completed = run_benchmark("bench_gpu.py", "--smoke", "--rows", "eager:1 compiled:1", "--budget-seconds", "5")

    assert completed.returncode == 1
    assert re.search(r"^eager batch 1: skipped \(time budget: \d+ s spent \+ about 15 s to warm up > "
                     r"--budget-seconds 5\)$", completed.stdout, re.M), completed.stdout  # fmt: skip
    assert re.search(r"^compiled batch 1: skipped \(time budget: \d+ s spent \+ about 130 s", completed.stdout, re.M)
    assert "best:" not in completed.stdout
    assert "no engine row ran: raise --budget-seconds (5), or give rows that fit it" in completed.stderr


def test_gpu_benchmark_whose_rows_all_fail_says_they_failed_not_that_time_ran_out(monkeypatch, capsys):
    import importlib.util

    spec = importlib.util.spec_from_file_location("bench_gpu_under_test", REPO / "benchmarks" / "bench_gpu.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)

    def out_of_memory(*args, **kwargs):
        raise RuntimeError("CUDA out of memory")

    monkeypatch.setattr(bench, "run_engine", out_of_memory)
    assert bench.main(["--smoke", "--rows", "eager:1,2"]) == 1
    printed = capsys.readouterr()
    assert printed.out.count("FAILED RuntimeError('CUDA out of memory')") == 2
    assert "2 row(s) failed" in printed.err and "--budget-seconds" not in printed.err and "best:" not in printed.out


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


def _quality_module():
    import importlib.util

    spec = importlib.util.spec_from_file_location("deep_cache_quality", REPO / "benchmarks" / "deep_cache_quality.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_deep_cache_quality_measures_psnr_and_ssim_as_defined():
    import numpy as np

    quality = _quality_module()
    rng = np.random.default_rng(0)
    a = rng.integers(0, 256, (10, 9, 3), dtype=np.uint8)
    assert quality.psnr(a, a) == float("inf") and quality.ssim(a, a) == pytest.approx(1.0)
    # Every value one level up: a mean squared error of 1, so 10 log10(255^2) dB.
    a = np.clip(a, 0, 254)
    brighter = a + 1
    assert quality.psnr(a, brighter) == pytest.approx(48.1308, abs=1e-4)
    assert quality.ssim(a, 255 - a) < 0  # the negative: structure reversed

    # SSIM window by window, written out, against the summed-area version.
    b = rng.integers(0, 256, (10, 9, 3), dtype=np.uint8)
    x, y = (pixels.astype(float) @ np.array([0.299, 0.587, 0.114]) for pixels in (a, b))
    c1, c2, size = (0.01 * 255) ** 2, (0.03 * 255) ** 2, 7
    values = []
    for top in range(x.shape[0] - size + 1):
        for left in range(x.shape[1] - size + 1):
            wx, wy = x[top : top + size, left : left + size].ravel(), y[top : top + size, left : left + size].ravel()
            vx, vy, cxy = wx.var(ddof=1), wy.var(ddof=1), np.cov(wx, wy, ddof=1)[0, 1]
            mx, my = wx.mean(), wy.mean()
            values.append(((2 * mx * my + c1) * (2 * cxy + c2)) / ((mx**2 + my**2 + c1) * (vx + vy + c2)))
    assert len(values) == 4 * 3
    assert quality.ssim(a, b) == pytest.approx(np.mean(values), rel=1e-9)
    with pytest.raises(ValueError, match="at least 7x7"):
        quality.ssim(a[:6], b[:6])


def test_deep_cache_quality_compares_the_grids_own_pictures_with_deep_cache_ones(tmp_path):
    import dagster as dg
    import numpy as np
    from PIL import Image

    from sd_assets.domain.pngmeta import image_key_path
    from sd_assets.domain.prompts import image_seed
    from sd_assets_tests.helpers import materialize_style, write_grid

    grid = write_grid(tmp_path, subjects=("alan turing", "ada <b>lovelace</b> & co"), storage=str(tmp_path / "data"))
    out = tmp_path / "quality"
    (out / "images").mkdir(parents=True)
    (out / "images" / "099-exact.png").write_bytes(b"an earlier comparison's picture")
    (out / "images" / "notes.txt").write_text("the user's own")
    completed = run_benchmark(
        "deep_cache_quality.py", "--grid", str(grid), "--images", "3", "--settings", "2", "3b1", "--out", str(out)
    )
    assert completed.returncode == 0, completed.stderr[-3000:]
    lines = completed.stdout.strip().splitlines()
    assert lines[-1] == str((out / "index.html").resolve())
    for name in ("deepcache-2b0", "deepcache-3b1"):
        line = rf"^\| {name} \| 3 \| \d+\.\d\d \| \d+\.\d\d \| 0\.\d{{4}} \| 0\.\d{{4}} \|$"
        assert re.search(line, completed.stdout, re.M), completed.stdout

    results = json.loads((out / "results.json").read_text())
    rows = results["rows"]
    # The first subject in every style, then the second: each prompt's image 0, with the grid's seed.
    subjects = ["alan turing", "alan turing", "ada <b>lovelace</b> & co"]
    assert [row["prompt"] for row in rows] == [f"{s} by {style}" for s, style in zip(subjects, ["Banksy", "Andy Warhol"] * 2)]
    assert [row["seed"] for row in rows] == [image_seed(42, subject, 0) for subject in subjects]
    assert results["settings"]["deep_cache"] is None and results["settings"]["steps"] == 2
    for row in rows:
        for name in ("deepcache-2b0", "deepcache-3b1"):
            # Three UNet evaluations, the later ones short: every picture moved, and is still like its twin.
            assert row[name]["psnr"] is not None and row[name]["psnr"] > 10
            assert 0 < row[name]["ssim"] < 1

    page = (out / "index.html").read_text()
    sources = re.findall(r'<img src="([^"]+)"', page)
    assert len(sources) == 3 * 3
    for source in sources:
        with Image.open(out / source) as image:
            assert image.size == (64, 64) and image.mode == "RGB"
    assert "alan turing by Andy Warhol<br>seed" in page and page.count("PSNR ") >= 3 * 2
    assert "ada &lt;b&gt;lovelace&lt;/b&gt; &amp; co by Banksy<br>seed" in page and "<b>" not in page
    assert not (out / "images" / "099-exact.png").exists() and (out / "images" / "notes.txt").exists()
    assert "pictures are noise" in page and "pictures are noise" in completed.stdout

    # The exact pictures are the job's own: the same pixels as the PNGs a run makes for those keys.
    materialize_style(grid, "Banksy", dg.DagsterInstance.ephemeral())
    for number in (0, 2):
        made = tmp_path / "data" / image_key_path(rows[number]["exact_key"])
        with Image.open(made) as job, Image.open(out / "images" / f"{number:03d}-exact.png") as exact:
            assert np.array_equal(np.asarray(job.convert("RGB")), np.asarray(exact))


def test_deep_cache_quality_names_a_bad_setting_or_grid_before_rendering_anything(tmp_path):
    completed = run_benchmark("deep_cache_quality.py", "--grid", str(tmp_path / "none.yaml"), "--settings", "3", "1b2")
    assert completed.returncode == 2
    assert "DeepCache setting '1b2': DeepCache's interval must be 2 or more, not 1" in completed.stderr
    completed = run_benchmark("deep_cache_quality.py", "--settings", "2", "3", "3b0", "2b0")
    assert completed.returncode == 2
    assert "DeepCache setting given twice: deepcache-2b0, deepcache-3b0" in completed.stderr
    completed = run_benchmark("deep_cache_quality.py", "--batch", "0")
    assert completed.returncode == 2 and "--batch must be 1 or more" in completed.stderr
    completed = run_benchmark("deep_cache_quality.py", "--grid", str(tmp_path / "none.yaml"), "--out", str(tmp_path / "q"))
    assert completed.returncode == 1
    assert completed.stderr.startswith(f"error: grid file {tmp_path / 'none.yaml'} does not exist")
    assert not (tmp_path / "q").exists()
