"""Claiming one of a node's N devices for the length of a run, so parallel runs never share one.

A claim is an exclusive ``flock`` on ``<lock_dir>/device-<i>.lock``. The kernel drops a flock
when its process exits, however it exits, so a run that crashes or is killed while holding a
device frees it without any clean-up. The holder writes its pid into the file, for people. Lock folders must be on a node-local file system (flock
is not reliable over NFS), one folder per node.

The index says which device: ``cuda:<i>`` on a GPU node. On a CPU-only node a configured device
count still hands out indexes, which caps how many runs generate at once.
"""

from __future__ import annotations

import fcntl
import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from sd_assets.domain.errors import SdAssetsError

POLL_SECONDS = 0.5


@dataclass(frozen=True)
class DeviceClaim:
    """A device index held by this process until released (or until the process ends)."""

    index: int
    count: int
    lock_path: Path


def lock_path(lock_dir: Path, index: int) -> Path:
    return Path(lock_dir) / f"device-{index}.lock"


def _try_lock(path: Path) -> int | None:
    """An open descriptor holding an exclusive flock on ``path``, or None if another holds it."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        return None
    return fd


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
    lock_dir = Path(lock_dir)
    try:
        lock_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise SdAssetsError(f"cannot create the device lock folder {lock_dir}: {exc}") from None
    deadline = time.monotonic() + wait_seconds
    while True:
        for index in range(count):
            path = lock_path(lock_dir, index)
            try:
                fd = _try_lock(path)
            except OSError as exc:
                raise SdAssetsError(f"cannot lock {path}: {exc}") from None
            if fd is None:
                continue
            os.ftruncate(fd, 0)
            os.write(fd, f"{os.getpid()}\n".encode())
            try:
                yield DeviceClaim(index=index, count=count, lock_path=path)
            finally:
                os.close(fd)
            return
        if time.monotonic() >= deadline:
            raise SdAssetsError(
                f"all {count} devices stayed busy for {wait_seconds:.0f} s (locks in {lock_dir}); "
                f"set the 'gpu' pool limit to the device count ({count}) so runs queue in Dagster instead"
            )
        time.sleep(POLL_SECONDS)


def device_for_index(device: str, index: int) -> str:
    """The torch device of a claimed index: 'cuda' -> 'cuda:<index>'; 'cpu' stays 'cpu'."""
    return f"cuda:{index}" if device == "cuda" else device
