"""Claiming one of a node's N devices for the length of a run, so parallel runs never share one.

A claim is a node lock (``node_locks``) on ``<lock_dir>/device-<i>.lock``: a run that crashes
or is killed while holding a device frees it without any clean-up.

The index says which device: ``cuda:<i>`` on a GPU node. On a CPU-only node a configured device
count still hands out indexes, which caps how many runs generate at once.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from sd_assets.domain.errors import SdAssetsError
from sd_assets.domain.node_locks import POLL_SECONDS, make_lock_dir, try_lock


@dataclass(frozen=True)
class DeviceClaim:
    """A device index held by this process until released (or until the process ends)."""

    index: int
    lock_path: Path


def lock_path(lock_dir: Path, index: int) -> Path:
    return Path(lock_dir) / f"device-{index}.lock"


@contextmanager
def claim_device(lock_dir: Path, count: int, wait_seconds: float = 600.0) -> Iterator[DeviceClaim]:
    """Hold the lowest free device index among ``count`` for the ``with`` block.

    Waits up to ``wait_seconds`` for one to come free.

    Raises:
        SdAssetsError: ``count`` is below 1, the lock folder cannot be used, or every device
            stayed busy for ``wait_seconds``.
    """
    if count < 1:
        raise SdAssetsError(f"device_count is {count}; it must be at least 1 (the number of GPUs on this node)")
    lock_dir = make_lock_dir(lock_dir)
    deadline = time.monotonic() + wait_seconds
    while True:
        for index in range(count):
            path = lock_path(lock_dir, index)
            fd = try_lock(path)
            if fd is None:
                continue
            try:
                yield DeviceClaim(index=index, lock_path=path)
            finally:
                os.close(fd)
            return
        if time.monotonic() >= deadline:
            raise SdAssetsError(
                f"all {count} devices stayed busy for {wait_seconds:.0f} s (locks in {lock_dir}); "
                f"set max_concurrent_runs in dagster.yaml (or the 'gpu' pool limit) to the device count "
                f"({count}) so runs queue in Dagster instead"
            )
        time.sleep(POLL_SECONDS)


def device_for_index(device: str, index: int) -> str:
    """The torch device of a claimed index: 'cuda' -> 'cuda:<index>'; 'cpu' stays 'cpu'."""
    return f"cuda:{index}" if device == "cuda" else device


def cuda_index(device: str) -> int:
    """The index of a CUDA device: 'cuda:1' -> 1, 'cuda' -> 0 (torch's current device)."""
    return int(device.partition(":")[2] or 0)
