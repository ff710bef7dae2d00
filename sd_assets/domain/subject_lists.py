"""Where subject lists live, reading them without letting one bad list stop the others, and
noticing which lists are new or changed since the last look.

Lists live in the grid's ``subjects_dir`` when the artifact store is a local folder, and under
the store's ``subjects/`` prefix otherwise (an S3 bucket a node can see but not mount). Either
way a list is a ``*.txt`` file; see ``grid.parse_subject_list`` for what a valid one holds.

Noticing changes is built for big folders: a listing gives each file's size and modification
time, and only files whose (size, mtime) differ from the remembered state are read and hashed.
The remembered state is a small compressed string, so it fits in a Dagster sensor cursor; it
names the store the lists were last run into, so that runs into another store start afresh.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import threading
import time
import zlib
from abc import ABC, abstractmethod
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from sd_assets.domain.errors import GridError, SdAssetsError, shown_name
from sd_assets.domain.grid import GridConfig, SubjectList, parse_subject_list
from sd_assets.domain.store import ArtifactStore

STORE_PREFIX = "subjects/"
LIST_SUFFIX = ".txt"
# A file modified this recently may be modified again within the file system's timestamp
# granularity, keeping size and mtime: it is not trusted as unchanged until it has settled.
SETTLE_NS = 2_000_000_000
SHORT_HASH = 16
_CURSOR_FORMAT = "z3:"
_CURSOR_FORMAT_WITHOUT_STORE = "z2:"
# Lists read at once: on S3 each read is a request.
READ_THREADS = 8


@dataclass(frozen=True)
class ListedFile:
    """One list as a listing shows it.

    A folder gives ``mtime_ns``; a store gives ``version``, a tag that changes with every write
    of the object (an S3 ETag).
    """

    name: str
    size: int
    mtime_ns: int | None
    version: str | None = None


class SubjectSource(ABC):
    """A place holding subject lists."""

    location: str
    empty_hint: str = ""

    @abstractmethod
    def listing(self) -> list[ListedFile]:
        """Every list, sorted by name, without reading any of them."""

    @abstractmethod
    def read(self, name: str) -> bytes: ...


def _is_list_name(name: str) -> bool:
    """Whether a file is a subject list: ``.txt`` in any case (``NOTES.TXT``, as some editors save it)."""
    return name.lower().endswith(LIST_SUFFIX)


class FolderSource(SubjectSource):
    """``*.txt`` files directly in a local folder."""

    def __init__(self, folder: Path, named_by: str = "the grid's 'subjects_dir'"):
        self.folder = Path(folder)
        self.location = str(self.folder)
        self.named_by = named_by  # where the folder's name comes from, for the errors

    def listing(self) -> list[ListedFile]:
        try:
            entries = list(os.scandir(self.folder))
        except FileNotFoundError:
            raise GridError(f"subject lists folder {self.folder} does not exist ({self.named_by})") from None
        except NotADirectoryError:
            raise GridError(
                f"subject lists folder {self.folder} is a file ({self.named_by} names the folder of *.txt lists)"
            ) from None
        except OSError as exc:
            raise GridError(f"cannot list the subject lists folder {self.folder} ({self.named_by}): {exc}") from None
        listed = []
        for entry in entries:
            if not _is_list_name(entry.name):
                continue
            # A link whose list is not there (a share not mounted) is listed, to be skipped by name
            # when read, rather than lose its subjects without a word.
            broken_link = entry.is_symlink() and not os.path.exists(entry.path)
            if entry.is_file() or broken_link:
                try:
                    stat = entry.stat(follow_symlinks=not broken_link)
                except FileNotFoundError:  # deleted since the folder was listed: not a list any more
                    continue
                listed.append(ListedFile(entry.name, stat.st_size, stat.st_mtime_ns))
        return sorted(listed, key=lambda f: f.name)

    def read(self, name: str) -> bytes:
        path = self.folder / name
        try:
            return path.read_bytes()
        except FileNotFoundError:
            if path.is_symlink():
                raise GridError(f"it links to {os.readlink(path)}, which is not there") from None
            raise


class StoreSource(SubjectSource):
    """``*.txt`` keys directly under a prefix of an artifact store.

    One listing gives every list's size and version tag (an S3 ETag, new with every write), so
    a look reads only the lists written since the last one; content hashes decide what changed.
    A list read once in this process is not fetched again while its tag is the same: every
    step of a run reads the lists, and each fetch is a request.
    """

    # (location, version tag) -> content; emptied when it would pass _CACHE_BYTES.
    _cache: dict[tuple[str, str], bytes] = {}
    _cache_size = 0
    _cache_lock = threading.Lock()
    _CACHE_BYTES = 64 * 1024 * 1024

    def __init__(self, store: ArtifactStore, prefix: str = STORE_PREFIX):
        self.store = store
        self.prefix = prefix
        self.location = store.location(prefix)
        self.empty_hint = (
            f"; with this storage the subject lists live in the store: copy them there, "
            f"for example `aws s3 cp subjects/ {self.location} --recursive`"
        )
        self._versions: dict[str, str] = {}

    def listing(self) -> list[ListedFile]:
        listed = [
            ListedFile(key[len(self.prefix) :], version.size, None, version.tag)
            for key, version in self.store.versions(self.prefix).items()
            if _is_list_name(key) and "/" not in key[len(self.prefix) :]
        ]
        self._versions = {f.name: f.version for f in listed if f.version}
        return sorted(listed, key=lambda f: f.name)

    def read(self, name: str) -> bytes:
        listed = self._versions.get(name)
        cache_key = (self.store.location(self.prefix + name), listed or "")
        cls = type(self)
        with cls._cache_lock:
            if listed and cache_key in cls._cache:
                return cls._cache[cache_key]
        data, read = self.store.read_version(self.prefix + name)
        # Only bytes known to be the listed version: a list rewritten since the listing (and
        # perhaps put back later, with the old tag again) must not be filed under the old tag.
        if listed and read == listed:
            with cls._cache_lock:
                if cls._cache_size + len(data) > cls._CACHE_BYTES:
                    cls._cache.clear()
                    cls._cache_size = 0
                if cache_key not in cls._cache:
                    cls._cache[cache_key] = data
                    cls._cache_size += len(data)
        return data


def subject_source(grid: GridConfig, store: ArtifactStore) -> SubjectSource:
    """The grid's subjects folder for a local store; the store's ``subjects/`` prefix otherwise."""
    if store.local_path(STORE_PREFIX) is not None:
        return FolderSource(grid.subjects_dir, named_by=f"'subjects_dir' in {grid.source}")
    return StoreSource(store)


@dataclass(frozen=True)
class SubjectListRead:
    """The valid lists of a source, and one message per list that was skipped."""

    lists: list[SubjectList]
    problems: list[str]


def _read_one(
    source: SubjectSource, name: str, max_subjects: int
) -> tuple[SubjectList | None, str | None, str | None]:
    """(the parsed list or None, the problem or None, the short content hash or None if unreadable).

    A list with lines it skipped comes with a problem naming them."""
    # A file name that is not UTF-8 can be in no message, run key or hash as the OS hands it over.
    shown = shown_name(name)
    try:
        data = source.read(name)
    except (OSError, SdAssetsError) as exc:
        return None, f"skipped subject list {shown}: cannot read it: {exc}", None
    try:
        parsed = parse_subject_list(shown, data, max_subjects)
    except GridError as exc:
        return None, f"skipped {exc}", hashlib.sha256(data).hexdigest()[:SHORT_HASH]
    problem = None
    if parsed.skipped_lines:
        lines = "; ".join(parsed.skipped_lines)
        problem = f"subject list {shown}, skipped {lines}; the list's other subjects are taken"
    return parsed, problem, parsed.sha256[:SHORT_HASH]


def read_subject_lists(source: SubjectSource, max_subjects: int) -> SubjectListRead:
    """Read every list, sorted by name; a malformed or unreadable list, or a line a list cannot
    take, is skipped with a message.

    Raises:
        GridError: the source is missing, or holds no valid list at all.
    """
    lists, problems = [], []
    listing = source.listing()
    with ThreadPoolExecutor(max_workers=READ_THREADS) as pool:
        read = list(pool.map(lambda listed: _read_one(source, listed.name, max_subjects), listing))
    for parsed, problem, _ in read:
        if parsed is not None:
            lists.append(parsed)
        if problem is not None:
            problems.append(problem)
    if not lists:
        detail = "".join(f"\n- {p}" for p in problems) or f" (no *.txt files){source.empty_hint}"
        raise GridError(f"no valid subject lists in {source.location}{detail}")
    return SubjectListRead(lists, problems)


@dataclass(frozen=True)
class ListState:
    """What is remembered of one list: size and mtime when last read, content hash, validity."""

    size: int
    mtime_ns: int | None
    sha: str
    valid: bool
    version: str | None = None

    def unchanged(self, listed: ListedFile) -> bool:
        """Whether ``listed`` is this list as last read: same size and mtime, or same version tag."""
        if self.size != listed.size:
            return False
        if listed.mtime_ns is not None:
            return self.mtime_ns == listed.mtime_ns
        return listed.version is not None and self.version == listed.version


@dataclass(frozen=True)
class ScanResult:
    """One look at a source: the lists whose content is new, problems found, state to remember."""

    changed: list[SubjectList]
    problems: list[str]
    state: dict[str, ListState]
    listed: int
    read: int
    # (name, content hash) of each valid list remembered and no longer there: its subjects leave the grid.
    removed: list[tuple[str, str]] = field(default_factory=list)


def scan_subject_lists(
    source: SubjectSource,
    previous: dict[str, ListState],
    max_subjects: int,
    now_ns: int | None = None,
) -> ScanResult:
    """Compare the source with ``previous``; read only lists whose size or mtime moved.

    A list is *changed* when its content hash differs from the remembered one (a touched but
    identical list is not). Malformed lists are remembered too, so their problem is reported
    once per content, not on every look; unreadable ones are retried next time.
    """
    now_ns = time.time_ns() if now_ns is None else now_ns
    changed: list[SubjectList] = []
    problems: list[str] = []
    state: dict[str, ListState] = {}
    listing = source.listing()
    read = 0
    for listed in listing:
        old = previous.get(listed.name)
        if old is not None and old.unchanged(listed):
            state[listed.name] = old
            continue
        read += 1
        parsed, problem, sha = _read_one(source, listed.name, max_subjects)
        if sha is None:  # unreadable: not remembered, so the next look tries it again
            problems.append(problem)
            continue
        settled = listed.mtime_ns is not None and now_ns - listed.mtime_ns >= SETTLE_NS
        state[listed.name] = ListState(
            listed.size, listed.mtime_ns if settled else None, sha, parsed is not None, listed.version
        )
        if old is not None and old.sha == sha:
            continue
        if parsed is not None:
            changed.append(parsed)
        if problem is not None:
            problems.append(problem)
    names = {listed.name for listed in listing}
    removed = [(name, old.sha) for name, old in sorted(previous.items()) if name not in names and old.valid]
    return ScanResult(changed, problems, state, listed=len(listing), read=read, removed=removed)


@dataclass(frozen=True)
class Cursor:
    """What a sensor remembers between looks: the store its runs made images in, and each list's state."""

    store: str | None  # None in cursors written before the store was kept: taken as the current one
    state: dict[str, ListState]


def encode_cursor(state: dict[str, ListState], store: str) -> str:
    """A compact string of ``state`` and ``store``: JSON, zlib, base64.

    Each list is ``name -> [size, mtime_ns, sha, valid, version]``.
    """
    table = {name: [s.size, s.mtime_ns, s.sha, int(s.valid), s.version] for name, s in sorted(state.items())}
    raw = json.dumps({"store": store, "lists": table}, separators=(",", ":")).encode()
    return _CURSOR_FORMAT + base64.b64encode(zlib.compress(raw, 9)).decode("ascii")


def decode_cursor(cursor: str | None) -> Cursor:
    """The store and state ``encode_cursor`` wrote; no store and no state for no cursor.

    Raises:
        SdAssetsError: the cursor is not one ``encode_cursor`` wrote.
    """
    if not cursor:
        return Cursor(None, {})
    try:
        prefix = next((p for p in (_CURSOR_FORMAT, _CURSOR_FORMAT_WITHOUT_STORE) if cursor.startswith(p)), None)
        if prefix is None:
            raise ValueError(f"it does not start with {_CURSOR_FORMAT!r}")
        data = json.loads(zlib.decompress(base64.b64decode(cursor[len(prefix) :], validate=True)))
        store, table = (data["store"], data["lists"]) if prefix == _CURSOR_FORMAT else (None, data)
        state = {
            name: ListState(
                int(size), None if mtime is None else int(mtime), str(sha), bool(valid),
                None if version is None else str(version),
            )  # fmt: skip
            for name, (size, mtime, sha, valid, version) in table.items()
        }
        return Cursor(None if store is None else str(store), state)
    except (ValueError, TypeError, AttributeError, KeyError, zlib.error) as exc:
        raise SdAssetsError(f"the subject list cursor is unreadable ({exc}); every list will be read again") from None


def store_tag(store: str) -> str:
    """Eight hex digits naming a store in run keys: the same lists run again into another store."""
    return hashlib.sha256(store.encode()).hexdigest()[:8]


def removal_key(removed: list[tuple[str, str]]) -> str:
    """A stable name for a set of removed lists ((name, content hash) each), for run keys:
    ``-<list>:<hash>``, or ``-<first list>+<n>more:<hash of all>``."""
    if len(removed) == 1:
        return f"-{removed[0][0]}:{removed[0][1][:SHORT_HASH]}"
    ordered = sorted(removed)
    digest = hashlib.sha256("".join(f"{name}\0{sha}\n" for name, sha in ordered).encode()).hexdigest()
    return f"-{ordered[0][0]}+{len(ordered) - 1}more:{digest[:SHORT_HASH]}"


def change_key(changed: list[SubjectList]) -> str:
    """A stable name for a set of new or changed lists, for run keys: ``<list>:<hash>``.

    One list: its name and short content hash. Several found in one look (a folder dropped at
    once, or a sensor turned on over an existing folder): the first name, how many more, and a
    hash of every (name, hash), so a folder of lists costs one run per style, not one per list.
    """
    if len(changed) == 1:
        return f"{changed[0].name}:{changed[0].sha256[:SHORT_HASH]}"
    ordered = sorted(changed, key=lambda subject_list: subject_list.name)
    digest = hashlib.sha256("".join(f"{sl.name}\0{sl.sha256}\n" for sl in ordered).encode()).hexdigest()
    return f"{ordered[0].name}+{len(ordered) - 1}more:{digest[:SHORT_HASH]}"
