"""Helpers for tests: writing grid files and materializing a style as the CLI would."""

from __future__ import annotations

import textwrap
from pathlib import Path

import dagster as dg

from sd_assets.definitions import GENERATE_JOB, build_definitions

GRID_TEMPLATE = """\
styles: {styles}
subjects_dir: subjects
prompt_template: "{{subject}} by {{style}}"
images_per_prompt: {images_per_prompt}
seed: 42
model: {{id: tiny-random, revision: main}}
inference: {{steps: 2, guidance_scale: 7.5, width: 64, height: 64, negative_prompt: "", batch_size: {batch_size}}}
storage: {storage}
"""


def write_grid(
    folder: Path,
    styles=("Banksy", "Andy Warhol"),
    subjects=("alan turing", "ada lovelace"),
    images_per_prompt: int = 2,
    batch_size: int | str = 4,
    storage: str = "data",
    extra: str = "",
) -> Path:
    """A grid file with one subject list, in ``folder``; returns its path."""
    (folder / "subjects").mkdir(parents=True, exist_ok=True)
    (folder / "subjects" / "people.txt").write_text("\n".join(subjects) + "\n")
    grid = folder / "grid.yaml"
    body = GRID_TEMPLATE.format(
        styles="[" + ", ".join(styles) + "]",
        images_per_prompt=images_per_prompt,
        batch_size=batch_size,
        storage=storage,
    )
    grid.write_text(body + textwrap.dedent(extra))
    return grid


def materialize_style(grid_path: Path, style: str, instance: dg.DagsterInstance, **environ: str):
    """Run the generate_images job for one style, as `dagster job execute` would."""
    defs = build_definitions({"SD_ASSETS_GRID": str(grid_path), "SD_ASSETS_DEVICE": "cpu", **environ})
    job = defs.resolve_job_def(GENERATE_JOB)
    result = job.execute_in_process(partition_key=style, instance=instance)
    assert result.success
    return result
