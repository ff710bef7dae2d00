"""Runs that die, and runs that overlap, on the shipped local instance (dagster.yaml).

A run killed in the middle of a style leaves nothing locked: the next run makes only the
images the first did not. Two runs of one style started together make each image once, and
fill the model cache once.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import dagster as dg
import pytest

from sd_assets.domain.catalog import read_catalog
from sd_assets.domain.store import LocalStore
from sd_assets_tests.helpers import image_paths, write_grid

REPO = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
SUBJECTS = [f"subject {i}" for i in range(8)]
TIMEOUT_SECONDS = 300


@pytest.fixture
def node(tmp_path) -> dict:
    """The environment of `dagster job execute` on a local instance made from the shipped dagster.yaml."""
    home = tmp_path / "dagster_home"
    home.mkdir()
    shutil.copy(REPO / "dagster.yaml", home / "dagster.yaml")
    # Create the instance's SQLite databases once: two processes creating them at the same
    # moment race in their schema migrations (a Dagster matter, not this test's).
    dg.DagsterInstance.from_config(str(home)).dispose()
    return {
        **os.environ,
        "DAGSTER_HOME": str(home),
        "SD_ASSETS_DEVICE": "cpu",
        "SD_ASSETS_DEVICE_LOCKS": str(tmp_path / "locks"),
        "SD_ASSETS_MODEL_CACHE": str(tmp_path / "model-cache"),
    }


def start_run(env: dict, grid: Path, style: str, log: Path) -> subprocess.Popen:
    command = [str(BIN / "dagster"), "job", "execute", "-m", "sd_assets", "-j", "generate_images",
               "--tags", json.dumps({"dagster/partition": style})]  # fmt: skip
    return subprocess.Popen(
        command, cwd=REPO, env={**env, "SD_ASSETS_GRID": str(grid)}, stdout=log.open("wb"),
        stderr=subprocess.STDOUT, start_new_session=True,
    )  # fmt: skip


def finish(run: subprocess.Popen, log: Path) -> None:
    try:
        code = run.wait(timeout=TIMEOUT_SECONDS)
    except subprocess.TimeoutExpired:
        os.killpg(run.pid, signal.SIGKILL)
        run.wait()
        pytest.fail(f"the run did not end in {TIMEOUT_SECONDS} s\n" + log.read_text()[-3000:])
    assert code == 0, log.read_text()[-3000:]


def materializations(env: dict, asset: str) -> list[dict]:
    """The metadata of every materialization of ``asset`` on the node's instance, oldest first."""
    with dg.DagsterInstance.from_config(env["DAGSTER_HOME"]) as instance:
        records = instance.fetch_materializations(dg.AssetKey(asset), limit=100, ascending=True).records
        return [
            {name: value.value for name, value in record.asset_materialization.metadata.items()} for record in records
        ]


def test_a_killed_run_leaves_nothing_locked_and_the_next_run_makes_only_the_rest(tmp_path, tiny_model_store, node):
    grid = write_grid(tmp_path / "grid", styles=("Banksy",), subjects=SUBJECTS, images_per_prompt=1, batch_size=1)
    shutil.copytree(tiny_model_store.root / "models", grid.parent / "data" / "models")
    paths = image_paths(grid, "Banksy", SUBJECTS)

    first = start_run(node, grid, "Banksy", tmp_path / "first.log")
    deadline = time.monotonic() + TIMEOUT_SECONDS
    while sum(path.is_file() for path in paths) < 2:
        assert first.poll() is None, "the first run ended before it was killed\n" + (tmp_path / "first.log").read_text()
        assert time.monotonic() < deadline, "the first run made no images in time"
        time.sleep(0.2)
    os.killpg(first.pid, signal.SIGKILL)
    first.wait()
    made = {path: (path.stat().st_ino, path.stat().st_mtime_ns) for path in paths if path.is_file()}
    assert 2 <= len(made) < len(paths) and paths[0] in made
    # Before the next run, the first subject (made, but with no catalog row yet) leaves its list.
    (grid.parent / "subjects" / "people.txt").write_text("\n".join(SUBJECTS[1:]) + "\n")
    # What a write killed half-way leaves beside an image not made (when the kill lands in one).
    missing = next(path for path in paths if path not in made)
    half_written = missing.parent / f".{missing.name}.0123456789ab.tmp"
    half_written.parent.mkdir(parents=True, exist_ok=True)
    half_written.write_bytes(b"half a png")

    second = start_run(node, grid, "Banksy", tmp_path / "second.log")
    finish(second, tmp_path / "second.log")

    assert all(path.is_file() for path in paths)
    assert {path: (path.stat().st_ino, path.stat().st_mtime_ns) for path in made} == made, "an image was made again"
    assert not half_written.exists(), "the next run of the style discards what the killed one left"
    assert materializations(node, "style_images")[-1]["generated"] == len(paths) - len(made)
    catalog = read_catalog(LocalStore(grid.parent / "data"))
    assert len(catalog) == catalog["key"].nunique() == len(paths), "every image has its row, in the grid or not"
    assert SUBJECTS[0] in set(catalog["subject"])
    assert not list((grid.parent / "data" / "catalog" / "pending").rglob("*.*"))


def test_two_runs_of_one_style_at_once_make_each_image_and_the_model_once(tmp_path, node):
    grid = write_grid(tmp_path / "grid", styles=("Banksy",), subjects=SUBJECTS[:3], images_per_prompt=1, batch_size=1)
    logs = [tmp_path / "a.log", tmp_path / "b.log"]
    runs = [start_run(node, grid, "Banksy", log) for log in logs]
    for run, log in zip(runs, logs):
        finish(run, log)

    assert sorted(m["cache"] for m in materializations(node, "model_weights")) == ["built", "cached"]
    assert sorted(m["generated"] for m in materializations(node, "style_images")) == [0, 3]
    assert any("waiting for process" in log.read_text() for log in logs)
    assert all(path.is_file() for path in image_paths(grid, "Banksy", SUBJECTS[:3]))


def test_ctrl_c_in_a_demo_says_it_was_interrupted_and_how_to_go_on(tmp_path, tiny_model_store, node):
    grid = write_grid(
        tmp_path / "grid", styles=("Banksy", "Andy Warhol"), subjects=SUBJECTS, images_per_prompt=1, batch_size=1
    )
    shutil.copytree(tiny_model_store.root / "models", grid.parent / "data" / "models")
    paths = image_paths(grid, "Banksy", SUBJECTS)
    log = tmp_path / "demo.log"
    demo = subprocess.Popen(
        [str(BIN / "sd-assets"), "demo"], cwd=REPO, env={**node, "SD_ASSETS_GRID": str(grid)},
        stdout=subprocess.DEVNULL, stderr=log.open("wb"), start_new_session=True,
    )  # fmt: skip
    deadline = time.monotonic() + TIMEOUT_SECONDS
    while not any(path.is_file() for path in paths):
        assert demo.poll() is None, "the demo ended before it was interrupted\n" + log.read_text()
        assert time.monotonic() < deadline, "the demo made no images in time"
        time.sleep(0.2)
    os.kill(demo.pid, signal.SIGINT)
    assert demo.wait(timeout=TIMEOUT_SECONDS) == 130, log.read_text()[-3000:]

    assert log.read_text().splitlines()[-1] == (
        "sd-assets: interrupted while making Banksy; not run: Andy Warhol; the images made are kept, and "
        "`sd-assets demo` makes only what is missing"
    )
    assert 1 <= sum(path.is_file() for path in paths) < len(paths)
