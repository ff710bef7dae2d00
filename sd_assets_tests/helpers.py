"""Helpers for tests: writing grid files, materializing a style as the CLI would, finding images;
the machine's Postgres, free loopback ports, stopping the processes a test started, and PNGs that
claim another size."""

from __future__ import annotations

import socket
import struct
import subprocess
import textwrap
import zlib
from pathlib import Path

import dagster as dg

from sd_assets.definitions import GENERATE_JOB, build_definitions
from sd_assets.domain.grid import load_grid
from sd_assets.domain.models import read_model_ref
from sd_assets.domain.pngmeta import image_key_path
from sd_assets.domain.prompts import GenerationSettings, build_prompt_rows
from sd_assets.domain.store import LocalStore

# The machine's PostgreSQL (trust auth), where tests that need a production instance make their databases.
LOCAL_POSTGRES = {"host": "127.0.0.1", "port": 5432, "user": "postgres"}

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


def image_paths(grid_path: Path, style: str, subjects: list[str]) -> list[Path]:
    """Where the images of ``subjects`` in ``style`` live once made (the grid's store is a folder)."""
    grid = load_grid(grid_path)
    store = LocalStore(grid.storage)
    ref = read_model_ref(store, grid.model)
    settings = GenerationSettings.from_grid(grid, ref.revision, grid.inference.scheduler or ref.scheduler)
    return [store.local_path(image_key_path(row.key)) for row in build_prompt_rows(grid, style, subjects, settings)]


def stop_processes(processes: list[subprocess.Popen], grace_seconds: float) -> None:
    """SIGTERM to each, then SIGKILL to those still running ``grace_seconds`` later."""
    for process in processes:
        process.terminate()
    for process in processes:
        try:
            process.wait(timeout=grace_seconds)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def free_port() -> int:
    """A loopback port free now, for a server that must be told its port before it starts."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def claiming_size(png: bytes, width: int, height: int) -> bytes:
    """``png`` with a header that says it is ``width`` x ``height`` pixels (its chunks as they were):
    a PNG that would take gigabytes to decode, in a few hundred bytes."""
    assert png[12:16] == b"IHDR"
    header = struct.pack(">II", width, height) + png[24:29]
    return png[:16] + header + struct.pack(">I", zlib.crc32(b"IHDR" + header)) + png[33:]
