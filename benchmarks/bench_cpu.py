"""Benchmark 1 (CPU, tiny model): a whole `dagster job execute` run vs a plain diffusers loop.

Both sides make the same images (one style; same prompts, seeds, steps, size and guidance) from
the same pre-built tiny model folder, each as a whole process timed from outside, alternating
A (dagster) and B (plain loop) so drift on the machine hits both alike. Prints each run, the
medians, images/min, the median ratio A/B (target <= 1.25: what differs is the run's fixed
overhead, not the images) and the time of an unchanged re-run, which makes no image and loads
no model, so it is the fixed overhead alone.

    python benchmarks/bench_cpu.py              # 48 images, 3 A/B pairs after one warm-up pair
    python benchmarks/bench_cpu.py --repeats 5
    python benchmarks/bench_cpu.py --smoke      # 2 images, 1 pair, no warm-up: checks it runs
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from sd_assets.domain.grid import load_grid, unique_subjects  # noqa: E402
from sd_assets.domain.models import ensure_model  # noqa: E402
from sd_assets.domain.pngmeta import image_key_path  # noqa: E402
from sd_assets.domain.prompts import GenerationSettings, build_prompt_rows  # noqa: E402
from sd_assets.domain.store import LocalStore  # noqa: E402
from sd_assets.domain.subject_lists import FolderSource, read_subject_lists  # noqa: E402

STYLE = "Banksy"
IMAGES_PER_PROMPT = 2
GRID = """\
styles: [{style}]
subjects_dir: subjects
prompt_template: "{{subject}} by {{style}}"
images_per_prompt: {images_per_prompt}
seed: 42
model: {{id: tiny-random, revision: main}}
inference: {{steps: {steps}, guidance_scale: 7.5, width: 64, height: 64, negative_prompt: "", batch_size: auto}}
storage: data
"""


def write_grid(folder: Path, images: int, steps: int) -> Path:
    subjects = max(1, images // IMAGES_PER_PROMPT)
    (folder / "subjects").mkdir(parents=True)
    (folder / "subjects" / "people.txt").write_text("\n".join(f"person number {i}" for i in range(subjects)) + "\n")
    grid = folder / "grid.yaml"
    grid.write_text(GRID.format(style=STYLE, images_per_prompt=IMAGES_PER_PROMPT, steps=steps))
    return grid


def timed(command: list[str], env: dict[str, str]) -> float:
    start = time.perf_counter()
    completed = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    if completed.returncode != 0:
        sys.exit(f"{' '.join(command[:4])} ... failed ({completed.returncode}):\n{completed.stderr[-4000:]}")
    return seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=48, help="images in the style (even; default 48)")
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=3, help="timed A/B pairs (default 3)")
    parser.add_argument("--no-warmup", action="store_true", help="skip the untimed first A/B pair")
    parser.add_argument("--smoke", action="store_true", help="2 images, 1 pair, no warm-up")
    args = parser.parse_args()
    if args.smoke:
        args.images, args.repeats, args.no_warmup = 2, 1, True

    bin_dir = Path(sys.executable).parent
    with tempfile.TemporaryDirectory(prefix="sd-assets-bench-") as tmp:
        work = Path(tmp)
        grid_path = write_grid(work, args.images, args.steps)
        grid = load_grid(grid_path)
        seeded = LocalStore(work / "seeded")
        ref = ensure_model(seeded, grid.model).ref
        model_folder = seeded.root / ref.prefix
        settings = GenerationSettings.from_grid(grid, ref.revision, ref.scheduler)
        rows = build_prompt_rows(grid, STYLE, unique_subjects(read_subject_lists(FolderSource(grid.subjects_dir), grid.max_subjects_per_list).lists), settings)
        prompts = work / "prompts.json"
        prompts.write_text(
            json.dumps(
                [
                    {"prompt": r.prompt, "negative_prompt": r.negative_prompt, "seed": r.seed, "name": f"{i:04d}"}
                    for i, r in enumerate(rows)
                ]
            )
        )
        (work / "dagster_home").mkdir()
        shutil.copy(REPO / "dagster.yaml", work / "dagster_home" / "dagster.yaml")
        base_env = {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}"}

        def dagster_env(store: Path) -> dict[str, str]:
            return {
                **base_env,
                "SD_ASSETS_GRID": str(grid_path),
                "SD_ASSETS_STORAGE": str(store),
                "SD_ASSETS_DEVICE": "cpu",
                "SD_ASSETS_MODEL_CACHE": str(work / "model_cache"),
                "DAGSTER_HOME": str(work / "dagster_home"),
            }

        dagster_command = [
            str(bin_dir / "dagster"), "job", "execute", "-m", "sd_assets", "-j", "generate_images",
            "--tags", json.dumps({"dagster/partition": STYLE}),
        ]  # fmt: skip

        def run_dagster(name: str) -> tuple[float, Path]:
            store = work / name
            shutil.copytree(seeded.root / "models", store / "models")
            seconds = timed(dagster_command, dagster_env(store))
            made = len(list((store / "images").rglob("*.png")))
            if made != len(rows):
                sys.exit(f"dagster run {name} made {made} images, expected {len(rows)}")
            return seconds, store

        def run_plain(name: str) -> tuple[float, Path]:
            out = work / name
            command = [
                sys.executable, str(REPO / "benchmarks" / "plain_diffusers_loop.py"),
                "--model", str(model_folder), "--prompts", str(prompts), "--out", str(out),
                "--steps", str(settings.steps), "--guidance", str(settings.guidance_scale),
                "--width", str(settings.width), "--height", str(settings.height),
            ]  # fmt: skip
            seconds = timed(command, base_env)
            return seconds, out

        print(f"benchmark 1: {len(rows)} images of {STYLE}, {settings.steps} steps, "
              f"{settings.width}x{settings.height}, tiny model, CPU ({os.cpu_count()} cores)")  # fmt: skip
        # Other work on the machine skews both sides; the load average tells how busy it was.
        print("load average (1, 5, 15 min) before: {:.2f} {:.2f} {:.2f}".format(*os.getloadavg()), flush=True)
        if not args.no_warmup:
            run_dagster("warmup-a")
            run_plain("warmup-b")
        dagster_times, plain_times = [], []
        for repeat in range(1, args.repeats + 1):
            a_seconds, store = run_dagster(f"a{repeat}")
            b_seconds, out = run_plain(f"b{repeat}")
            dagster_times.append(a_seconds)
            plain_times.append(b_seconds)
            print(f"pair {repeat}: A dagster job execute {a_seconds:6.2f} s   B plain diffusers loop {b_seconds:6.2f} s   "
                  f"A/B {a_seconds / b_seconds:.3f}", flush=True)  # fmt: skip

        ours = np.asarray(Image.open(store / image_key_path(rows[0].key)))
        plain = np.asarray(Image.open(out / "0000.png"))
        a_median, b_median = statistics.median(dagster_times), statistics.median(plain_times)
        before = sorted(p.stat().st_mtime_ns for p in (store / "images").rglob("*.png"))
        rerun = timed(dagster_command, dagster_env(store))
        after = sorted(p.stat().st_mtime_ns for p in (store / "images").rglob("*.png"))

        print(f"median A (dagster): {a_median:.2f} s, {60 * len(rows) / a_median:.1f} images/min")
        print(f"median B (plain diffusers): {b_median:.2f} s, {60 * len(rows) / b_median:.1f} images/min")
        print(f"same pixels for image 1: {'yes' if np.array_equal(ours, plain) else 'no'}")
        print(f"unchanged re-run (no model, no pipeline): {rerun:.2f} s; images rewritten: "
              f"{'none' if before == after else 'some'}")  # fmt: skip
        print("load average (1, 5, 15 min) after: {:.2f} {:.2f} {:.2f}".format(*os.getloadavg()))
        ratio = statistics.median(a / b for a, b in zip(dagster_times, plain_times, strict=True))
        print(f"ratio A/B (median of {len(dagster_times)} pairs): {ratio:.3f} (target <= 1.25)")


if __name__ == "__main__":
    main()
