"""How much DeepCache changes a grid's pictures: the same prompts and seeds with and without it.

    python benchmarks/deep_cache_quality.py --grid examples/grid-sd15.yaml --images 16
    python benchmarks/deep_cache_quality.py --grid grid.yaml --images 4 --settings 2 3 3b1 --out /tmp/dc

The grid, store, device and model cache are the job's own resources, built from the project's
variables as the job builds them (``SD_ASSETS_STORAGE`` before the grid's store). The grid gives
the model (made sure of in the store as ``model_weights`` does, from the hub when it is not there
yet), scheduler, steps, guidance, size, negative prompt, subjects and styles. The first ``--images``
prompts (the first subject in every style, then the second, ...; image index 0, so the seed each
has in the grid) are rendered through the engine once without DeepCache (the exact pictures,
whatever the grid says of DeepCache) and once per DeepCache setting. ``--settings`` takes
``N`` or ``NbB``: interval N, branch B (default 0).

Each DeepCache picture is compared with its exact twin: PSNR (dB; "inf" where they are the
same) and SSIM (on luma, 7x7 windows; 1 is the same picture). The pictures go side by side into
``index.html`` in ``--out``, every number into ``results.json``; a table is printed, and the
page's path last. The numbers say how far the pictures move, not whether they got worse: look
at the page. With the offline ``tiny-random`` model the pictures are noise and the numbers say
nothing about a real model.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import re
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np  # noqa: E402

SETTING = re.compile(r"^(\d+)(?:b(\d+))?$")
SSIM_WINDOW = 7


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    """Peak signal-to-noise ratio of two uint8 images, in dB; ``inf`` when they are equal."""
    mse = float(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2))
    return math.inf if mse == 0 else 10 * math.log10(255.0**2 / mse)


def _luma(pixels: np.ndarray) -> np.ndarray:
    return pixels.astype(np.float64) @ np.array([0.299, 0.587, 0.114]) if pixels.ndim == 3 else pixels.astype(float)


def _window_means(values: np.ndarray, size: int) -> np.ndarray:
    """Means over every ``size`` x ``size`` window wholly inside ``values`` (summed-area table)."""
    table = np.pad(values, ((1, 0), (1, 0))).cumsum(0).cumsum(1)
    sums = table[size:, size:] - table[:-size, size:] - table[size:, :-size] + table[:-size, :-size]
    return sums / (size * size)


def ssim(a: np.ndarray, b: np.ndarray, size: int = SSIM_WINDOW) -> float:
    """Mean structural similarity of two uint8 images' luma over ``size`` x ``size`` windows.

    The constants of Wang et al. (2004) for 8-bit data, and sample (co)variances in each window.
    """
    x, y = _luma(a), _luma(b)
    if min(x.shape) < size:
        raise ValueError(f"SSIM needs images of at least {size}x{size} pixels, not {x.shape[1]}x{x.shape[0]}")
    c1, c2 = (0.01 * 255) ** 2, (0.03 * 255) ** 2
    mx, my = _window_means(x, size), _window_means(y, size)
    sample = size * size / (size * size - 1)
    vx = (_window_means(x * x, size) - mx * mx) * sample
    vy = (_window_means(y * y, size) - my * my) * sample
    cxy = (_window_means(x * y, size) - mx * my) * sample
    index = ((2 * mx * my + c1) * (2 * cxy + c2)) / ((mx * mx + my * my + c1) * (vx + vy + c2))
    return float(index.mean())


def parse_setting(text: str):
    """'3' -> DeepCache(3, 0); '3b1' -> DeepCache(3, 1)."""
    from sd_assets.domain.deep_cache import DeepCache

    match = SETTING.match(text)
    if not match:
        raise ValueError(f"DeepCache setting {text!r}: write N or NbB (interval N, branch B), like 3 or 3b1")
    try:
        return DeepCache(int(match[1]), int(match[2] or 0))
    except ValueError as exc:
        raise ValueError(f"DeepCache setting {text!r}: {exc}") from None


def setting_name(cache) -> str:
    return "exact" if cache is None else f"deepcache-{cache.interval}b{cache.branch}"


def sample_rows(config, subjects: list[str], settings, count: int) -> list:
    """The first subject in every style, then the second, ...: image index 0 of each, as in the grid."""
    from sd_assets.domain.prompts import build_prompt_rows

    by_style = [
        [row for row in build_prompt_rows(config, style, subjects, settings) if row.image_index == 0]
        for style in config.styles
    ]
    return [rows[subject] for subject in range(len(subjects)) for rows in by_style][:count]


def render_all(loaded, rows: list, settings, batch: int) -> np.ndarray:
    from sd_assets.domain import engine

    batches = [rows[at : at + batch] for at in range(0, len(rows), batch)]
    return np.concatenate([engine.render_batch(loaded, part, settings) for part in batches])


PAGE_TEMPLATE = Path(__file__).with_name("deep_cache_quality.html.j2")


def write_page(out: Path, title: str, rows: list, names: list[str], metrics: dict, note: str = "") -> Path:
    """The pictures side by side, each DeepCache one with its numbers: ``out/index.html``."""
    import jinja2

    environment = jinja2.Environment(
        loader=jinja2.FileSystemLoader(PAGE_TEMPLATE.parent), autoescape=True, undefined=jinja2.StrictUndefined,
        trim_blocks=True, lstrip_blocks=True,
    )  # fmt: skip
    lines = [
        {
            "prompt": row.prompt,
            "seed": row.seed,
            "cells": [
                {"name": name, "src": f"images/{number:03d}-{name}.png",
                 "metric": None if name == "exact" else metrics[name][number]}  # fmt: skip
                for name in names
            ],
        }
        for number, row in enumerate(rows)
    ]
    page = out / "index.html"
    page.write_text(
        environment.get_template(PAGE_TEMPLATE.name).render(title=title, note=note, names=names, lines=lines),
        encoding="utf-8",
    )
    return page


def _finite(metric: dict) -> dict:
    """JSON has no infinity: the PSNR of two equal pictures is written as null."""
    return {name: None if math.isinf(value) else value for name, value in metric.items()}


def summary(values: list[float]) -> tuple[float, float]:
    """Mean and least of ``values``; a mean of PSNRs that include ``inf`` is ``inf``."""
    return (math.inf if any(math.isinf(v) for v in values) else sum(values) / len(values)), min(values)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--grid", type=Path, help="the grid file (default: SD_ASSETS_GRID, else grid.yaml)")
    parser.add_argument("--images", type=int, default=16, help="prompts to compare (default 16)")
    parser.add_argument("--settings", nargs="+", default=["3", "2"], help="DeepCache settings: N or NbB (default 3 2)")
    parser.add_argument("--batch", type=int, default=None, help="images per batch (default: the grid's; auto on a GPU)")
    parser.add_argument("--out", type=Path, default=Path("deep-cache-quality"), help="folder for the page and numbers")
    args = parser.parse_args(argv)
    try:
        caches = [parse_setting(text) for text in args.settings]
    except ValueError as exc:
        parser.error(str(exc))
    if args.images < 1:
        parser.error("--images must be 1 or more")
    if args.batch is not None and args.batch < 1:
        parser.error("--batch must be 1 or more")
    given = [setting_name(cache) for cache in caches]
    if twice := sorted({name for name in given if given.count(name) > 1}):
        parser.error(f"DeepCache setting given twice: {', '.join(twice)}")

    from sd_assets.definitions import build_definitions
    from sd_assets.domain import engine
    from sd_assets.domain.errors import SdAssetsError
    from sd_assets.domain.grid import unique_subjects
    from sd_assets.domain.models import ensure_model, local_model_folder
    from sd_assets.domain.prompts import GenerationSettings
    from sd_assets.domain.subject_lists import read_subject_lists, subject_source

    try:
        # The job's own resources, from the project's variables as the job reads them (the store,
        # its S3 client, the hub, the device and the model cache).
        environ = {**os.environ, **({"SD_ASSETS_GRID": str(args.grid)} if args.grid else {})}
        resources = build_definitions(environ).resources
        config, store, generator = resources["grid"].load(), resources["store"].open(), resources["generator"]
        lists = read_subject_lists(subject_source(config, store), config.max_subjects_per_list).lists
        subjects = unique_subjects(lists)
        if not subjects:
            raise SdAssetsError(f"the grid {config.source} has no subjects to compare")
        report = ensure_model(store, config.model, resources["hub"].settings(), config.inference.safety_checker)
        ref = report.ref
        inference = config.inference
        grid_settings = GenerationSettings.from_grid(config, ref.revision, inference.scheduler or ref.scheduler)
        exact = dataclasses.replace(grid_settings, deep_cache=None)
        rows = sample_rows(config, subjects, exact, args.images)
        folder = local_model_folder(store, ref, Path(generator.model_cache_dir).expanduser()).folder
        device = engine.pick_device(generator.device)
        dtype = engine.pick_dtype(device, inference.dtype)
    except SdAssetsError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(f"model {ref.model_id}@{ref.revision[:10]} ({report.action}); {len(rows)} prompts from {config.source}; "
          f"{exact.width}x{exact.height}, {exact.steps} steps, guidance {exact.guidance_scale}, {exact.scheduler}; "
          f"{device} ({dtype})", flush=True)  # fmt: skip

    images_dir = args.out / "images"
    images_dir.mkdir(parents=True, exist_ok=True)
    for stale in images_dir.glob("[0-9][0-9][0-9]-*.png"):  # an earlier comparison's pictures
        stale.unlink()
    from PIL import Image

    pictures: dict[str, np.ndarray] = {}
    seconds: dict[str, float] = {}
    batch = args.batch or (inference.batch_size if inference.batch_size != "auto" else None)
    for cache in [None, *caches]:
        name = setting_name(cache)
        settings = dataclasses.replace(exact, deep_cache=cache)
        loaded = engine.load_pipeline(folder, device, dtype, inference.scheduler, False, inference.safety_checker,
                                      variant=ref.variant, deep_cache=cache)  # fmt: skip
        # One batch size for every setting: on a GPU, another batching can move a few pixels.
        batch = batch or engine.auto_batch_size(loaded, settings, None, len(rows))
        start = time.perf_counter()
        pictures[name] = render_all(loaded, rows, settings, batch)
        seconds[name] = time.perf_counter() - start
        for number, pixels in enumerate(pictures[name]):
            Image.fromarray(pixels).save(images_dir / f"{number:03d}-{name}.png")
        print(f"{name}: {len(rows)} images in {seconds[name]:.1f} s (batch {batch})", flush=True)

    names = list(pictures)
    metrics = {
        name: [{"psnr": psnr(e, d), "ssim": ssim(e, d)} for e, d in zip(pictures["exact"], pictures[name])]
        for name in names[1:]
    }
    print("\n| DeepCache | images | PSNR mean dB | PSNR least dB | SSIM mean | SSIM least |")
    print("|---|---:|---:|---:|---:|---:|")
    for name in names[1:]:
        psnr_mean, psnr_least = summary([m["psnr"] for m in metrics[name]])
        ssim_mean, ssim_least = summary([m["ssim"] for m in metrics[name]])
        print(f"| {name} | {len(rows)} | {psnr_mean:.2f} | {psnr_least:.2f} | {ssim_mean:.4f} | {ssim_least:.4f} |")
    title = f"DeepCache against exact: {ref.model_id}@{ref.revision[:10]}, {len(rows)} prompts"
    tiny = "The tiny-random model's pictures are noise: these numbers say nothing about a real model."
    note = tiny if config.model.is_tiny else ""
    if note:
        print(f"\n{note}")
    page = write_page(args.out, title, rows, names, metrics, note)
    results = {
        "grid": str(config.source), "model": ref.model_id, "revision": ref.revision, "device": device, "dtype": dtype,
        "settings": dataclasses.asdict(exact), "seconds": seconds,
        "rows": [{"prompt": row.prompt, "seed": row.seed, "exact_key": row.key,
                  **{name: _finite(metrics[name][number]) for name in names[1:]}} for number, row in enumerate(rows)],
    }  # fmt: skip
    (args.out / "results.json").write_text(json.dumps(results, indent=1, default=str), encoding="utf-8")
    print(f"\n{page.resolve()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
