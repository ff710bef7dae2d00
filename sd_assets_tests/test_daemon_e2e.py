"""The real thing: dagster-daemon (and dagster-webserver) against a temporary DAGSTER_HOME.

A backfill of every style launched through the webserver's GraphQL API, and the
new_subject_lists sensor turned on with the `dagster` CLI, each run to the last image; a sensor
run killed half-way through its images, run again by the daemon; a queued run whose style was
renamed before it started.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import dagster as dg
import pyarrow.parquet as pq
import pytest

from sd_assets.definitions import GENERATE_JOB
from sd_assets.domain.node_locks import work_lock_name
from sd_assets.orchestration.sensors import NEW_SUBJECT_LISTS
from sd_assets_tests.helpers import free_port, image_paths, stop_processes, write_grid

WORKTREE = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
STYLES = ["Banksy", "Andy Warhol"]
SUBJECTS = ["alan turing", "ada lovelace"]
TIMEOUT_SECONDS = 300
# A test instance: the project's dagster.yaml, with the run queue polled every second.
TEST_INSTANCE_EXTRA = """
run_coordinator:
  module: dagster._core.run_coordinator
  class: QueuedRunCoordinator
  config:
    dequeue_interval_seconds: 1
"""



class DagsterNode:
    """A temporary DAGSTER_HOME and grid, and the Dagster processes serving them."""

    def __init__(self, root: Path, tiny_model_store):
        self.root = root
        self.grid = write_grid(root / "grid", styles=STYLES, subjects=SUBJECTS, images_per_prompt=1)
        shutil.copytree(tiny_model_store.root / "models", root / "grid" / "data" / "models")
        self.home = root / "dagster_home"
        self.home.mkdir()
        (self.home / "dagster.yaml").write_text((WORKTREE / "dagster.yaml").read_text() + TEST_INSTANCE_EXTRA)
        self.env = {
            **os.environ,
            "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",
            "PYTHONPATH": str(WORKTREE),
            "DAGSTER_HOME": str(self.home),
            "SD_ASSETS_GRID": str(self.grid),
            "SD_ASSETS_DEVICE": "cpu",
            "SD_ASSETS_DEVICE_COUNT": "2",
            "SD_ASSETS_DEVICE_LOCKS": str(root / "device-locks"),
            "SD_ASSETS_MODEL_CACHE": str(root / "model-cache"),
            "SD_ASSETS_SENSOR_INTERVAL": "1",
        }
        self.processes: list[tuple[str, subprocess.Popen]] = []
        self.port: int | None = None

    def start(self, name: str, *args: str) -> None:
        log = open(self.root / f"{name}.log", "wb")
        process = subprocess.Popen(
            [str(BIN / name), *args], cwd=WORKTREE, env=self.env, stdout=log, stderr=subprocess.STDOUT
        )
        self.processes.append((name, process))

    def start_daemon(self) -> None:
        self.start("dagster-daemon", "run", "-w", "workspace.yaml")

    def start_webserver(self) -> None:
        self.port = free_port()
        self.start("dagster-webserver", "-w", "workspace.yaml", "-h", "127.0.0.1", "-p", str(self.port))

    def stop(self) -> None:
        stop_processes([process for _name, process in self.processes], grace_seconds=20)

    def logs(self) -> str:
        return "\n".join(
            f"--- {name} (last lines) ---\n" + "\n".join((self.root / f"{name}.log").read_text().splitlines()[-30:])
            for name, _ in self.processes
        )

    def check_alive(self) -> None:
        for name, process in self.processes:
            if process.poll() is not None:
                pytest.fail(f"{name} exited with {process.returncode}\n{self.logs()}")

    def graphql(self, query: str, variables: dict | None = None) -> dict:
        request = urllib.request.Request(
            f"http://127.0.0.1:{self.port}/graphql",
            data=json.dumps({"query": query, "variables": variables or {}}).encode(),
            headers={"Content-Type": "application/json"},
        )
        with urllib.request.urlopen(request, timeout=60) as response:
            body = json.loads(response.read())
        assert "errors" not in body, body["errors"]
        return body["data"]

    def wait_for_repository(self, deadline: float) -> dict:
        """The repository selector of the project's code location, once the webserver serves it."""
        query = """{ repositoriesOrError { __typename ... on RepositoryConnection {
            nodes { name location { name } } } ... on PythonError { message } } }"""
        while time.monotonic() < deadline:
            self.check_alive()
            try:
                nodes = self.graphql(query)["repositoriesOrError"].get("nodes") or []
            except (urllib.error.URLError, ConnectionError):
                nodes = []
            if nodes:
                return {"repositoryLocationName": nodes[0]["location"]["name"], "repositoryName": nodes[0]["name"]}
            time.sleep(1)
        pytest.fail(f"the webserver did not serve the code location in time\n{self.logs()}")

    def wait_for_runs(self, instance: dg.DagsterInstance, tags: dict, count: int, deadline: float) -> list:
        """The ``count`` runs with ``tags``, once all succeeded; fails at the first failed run."""
        while time.monotonic() < deadline:
            self.check_alive()
            runs = instance.get_runs(filters=dg.RunsFilter(tags=tags))
            failed = [run for run in runs if run.status == dg.DagsterRunStatus.FAILURE]
            if failed:
                errors = [
                    entry.message
                    for run in failed
                    for entry in instance.all_logs(run.run_id)
                    if entry.level >= 40  # logging.ERROR
                ]
                pytest.fail(f"runs failed: {[r.run_id for r in failed]}\n" + "\n".join(errors) + "\n" + self.logs())
            succeeded = [run for run in runs if run.status == dg.DagsterRunStatus.SUCCESS]
            if len(succeeded) >= count:
                return succeeded
            time.sleep(1)
        statuses = [(run.tags.get("dagster/partition"), run.status.value) for run in instance.get_runs(
            filters=dg.RunsFilter(tags=tags))]  # fmt: skip
        pytest.fail(f"{count} runs with {tags} did not all succeed in time: {statuses}\n{self.logs()}")


@pytest.fixture
def node(tmp_path, tiny_model_store):
    started = DagsterNode(tmp_path, tiny_model_store)
    try:
        yield started
    finally:
        started.stop()


@pytest.fixture
def node_instance(node):
    with dg.DagsterInstance.from_config(str(node.home)) as instance:
        yield instance


LAUNCH_BACKFILL = """
mutation Launch($params: LaunchBackfillParams!) {
  launchPartitionBackfill(backfillParams: $params) {
    __typename
    ... on LaunchBackfillSuccess { backfillId launchedRunIds }
    ... on Error { message }
  }
}
"""


def test_a_backfill_of_every_style_launched_from_the_webserver_makes_every_image(node, node_instance):
    deadline = time.monotonic() + TIMEOUT_SECONDS
    # What a SIGKILLed `dagster job execute` of Banksy leaves: a run nothing will ever see end.
    # It must not hold back the backfill's Banksy run.
    node_instance.add_run(
        dg.DagsterRun(job_name=GENERATE_JOB, status=dg.DagsterRunStatus.STARTED, tags={"dagster/partition": "Banksy"})
    )
    node.start_webserver()
    node.start_daemon()
    repository = node.wait_for_repository(deadline)
    launched = node.graphql(
        LAUNCH_BACKFILL,
        {
            "params": {
                "selector": {"repositorySelector": repository, "partitionSetName": f"{GENERATE_JOB}_partition_set"},
                "allPartitions": True,
            }
        },
    )["launchPartitionBackfill"]
    assert launched["__typename"] == "LaunchBackfillSuccess", launched
    runs = node.wait_for_runs(node_instance, {"dagster/backfill": launched["backfillId"]}, len(STYLES), deadline)
    assert sorted(run.tags["dagster/partition"] for run in runs) == sorted(STYLES)
    for style in STYLES:
        assert all(path.is_file() for path in image_paths(node.grid, style, SUBJECTS)), style
    assert (node.grid.parent / "data" / "gallery" / "index.html").is_file()


def test_the_sensor_turned_on_runs_every_style_for_a_dropped_list(node, node_instance):
    deadline = time.monotonic() + TIMEOUT_SECONDS
    node.start_daemon()
    subprocess.run(
        [str(BIN / "dagster"), "sensor", "start", NEW_SUBJECT_LISTS, "-w", "workspace.yaml"],
        cwd=WORKTREE, env=node.env, check=True, capture_output=True,
    )  # fmt: skip
    sensor_runs = {"dagster/sensor_name": NEW_SUBJECT_LISTS}
    # The first tick finds the grid's list, which nobody has run yet.
    node.wait_for_runs(node_instance, sensor_runs, len(STYLES), deadline)
    (node.grid.parent / "subjects" / "new.txt").write_text("grace hopper\n")
    runs = node.wait_for_runs(node_instance, sensor_runs, 2 * len(STYLES), deadline)
    every_run = node_instance.get_runs(filters=dg.RunsFilter(tags=sensor_runs))  # whatever their status
    keys = [run.tags["dagster/run_key"] for run in every_run]
    assert len(keys) == len(set(keys)) == 2 * len(STYLES), "no run key launched twice"
    new_list_runs = [run for run in runs if run.tags["dagster/run_key"].startswith("new.txt:")]
    assert sorted(run.tags["dagster/partition"] for run in new_list_runs) == sorted(STYLES)
    for style in STYLES:
        assert all(path.is_file() for path in image_paths(node.grid, style, ["grace hopper", *SUBJECTS])), style


def _kill_the_run_making(node: DagsterNode, data: Path, style: str, deadline: float) -> None:
    """SIGKILL the run making ``style``'s images once its first image is written."""
    # The run making the images holds the style's lock, which names its process.
    lock = Path(node.env["SD_ASSETS_DEVICE_LOCKS"]) / work_lock_name("style", str(data), style)
    while not (list((data / "images").rglob("*.png")) if (data / "images").is_dir() else []):
        assert time.monotonic() < deadline, node.logs()
        node.check_alive()
        time.sleep(0.1)
    os.kill(int(lock.read_text()), signal.SIGKILL)


def test_a_run_killed_mid_style_is_run_again_by_the_daemon_and_makes_only_the_rest(node, node_instance):
    deadline = time.monotonic() + TIMEOUT_SECONDS
    subjects = [f"subject {i}" for i in range(40)]
    (node.grid.parent / "subjects" / "people.txt").write_text("\n".join(subjects) + "\n")
    node.grid.write_text(node.grid.read_text().replace("styles: [Banksy, Andy Warhol]", "styles: [Banksy]"))
    data = node.grid.parent / "data"
    node.start_daemon()
    subprocess.run(
        [str(BIN / "dagster"), "sensor", "start", NEW_SUBJECT_LISTS, "-w", "workspace.yaml"],
        cwd=WORKTREE, env=node.env, check=True, capture_output=True,
    )  # fmt: skip
    _kill_the_run_making(node, data, "Banksy", deadline)

    while time.monotonic() < deadline:
        runs = node_instance.get_runs()
        if any(run.status == dg.DagsterRunStatus.SUCCESS for run in runs):
            break
        time.sleep(1)
    runs = node_instance.get_runs()[::-1]  # oldest first
    assert [run.status for run in runs] == [dg.DagsterRunStatus.FAILURE, dg.DagsterRunStatus.SUCCESS], node.logs()
    killed, retry = runs
    assert retry.tags.get("dagster/retry_number") == "1" and retry.parent_run_id == killed.run_id
    paths = image_paths(node.grid, "Banksy", subjects)
    assert all(path.is_file() for path in paths) and len(list((data / "images").rglob("*.png"))) == len(paths)
    records = node_instance.fetch_materializations(dg.AssetKey("style_images"), limit=10).records
    made = {record.run_id: record.asset_materialization.metadata["generated"].value for record in records}
    assert 0 < len(paths) - made[retry.run_id] < len(paths), "the retry made only what the killed run had not"
    catalog = pq.read_table(data / "catalog" / "banksy.parquet")
    assert catalog.num_rows == len(paths) and set(catalog["run_id"].to_pylist()) == {killed.run_id, retry.run_id}


def test_a_run_of_a_backfill_filed_with_sd_assets_backfill_killed_mid_style_is_run_again(node, node_instance):
    # dagster job backfill marks its backfill complete once the runs are queued, and Dagster
    # retries no run of a complete backfill; this one stays open until its runs have ended.
    from dagster._core.execution.backfill import BulkActionStatus

    deadline = time.monotonic() + TIMEOUT_SECONDS
    subjects = [f"subject {i}" for i in range(40)]
    (node.grid.parent / "subjects" / "people.txt").write_text("\n".join(subjects) + "\n")
    data = node.grid.parent / "data"
    node.start_daemon()
    filed = subprocess.run(
        [str(BIN / "sd-assets"), "backfill", "--style", "Banksy"], cwd=WORKTREE, env=node.env, capture_output=True,
        text=True,
    )  # fmt: skip
    assert filed.returncode == 0, filed.stderr
    backfill_id = filed.stdout.strip()
    assert f"backfill {backfill_id} of 1 style (Banksy) filed in DAGSTER_HOME" in filed.stderr
    _kill_the_run_making(node, data, "Banksy", deadline)

    while time.monotonic() < deadline:
        backfill = node_instance.get_backfill(backfill_id)
        if backfill.status != BulkActionStatus.REQUESTED:
            break
        time.sleep(1)
    # Ended as failed, counting the dead run, after its retry made the rest.
    assert backfill.status == BulkActionStatus.COMPLETED_FAILED, node.logs()
    runs = node_instance.get_runs(filters=dg.RunsFilter(tags={"dagster/backfill": backfill_id}))[::-1]
    assert [run.status for run in runs] == [dg.DagsterRunStatus.FAILURE, dg.DagsterRunStatus.SUCCESS], node.logs()
    killed, retry = runs
    assert retry.tags.get("dagster/retry_number") == "1" and retry.parent_run_id == killed.run_id
    assert {run.tags["dagster/partition"] for run in runs} == {"Banksy"}
    paths = image_paths(node.grid, "Banksy", subjects)
    assert all(path.is_file() for path in paths) and len(list((data / "images").rglob("*.png"))) == len(paths)
    records = node_instance.fetch_materializations(dg.AssetKey("style_images"), limit=10).records
    made = {record.run_id: record.asset_materialization.metadata["generated"].value for record in records}
    assert 0 < len(paths) - made[retry.run_id] < len(paths), "the retry made only what the killed run had not"
    # The daemon's runs are the whole job: they observe grid_inputs first.
    [observation] = node_instance.fetch_observations(dg.AssetKey("grid_inputs"), limit=1).records
    assert observation.run_id in {killed.run_id, retry.run_id}
    assert "observed_by" not in observation.asset_observation.metadata


def test_a_queued_run_of_a_style_renamed_before_it_starts_says_to_reload_and_backfill(node, node_instance):
    # Queued with `dagster job launch` while no daemon runs; the grid's style renamed meanwhile. The run's
    # own process reads the new grid: the style is in neither it nor that process's partitions.
    deadline = time.monotonic() + TIMEOUT_SECONDS
    tags = json.dumps({"dagster/partition": "Andy Warhol"})
    subprocess.run(
        [str(BIN / "dagster"), "job", "launch", "-j", GENERATE_JOB, "-w", "workspace.yaml", "--tags", tags],
        cwd=WORKTREE, env=node.env, check=True, capture_output=True,
    )  # fmt: skip
    [queued] = node_instance.get_runs()
    assert queued.status == dg.DagsterRunStatus.QUEUED
    node.grid.write_text(node.grid.read_text().replace("[Banksy, Andy Warhol]", "[Banksy, Andy warhol]"))
    node.start_daemon()
    while node_instance.get_run_by_id(queued.run_id).status != dg.DagsterRunStatus.FAILURE:
        assert time.monotonic() < deadline, node.logs()
        node.check_alive()
        time.sleep(1)
    failures = node_instance.all_logs(queued.run_id, of_type=dg.DagsterEventType.STEP_FAILURE)
    [failure] = [entry.dagster_event for entry in failures]
    assert failure.step_key == "model_weights", "refused before the model is fetched"
    assert (
        f"this run's style 'Andy Warhol' is not in the grid {node.grid} (did you mean 'Andy warhol'?), whose "
        "styles are ['Banksy', 'Andy warhol']: the grid's styles were edited after the code location loaded or "
        "after this run was queued (or, given with dagster job launch --tags, the style is misspelled); reload "
        "the code location (UI: Deployment > Reload) and backfill the styles that are new (UI: Jobs > "
        "generate_images > Partitions > Materialize, Missing, Launch backfill)"
    ) in str(failure.step_failure_data.error)
