"""The artifact store: where images, gallery pages, catalogs and model weights live.

Owns one small interface with a local-folder backend (the S3 backend is ``s3_store``). Keys are
'/'-separated relative paths (``images/ab/abcd....png``); every write is all-or-nothing, so a
reader never sees half a file.
"""

from __future__ import annotations

import errno
import hashlib
import os
import secrets
import shutil
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, NamedTuple

from sd_assets.domain.errors import StoreError, shown_name


def new_temporary_file(folder: Path, name: str) -> tuple[int, Path]:
    """A new empty hidden file in ``folder`` for ``name``'s next content, open for writing.

    It gets the mode ``open()`` would give it (0666 less the umask), not mkstemp's 0600: a
    gallery served by a web server, or a model cache another user's workers read, must be
    readable by others.
    """
    while True:
        path = folder / f".{name}.{secrets.token_hex(6)}.tmp"
        try:
            return os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666), path
        except FileExistsError:
            continue


def is_temporary_file(name: str) -> bool:
    """Whether a file named ``name`` is one ``new_temporary_file`` makes: a write in flight, or one
    whose process was killed before it renamed it into place. Never an object of the store."""
    return name.startswith(".") and name.endswith(".tmp")


def temporary_file_target(name: str) -> str | None:
    """The name whose next content the file named ``name`` was made for (``.<name>.<hex>.tmp``,
    by ``new_temporary_file``); None for any other file."""
    return name[1:-4].rpartition(".")[0] if is_temporary_file(name) else None


class ObjectVersion(NamedTuple):
    """An object's size and a tag that changes with every write (mtime on disk, ETag in S3)."""

    size: int
    tag: str

    def __str__(self) -> str:
        return f"{self.size}:{self.tag}"


def _check_key(key: str) -> str:
    """A valid key: relative, no '.' or '..' parts; a trailing '/' names a folder-like prefix."""
    parts = key.removesuffix("/").split("/")
    if not key or key.startswith("/") or any(part in ("", ".", "..") for part in parts):
        raise StoreError(f"invalid store key {key!r}: use a relative path without '.' or '..' parts")
    return key


class ArtifactStore(ABC):
    """A flat namespace of keys holding bytes."""

    url: str

    @abstractmethod
    def exists(self, key: str) -> bool: ...

    @abstractmethod
    def read_bytes(self, key: str) -> bytes: ...

    def read_version(self, key: str) -> tuple[bytes, str | None]:
        """The object's bytes and the version tag of exactly those bytes (as ``versions`` gives
        tags), or None where the backend has no tags."""
        return self.read_bytes(key), None

    @abstractmethod
    def write_bytes(self, key: str, data: bytes) -> None:
        """Write atomically: readers see the old object or the whole new one."""

    @abstractmethod
    def list_keys(self, prefix: str) -> Iterator[str]:
        """Every key under ``prefix`` (a folder-like prefix ending in '/', or '')."""

    @abstractmethod
    def versions(self, prefix: str) -> dict[str, ObjectVersion]:
        """Size and version tag of every key under ``prefix``, from one listing.

        The tag changes whenever the object is rewritten, so a file read and found sound (a
        verified model file, a parsed subject list) can be trusted again without reading it
        while its version is the same.
        """

    @abstractmethod
    def sha256(self, key: str) -> str:
        """The hex sha256 of the object's bytes, read as a stream (model weights are gigabytes)."""

    @abstractmethod
    def delete(self, key: str) -> None: ...

    @abstractmethod
    def download_file(self, key: str, destination: Path) -> None:
        """Copy one object to a local file, atomically."""

    @abstractmethod
    def upload_file(self, source: Path, key: str) -> None:
        """Copy one local file into the store, atomically."""

    def existing(self, keys: list[str]) -> set[str]:
        """The subset of ``keys`` that exist (backends may answer this with one listing)."""
        return {key for key in keys if self.exists(key)}

    def local_path(self, key: str) -> Path | None:
        """The object's path on this machine's disk, when the store is a local folder."""
        return None

    def discard_partial_writes(self, keys: list[str]) -> int:
        """Remove what writes of ``keys`` killed half-way left beside them; how many. Only for keys
        no live process writes (the caller holds their lock). An S3 object is written whole, or
        not at all: nothing is left."""
        return 0

    @abstractmethod
    def location(self, key: str = "") -> str:
        """Where a person finds ``key``: a file path or an s3:// URL."""

    def endpoint(self) -> str:
        """The service that holds the store where its location does not name it: an S3 endpoint
        (``AWS_ENDPOINT_URL``, or AWS's for the region); '' for a folder."""
        return ""

    def read_text(self, key: str) -> str:
        return self.read_bytes(key).decode("utf-8")

    def write_text(self, key: str, text: str) -> None:
        self.write_bytes(key, text.encode("utf-8"))


def sha256_file(path: Path) -> str:
    """The hex sha256 of a file, read in 8 MiB chunks (model weights are gigabytes)."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(8 * 1024 * 1024):
            digest.update(chunk)
    return digest.hexdigest()


def flush_to_disk(path: Path) -> None:
    """Make ``path``'s content durable before it is renamed into place. Without it a file system
    may journal the rename before the data, and a power cut leave an image that exists, empty,
    which every later run would take for made."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextmanager
def replacing(path: Path, of: str = "") -> Iterator[Path]:
    """A temporary file beside ``path``, renamed over it when the block ends (readers never see
    half a file) and removed if the block fails.

    Raises:
        StoreError: what the file system refused (a read-only or full disk, a file where a
            folder should be), with the path (and ``of``, where it is a copy: ``s3://...``).
    """
    tmp: Path | None = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = new_temporary_file(path.parent, path.name)
        os.close(fd)
        yield tmp
        flush_to_disk(tmp)
        os.replace(tmp, path)
    except OSError as exc:
        copy_of = f" (a copy of {of})" if of else ""
        raise StoreError(f"cannot write {path}{copy_of}: {_why_not_written(path, exc)}") from None
    finally:
        if tmp is not None:
            tmp.unlink(missing_ok=True)


def _why_not_written(path: Path, exc: OSError) -> str:
    """The reason in the user's terms: what is in the way, or the OS's words without the
    temporary file beside ``path`` that they would name."""
    if exc.errno == errno.EISDIR and os.path.isdir(path):
        return "a folder is there"
    if exc.errno in (errno.EEXIST, errno.ENOTDIR) and (in_the_way := _file_in_the_way(path.parent)):
        return f"{in_the_way} is a file, not a folder"
    named = exc.filename if isinstance(exc.filename, str) else ""
    twin = os.path.basename(named).startswith(f".{path.name}.") and named.endswith(".tmp")
    if exc.strerror and (twin or named in {str(path), *map(str, path.parents)}):
        return exc.strerror  # a full disk, a read-only or refused folder, a name too long: on the path named
    return str(exc)  # another file's trouble (the source of a copy), which it names


def _file_in_the_way(folder: Path) -> Path | None:
    """The file where ``folder``, or a folder above it, should be: the first of them that exists,
    if it is not a folder (None where it is one, or where none can be looked at)."""
    existing = next((candidate for candidate in (folder, *folder.parents) if os.path.exists(candidate)), None)
    return existing if existing is not None and not os.path.isdir(existing) else None


def atomic_write(path: Path, data: bytes) -> None:
    """Write ``path`` whole or not at all: a reader, or a process killed half-way, never leaves half a file."""
    with replacing(path) as tmp:
        tmp.write_bytes(data)


def _atomic_copy(source: Path, destination: Path) -> None:
    with replacing(destination) as tmp:
        shutil.copyfile(source, tmp)


class LocalStore(ArtifactStore):
    """A folder on this machine."""

    def __init__(self, root: str | Path):
        self.root = Path(root).expanduser().resolve()
        self.url = str(self.root)
        try:
            self.url.encode()
        except UnicodeEncodeError:  # a folder name in another encoding (unpacked from an old archive)
            shown = shown_name(self.url)
            raise StoreError(
                f"storage {shown}: the path is not UTF-8 text, which every image's provenance and catalog row "
                "record; rename the folder, or put the store in another one (storage: in the grid, or "
                "SD_ASSETS_STORAGE)"
            ) from None
        # A file where the store's folder, or one above it, should be: say so now, by name,
        # rather than as whichever OS error the first read or write meets. (A folder on the way
        # that may not be looked into counts as absent: the first write says what is wrong.)
        in_the_way = _file_in_the_way(self.root)
        if in_the_way is not None:
            raise StoreError(f"storage {self.root}: {in_the_way} is a file, not a folder")

    def _path(self, key: str) -> Path:
        return self.root / _check_key(key)

    def exists(self, key: str) -> bool:
        return self._path(key).is_file()

    def read_bytes(self, key: str) -> bytes:
        try:
            return self._path(key).read_bytes()
        except (FileNotFoundError, NotADirectoryError):
            raise StoreError(f"{self._path(key)} does not exist") from None
        except OSError as exc:
            raise StoreError(f"cannot read {self._path(key)}: {exc.strerror or exc}") from None

    def write_bytes(self, key: str, data: bytes) -> None:
        atomic_write(self._path(key), data)

    def list_keys(self, prefix: str) -> Iterator[str]:
        base = self._path(prefix) if prefix else self.root
        if not base.is_dir():
            return
        folders = [base]
        while folders:
            try:
                entries = list(os.scandir(folders.pop()))
            except OSError:  # removed since it was listed, or not ours to look into: it holds no key we can read
                continue
            for entry in entries:
                if entry.is_dir(follow_symlinks=False):
                    folders.append(Path(entry.path))
                # Files only, as ``exists`` sees them (a link to one counts): a named pipe called
                # x.png, or a socket, is no object, and reading one would wait forever.
                elif entry.is_file() and not is_temporary_file(entry.name):
                    yield Path(entry.path).relative_to(self.root).as_posix()

    def versions(self, prefix: str) -> dict[str, ObjectVersion]:
        found = {}
        for key in self.list_keys(prefix):
            try:
                stat = self._path(key).stat()
            except FileNotFoundError:  # deleted since it was listed (a pending batch another run merged)
                continue
            found[key] = ObjectVersion(stat.st_size, str(stat.st_mtime_ns))
        return found

    def sha256(self, key: str) -> str:
        return sha256_file(self._path(key))

    def delete(self, key: str) -> None:
        try:
            self._path(key).unlink(missing_ok=True)
        except NotADirectoryError:
            pass  # a file where a folder of the key would be: the key holds nothing to delete
        except OSError as exc:
            raise StoreError(f"cannot delete {self._path(key)}: {exc.strerror or exc}") from None

    def download_file(self, key: str, destination: Path) -> None:
        _atomic_copy(self._path(key), Path(destination))

    def upload_file(self, source: Path, key: str) -> None:
        _atomic_copy(Path(source), self._path(key))

    def local_path(self, key: str) -> Path | None:
        return self._path(key)

    def discard_partial_writes(self, keys: list[str]) -> int:
        """The temporary files (``.<name>.<hex>.tmp``, see ``replacing``) of ``keys``' writes
        whose processes were killed before they renamed them: a PNG's worth each, otherwise kept
        for good. One listing a folder."""
        names_by_folder: dict[Path, set[str]] = {}
        for key in keys:
            path = self._path(key)
            names_by_folder.setdefault(path.parent, set()).add(path.name)
        removed = 0
        for folder, names in names_by_folder.items():
            try:
                entries = list(os.scandir(folder))
            except OSError:  # no such folder yet: nothing was written there
                continue
            for entry in entries:
                if temporary_file_target(entry.name) in names:
                    Path(entry.path).unlink(missing_ok=True)
                    removed += 1
        return removed

    def location(self, key: str = "") -> str:
        return str(self._path(key)) if key else str(self.root)


def check_storage_url(url: str) -> None:
    """Refuse, as ``open_store`` would, a storage URL whose form is wrong, without opening the store.

    Raises:
        StoreError: an S3 URL without a bucket, with a bucket name S3 refuses or a prefix with an
            empty, '.' or '..' part; a scheme other than s3://.
    """
    if url.startswith("s3://"):
        from sd_assets.domain.s3_store import parse_s3_url

        parse_s3_url(url)
    elif url.lower().startswith("s3:"):  # s3:/bucket, S3://bucket: not a folder named "s3:"
        raise StoreError(f"storage {url!r}: an S3 store is written s3://bucket/prefix")
    elif "://" in url:
        raise StoreError(f"storage {url!r}: unsupported scheme; use a local folder path or s3://bucket/prefix")


def open_store(url: str, s3_client: Callable[[], Any] | None = None) -> ArtifactStore:
    """The store named by ``url``: a local folder path, or ``s3://bucket/prefix``.

    ``s3_client`` makes the boto3 S3 client for s3:// URLs; by default boto3's own, configured
    from the standard AWS environment variables.
    """
    if url.startswith("s3://"):
        from sd_assets.domain.s3_store import S3Store, client_config

        if s3_client is None:
            import boto3

            return S3Store(url, lambda: boto3.session.Session().client("s3", config=client_config()))
        return S3Store(url, s3_client)
    check_storage_url(url)
    return LocalStore(url)
