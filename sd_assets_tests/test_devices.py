"""Claiming devices on a node: one run per device, freed when a run ends, fails or is killed.

A CPU machine stands in for a GPU node with a simulated device count.
"""

from __future__ import annotations

import errno
import os
import re
import signal
import subprocess
import sys
import textwrap
import threading
from pathlib import Path

import dagster as dg
import pytest
import torch

from sd_assets.definitions import build_definitions
from sd_assets.domain.devices import claim_device
from sd_assets.domain.errors import SdAssetsError
from sd_assets.domain.node_locks import hold_lock
from sd_assets.orchestration.resources import GeneratorResource
from sd_assets_tests.helpers import materialize_style

WORKTREE = Path(__file__).resolve().parents[1]

HOLDER = textwrap.dedent(
    """
    import sys, time
    from pathlib import Path
    from sd_assets.domain.devices import claim_device

    with claim_device(Path(sys.argv[1]), int(sys.argv[2]), wait_seconds=0) as claim:
        print(claim.index, flush=True)
        time.sleep(600)
    """
)


def start_holder(lock_dir: Path, count: int) -> tuple[subprocess.Popen, int]:
    """Another process (another run) that claims a device and keeps it; returns it and its index."""
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLDER, str(lock_dir), str(count)],
        cwd=WORKTREE,
        stdout=subprocess.PIPE,
        text=True,
    )
    line = holder.stdout.readline()
    assert line.strip().isdigit(), f"the holder did not claim a device (exit {holder.poll()})"
    return holder, int(line)


def test_claims_take_the_lowest_free_device_and_give_it_back(tmp_path):
    with claim_device(tmp_path, 3) as first, claim_device(tmp_path, 3) as second:
        assert (first.index, second.index) == (0, 1)
        assert first.lock_path.read_text() == f"{os.getpid()}\n"
    with claim_device(tmp_path, 3) as again:
        assert again.index == 0


def test_when_every_device_is_busy_the_error_says_how_to_queue_instead(tmp_path):
    with claim_device(tmp_path, 1):
        with pytest.raises(SdAssetsError, match=r"all 1 devices stayed busy for 0 s .*set max_concurrent_runs in dagster.yaml"):
            with claim_device(tmp_path, 1, wait_seconds=0):
                pass


def test_a_failing_run_gives_its_device_back(tmp_path):
    with pytest.raises(RuntimeError):
        with claim_device(tmp_path, 1):
            raise RuntimeError("generation failed")
    with claim_device(tmp_path, 1, wait_seconds=0) as claim:
        assert claim.index == 0


def test_a_device_count_below_one_is_refused():
    with pytest.raises(SdAssetsError, match="device_count is 0; it must be at least 1"):
        with claim_device(Path("unused"), 0):
            pass


def test_the_device_variable_is_checked_as_the_definitions_load(grid_path):
    def generator_device(value: str) -> str:
        defs = build_definitions({"SD_ASSETS_GRID": str(grid_path), "SD_ASSETS_DEVICE": value})
        return defs.resources["generator"].device

    assert [generator_device(value) for value in ("cuda:1", "cpu", "")] == ["cuda:1", "cpu", "auto"]
    for bad in ("gpu", "cpu\n", "cuda:\u0661", "cuda:"):
        expected = f"SD_ASSETS_DEVICE={bad!r}: expected 'auto', 'cpu', 'cuda' or 'cuda:<index>'"
        with pytest.raises(SdAssetsError, match=re.escape(expected)):
            generator_device(bad)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error on a machine without a GPU")
def test_a_run_asking_for_a_gpu_on_a_node_without_one_names_the_setting(tmp_path):
    with pytest.raises(SdAssetsError) as raised:
        with GeneratorResource(device="cuda", device_lock_dir=str(tmp_path)).claim_device():
            pass
    assert str(raised.value) == (
        "device 'cuda' asked for, but no CUDA GPU is visible to this process; set the generator's device "
        "(SD_ASSETS_DEVICE) to auto, which takes a GPU if one is seen, or cpu"
    )


def test_another_process_gets_another_device(tmp_path):
    with claim_device(tmp_path, 2) as mine:
        holder, index = start_holder(tmp_path, 2)
        try:
            assert (mine.index, index) == (0, 1)
        finally:
            holder.kill()
            holder.wait()


def test_a_killed_run_frees_its_device(tmp_path):
    holder, index = start_holder(tmp_path, 1)
    try:
        assert index == 0
        with pytest.raises(SdAssetsError, match="all 1 devices stayed busy"):
            with claim_device(tmp_path, 1, wait_seconds=0):
                pass
    finally:
        holder.send_signal(signal.SIGKILL)
        assert holder.wait() == -signal.SIGKILL
    with claim_device(tmp_path, 1, wait_seconds=0) as claim:
        assert claim.index == 0


def test_the_generator_resource_maps_claims_to_devices(tmp_path):
    simulated = GeneratorResource(device="cpu", device_count=2, device_lock_dir=str(tmp_path))
    with simulated.claim_device() as first, simulated.claim_device() as second:
        assert (first, second) == (("cpu", 0), ("cpu", 1))
    with GeneratorResource(device="cpu", device_lock_dir=str(tmp_path)).claim_device() as unclaimed:
        assert unclaimed == ("cpu", None)


def test_a_style_run_claims_a_free_device_and_reports_it(grid_path, instance, tmp_path):
    locks = tmp_path / "locks"
    with claim_device(locks, 2):
        result = materialize_style(
            grid_path, "Banksy", instance, SD_ASSETS_DEVICE_COUNT="2", SD_ASSETS_DEVICE_LOCKS=str(locks)
        )
    images = next(
        m for m in result.get_asset_materialization_events() if m.asset_key == dg.AssetKey("style_images")
    )
    assert images.materialization.metadata["device_index"].value == 1
    assert images.materialization.metadata["generated"].value == 4
    with claim_device(locks, 2, wait_seconds=0) as first, claim_device(locks, 2, wait_seconds=0) as second:
        assert (first.index, second.index) == (0, 1), "the run gave its device back"


WORK_HOLDER = textwrap.dedent(
    """
    import sys, time
    from pathlib import Path
    from sd_assets.domain.node_locks import hold_lock

    with hold_lock(Path(sys.argv[1]), "style-x.lock"):
        print("held", flush=True)
        time.sleep(600)
    """
)


def test_a_work_lock_waits_for_its_holder_and_comes_free_when_the_holder_is_killed(tmp_path):
    holder = subprocess.Popen(
        [sys.executable, "-c", WORK_HOLDER, str(tmp_path)], cwd=WORKTREE, stdout=subprocess.PIPE, text=True
    )
    assert holder.stdout.readline() == "held\n"
    waited: list[str] = []
    killer = threading.Timer(1.0, holder.kill)
    killer.start()
    try:
        with hold_lock(tmp_path, "style-x.lock", waited.append) as path:
            assert holder.poll() == -signal.SIGKILL, "the lock was taken while its holder lived"
            assert path.read_text() == f"{os.getpid()}\n"
    finally:
        killer.cancel()
        holder.kill()
        holder.wait()
    assert waited == [f"waiting for process {holder.pid}, which holds {tmp_path / 'style-x.lock'}"]


def test_a_lock_file_names_only_its_holder_whatever_a_longer_pid_left_there(tmp_path):
    (tmp_path / "style-x.lock").write_text("99999999\n")
    with hold_lock(tmp_path, "style-x.lock") as path:
        assert path.read_text() == f"{os.getpid()}\n"


def test_a_link_planted_under_a_lock_files_name_is_refused_and_what_it_points_to_kept(tmp_path):
    # The default folder is in /tmp, where anyone on the node can plant one.
    kept = tmp_path / "kept.txt"
    kept.write_text("precious\n")
    (tmp_path / "locks").mkdir()
    (tmp_path / "locks" / "style-x.lock").symlink_to(kept)
    with pytest.raises(SdAssetsError, match=rf"^the lock file {tmp_path}/locks/style-x.lock is a symbolic link "
                       rf"\(to {kept}\), which no lock file is; remove it"):  # fmt: skip
        with hold_lock(tmp_path / "locks", "style-x.lock"):
            pass
    assert kept.read_text() == "precious\n"


def test_a_lock_taken_on_a_disk_too_full_for_its_pid_is_held_and_freed_as_any_other(tmp_path, monkeypatch):
    from sd_assets.domain import node_locks

    def full_disk(fd, data):
        raise OSError(errno.ENOSPC, "No space left on device")

    taker = "import fcntl, os, sys; fcntl.flock(os.open(sys.argv[1], os.O_RDWR), fcntl.LOCK_EX | fcntl.LOCK_NB)"
    with monkeypatch.context() as patched:
        patched.setattr(node_locks.os, "write", full_disk)
        fd = node_locks.try_lock(tmp_path / "style-x.lock")
    assert fd is not None and (tmp_path / "style-x.lock").read_text() == ""
    other = subprocess.run(
        [sys.executable, "-c", taker, str(tmp_path / "style-x.lock")], capture_output=True, text=True, check=False
    )
    assert "BlockingIOError" in other.stderr, "held: another process cannot take it"
    os.close(fd)
    again = node_locks.try_lock(tmp_path / "style-x.lock")
    assert again is not None, "freed when its holder lets go"
    os.close(again)


def test_a_lock_folder_that_is_a_file_is_named_as_one(tmp_path):
    from sd_assets.domain.node_locks import make_lock_dir

    (tmp_path / "locks").write_text("not a folder")
    with pytest.raises(SdAssetsError, match=r"^the lock folder .*/locks is a file, not a folder; set "
                       r"SD_ASSETS_DEVICE_LOCKS to a folder$"):  # fmt: skip
        make_lock_dir(tmp_path / "locks")
    assert make_lock_dir(tmp_path / "new" / "locks").is_dir()
