"""Locks that one node's processes share, and that die with the process holding them.

A lock is an exclusive ``flock`` on a file in a node-local folder. The kernel drops a flock
when its process exits, however it exits, so a run that crashes or is killed while holding one
frees it without any clean-up, and the next run goes on where it stopped. The holder writes its
pid into the file, for people. The folder must be on a node-local file system (flock is not
reliable over NFS).

Device claims (``devices``) are built on these; so are the locks that keep two runs on a node
from doing the same work at once: making a style's images, filling the model cache.
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import os
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from sd_assets.domain.errors import SdAssetsError

POLL_SECONDS = 0.5


def try_lock(path: Path) -> int | None:
    """An open descriptor holding an exclusive flock on ``path`` with this pid written in it, or
    None if another process holds it.

    Raises:
        SdAssetsError: the file cannot be opened or locked.
    """
    try:
        # Never through a link: the folder may be shared (/tmp by default), and a link planted
        # there under a lock's name would have this process empty the file it points to.
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o666)
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise SdAssetsError(
                f"the lock file {path} is a symbolic link (to {os.readlink(path)}), which no lock file is; "
                "remove it, and see who else writes to that folder"
            ) from None
        raise SdAssetsError(f"cannot open the lock file {path}: {exc}") from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        return None
    except OSError as exc:
        os.close(fd)
        raise SdAssetsError(f"cannot lock {path}: {exc}") from None
    try:
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
    except OSError:
        # The pid is for people; the flock is the lock. A full disk that refuses a few bytes
        # leaves the file empty ("process unknown" to a waiter), and the lock held all the same.
        pass
    return fd


def make_lock_dir(lock_dir: Path) -> Path:
    lock_dir = Path(lock_dir)
    try:
        lock_dir.mkdir(parents=True, exist_ok=True)
    except FileExistsError:  # a file where the folder should be (mkdir's own words: "File exists")
        raise SdAssetsError(
            f"the lock folder {lock_dir} is a file, not a folder; set SD_ASSETS_DEVICE_LOCKS to a folder"
        ) from None
    except OSError as exc:
        raise SdAssetsError(f"cannot create the lock folder {lock_dir}: {exc}") from None
    return lock_dir


def work_lock_name(kind: str, *identity: str) -> str:
    """A lock file name for one piece of work: '<kind>-<sha256 of identity, 16 hex>.lock' ('style-…', 'model-…')."""
    digest = hashlib.sha256("\0".join(identity).encode("utf-8")).hexdigest()[:16]
    return f"{kind}-{digest}.lock"


@contextmanager
def hold_lock(lock_dir: Path, name: str, on_wait: Callable[[str], None] | None = None) -> Iterator[Path]:
    """Hold the lock ``<lock_dir>/<name>`` for the ``with`` block, waiting while another process holds it.

    There is no time limit: the holder is a live process doing the same work (a dead one has
    released the lock), and whatever it finishes, the caller need not do. ``on_wait`` is told
    once, with the holder's pid, when the lock is busy.

    Raises:
        SdAssetsError: the lock folder or file cannot be used.
    """
    path = make_lock_dir(lock_dir) / name
    fd = try_lock(path)
    if fd is None and on_wait is not None:
        try:
            holder = path.read_text().strip() or "unknown"
        except OSError:
            holder = "unknown"
        on_wait(f"waiting for process {holder}, which holds {path}")
    while fd is None:
        time.sleep(POLL_SECONDS)
        fd = try_lock(path)
    try:
        yield path
    finally:
        os.close(fd)
