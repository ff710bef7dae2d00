"""The model-weights cache in the artifact store, and the node-local copy workers load.

Owns the layout ``models/<id>/<revision>/`` (diffusers format) with a ``manifest.json`` written
last (path, bytes and sha256 of each file, and the weights variant), a ``models/<id>/refs/<name>``
pointer from a revision name to the resolved revision (a commit sha for hub models), and
verification: a cache whose manifest is missing or does not match its files is treated as
absent, never loaded. Hub models come through ``hub``; the tiny model is built offline.
"""

from __future__ import annotations

import json
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from sd_assets.domain.errors import ModelError, StoreError
from sd_assets.domain.grid import ModelConfig
from sd_assets.domain.hub_settings import HubSettings
from sd_assets.domain.node_locks import hold_lock
from sd_assets.domain.store import ArtifactStore, atomic_write, is_temporary_file, sha256_file

MANIFEST = "manifest.json"
# Version tags of the files when they were last hashed and found sound.
VERIFIED = "verified.json"
# The lock a node's copy of a model is checked and filled under, in its folder.
COPY_LOCK = ".copying.lock"


def model_dir_name(model_id: str) -> str:
    """'org/name' -> 'org--name', as the Hugging Face cache names repos."""
    return model_id.replace("/", "--")


def model_prefix(model_id: str, revision: str) -> str:
    return f"models/{model_dir_name(model_id)}/{revision}/"


def ref_key(model_id: str, revision_name: str) -> str:
    return f"models/{model_dir_name(model_id)}/refs/{revision_name}"


@dataclass(frozen=True)
class ModelRef:
    """A verified model in the store: id, resolved revision and default scheduler."""

    model_id: str
    revision: str
    scheduler: str
    total_bytes: int
    file_count: int
    variant: str | None = None

    @property
    def prefix(self) -> str:
        return model_prefix(self.model_id, self.revision)


def build_manifest(folder: Path, model_id: str, revision: str, variant: str | None = None) -> dict:
    files = []
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        relative = path.relative_to(folder).as_posix()
        if relative == MANIFEST:
            continue
        files.append({"path": relative, "bytes": path.stat().st_size, "sha256": sha256_file(path)})
    if not any(f["path"] == "model_index.json" for f in files):
        raise ModelError(f"model {model_id}@{revision}: no model_index.json; not a diffusers pipeline folder")
    scheduler = json.loads((folder / "model_index.json").read_text())["scheduler"][1]
    return {"model_id": model_id, "revision": revision, "scheduler": scheduler, "variant": variant, "files": files}


def _ref_from_manifest(manifest: dict) -> ModelRef:
    return ModelRef(
        model_id=manifest["model_id"],
        revision=manifest["revision"],
        scheduler=manifest["scheduler"],
        total_bytes=sum(f["bytes"] for f in manifest["files"]),
        file_count=len(manifest["files"]),
        variant=manifest.get("variant"),
    )


def read_manifest(store: ArtifactStore, model_id: str, revision: str) -> dict | None:
    key = model_prefix(model_id, revision) + MANIFEST
    if not store.exists(key):
        return None
    try:
        manifest = json.loads(store.read_bytes(key))
        manifest["files"]  # noqa: B018 - a manifest without a file list is corrupt
        return manifest
    except (ValueError, KeyError, TypeError):
        return None


def _read_stamps(store: ArtifactStore, prefix: str) -> dict[str, str]:
    """The version tags of the files as they were when last hashed and found sound."""
    if not store.exists(prefix + VERIFIED):
        return {}
    try:
        stamps = json.loads(store.read_bytes(prefix + VERIFIED))
    except ValueError:
        return {}
    return stamps if isinstance(stamps, dict) else {}


def _write_stamps(store: ArtifactStore, manifest: dict) -> None:
    prefix = model_prefix(manifest["model_id"], manifest["revision"])
    versions = store.versions(prefix)
    stamps = {entry["path"]: str(versions[prefix + entry["path"]]) for entry in manifest["files"]}
    store.write_text(prefix + VERIFIED, json.dumps(stamps, indent=1, sort_keys=True))


@dataclass(frozen=True)
class Verification:
    """The store's copy of a model checked against its manifest."""

    problems: list[str]
    bytes_hashed: int


def verify_in_store(store: ArtifactStore, manifest: dict) -> Verification:
    """Check every file of the manifest: present, the right size, the right sha256.

    A file is hashed unless it is unchanged (same version tag: size and mtime, or S3 ETag) since
    the last time it was hashed and found sound, so a warm cache is checked without reading it.
    """
    prefix = model_prefix(manifest["model_id"], manifest["revision"])
    versions = store.versions(prefix)
    stamps = _read_stamps(store, prefix)
    problems = []
    hashed = 0
    for entry in manifest["files"]:
        key = prefix + entry["path"]
        if key not in versions:
            problems.append(f"{entry['path']}: missing")
            continue
        if stamps.get(entry["path"]) == str(versions[key]):
            continue
        if versions[key].size != entry["bytes"]:
            problems.append(f"{entry['path']}: {versions[key].size} bytes, manifest says {entry['bytes']}")
            continue
        actual = store.sha256(key)
        hashed += entry["bytes"]
        if actual != entry["sha256"]:
            problems.append(f"{entry['path']}: sha256 {actual[:12]}..., manifest says {entry['sha256'][:12]}...")
    if not problems and hashed:
        _write_stamps(store, manifest)
    return Verification(problems, hashed)


@dataclass(frozen=True)
class CacheReport:
    """What ``ensure_model`` did: whether it found a sound cache, and the bytes it moved."""

    ref: ModelRef
    action: str  # "cached", "built" or "downloaded"
    bytes_downloaded: int
    bytes_uploaded: int
    seconds: float
    problems: tuple[str, ...] = ()
    bytes_hashed: int = 0


def resolve_revision(model: ModelConfig, hub: HubSettings) -> str:
    """The immutable revision a revision name points to (a commit sha for hub models)."""
    if model.is_tiny:
        if model.revision != "main":
            raise ModelError(f"model tiny-random has only the revision 'main', not {model.revision!r}")
        from sd_assets.domain.tiny_model import tiny_revision

        return tiny_revision()
    from sd_assets.domain.hub import resolve_commit

    return resolve_commit(model.id, model.revision, hub)


@dataclass(frozen=True)
class _Fetched:
    variant: str | None
    bytes_downloaded: int


def _fetch(model: ModelConfig, revision: str, folder: Path, hub: HubSettings, safety_checker: bool) -> _Fetched:
    """Put the model's files in ``folder``."""
    if model.is_tiny:
        from sd_assets.domain.tiny_model import save_tiny_model

        save_tiny_model(folder)
        return _Fetched(None, 0)
    from sd_assets.domain.hub import download_pipeline

    download = download_pipeline(model.id, revision, hub, folder, model.variant, safety_checker)
    return _Fetched(download.selection.variant, download.bytes_downloaded)


def _selection_problems(manifest: dict, model: ModelConfig, safety_checker: bool) -> list[str]:
    """Why a sound cache still does not hold what the grid asks for (another variant, no safety checker)."""
    problems = []
    cached = manifest.get("variant")
    if model.variant == "fp16" and cached != "fp16":
        problems.append("cached without the fp16 variant, grid asks for model.variant fp16")
    if model.variant == "none" and cached is not None:
        problems.append(f"cached with the {cached} variant, grid asks for model.variant none")
    if safety_checker and not model.is_tiny and not any(
        f["path"].startswith("safety_checker/") for f in manifest["files"]
    ):
        problems.append("cached without safety_checker, grid asks for inference.safety_checker")
    return problems


def _point_ref(store: ArtifactStore, model: ModelConfig, revision: str) -> None:
    """Point the grid's revision name at ``revision``, writing only when it points elsewhere: a warm
    cache's run then writes nothing to the store (on S3, one GET where there was a PUT)."""
    key = ref_key(model.id, model.revision)
    try:
        current = store.read_text(key).strip()
    except StoreError:  # not there yet (or unreadable: the write says what is wrong)
        current = None
    if current != revision:
        store.write_text(key, revision)


def ensure_model(
    store: ArtifactStore, model: ModelConfig, hub: HubSettings | None = None, safety_checker: bool = False
) -> CacheReport:
    """Make sure a verified copy of ``model`` is in the store, building or fetching it if not.

    ``hub`` says how to reach the Hugging Face hub (default: huggingface_hub's own settings);
    ``safety_checker`` asks for the safety checker's weights too.
    """
    start = time.perf_counter()
    hub = hub or HubSettings()
    revision = resolve_revision(model, hub)
    manifest = read_manifest(store, model.id, revision)
    problems: list[str] = []
    if manifest is not None:
        verification = verify_in_store(store, manifest)
        problems = verification.problems or _selection_problems(manifest, model, safety_checker)
        if not problems:
            _point_ref(store, model, revision)
            seconds = time.perf_counter() - start
            return CacheReport(
                _ref_from_manifest(manifest), "cached", 0, 0, seconds, bytes_hashed=verification.bytes_hashed
            )
    elif any(True for _ in store.list_keys(model_prefix(model.id, revision))):
        problems = ["manifest.json missing or unreadable"]
    prefix = model_prefix(model.id, revision)
    store.delete(prefix + MANIFEST)
    store.delete(prefix + VERIFIED)
    with tempfile.TemporaryDirectory(prefix="sd-assets-model-") as tmp:
        folder = Path(tmp)
        fetched = _fetch(model, revision, folder, hub, safety_checker)
        manifest = build_manifest(folder, model.id, revision, fetched.variant)
        for entry in manifest["files"]:
            store.upload_file(folder / entry["path"], prefix + entry["path"])
        store.write_text(prefix + MANIFEST, json.dumps(manifest, indent=1))
    # Just uploaded from files hashed for the manifest: stamp them as verified.
    _write_stamps(store, manifest)
    _point_ref(store, model, revision)
    uploaded = sum(f["bytes"] for f in manifest["files"])
    action = "built" if model.is_tiny else "downloaded"
    seconds = time.perf_counter() - start
    return CacheReport(
        _ref_from_manifest(manifest), action, fetched.bytes_downloaded, uploaded, seconds, tuple(problems)
    )


def read_model_ref(store: ArtifactStore, model: ModelConfig) -> ModelRef:
    """The model that ``model_weights`` last put in the store for this id and revision name."""
    key = ref_key(model.id, model.revision)
    if not store.exists(key):
        raise ModelError(
            f"model {model.id}@{model.revision} is not in the store {store.location()}; "
            "materialize the model_weights asset first"
        )
    revision = store.read_text(key).strip()
    manifest = read_manifest(store, model.id, revision)
    if manifest is None:
        raise ModelError(
            f"model {model.id}@{revision} in {store.location()} has no readable manifest; "
            "materialize model_weights again to rebuild the cache"
        )
    return _ref_from_manifest(manifest)


@dataclass(frozen=True)
class LocalCopy:
    """The node-local folder a worker loads, and how many bytes it took to fill it."""

    folder: Path
    bytes_copied: int


def _local_tag(path: Path) -> str:
    stat = path.stat()
    return f"{stat.st_size}:{stat.st_mtime_ns}"


def _read_json(path: Path):
    """A node-local JSON file, or None if it is missing or unreadable (a node's disk may hold anything)."""
    try:
        return json.loads(path.read_bytes())
    except (OSError, ValueError):
        return None


def local_model_folder(
    store: ArtifactStore, ref: ModelRef, cache_dir: Path, on_wait: Callable[[str], None] | None = None
) -> LocalCopy:
    """A verified folder on this node holding the model, copied from the store at most once.

    A local-folder store is used in place. Otherwise files go to ``cache_dir/<id>/<revision>/``,
    each checked against the manifest; then the manifest and the files' version tags (size and
    mtime) are written. A later call trusts a file only while its tag is unchanged, and hashes
    (or fetches again) any other, so a copy interrupted half-way or altered since is never
    loaded as it is.

    One process at a time checks and copies a folder, under a lock file in it (the cache is the
    node's, shared by the pods or processes that run there, whose own lock folders may differ):
    a second waits (``on_wait`` says for whom) and finds the copy made. The holder first removes
    the temporary files that copies killed half-way left (a weights file's worth each).
    """
    manifest_key = ref.prefix + MANIFEST
    in_place = store.local_path(manifest_key)
    if in_place is not None:
        return LocalCopy(in_place.parent, 0)
    manifest = json.loads(store.read_bytes(manifest_key))
    folder = Path(cache_dir).expanduser() / model_dir_name(ref.model_id) / ref.revision
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:  # a file where a folder should be, a read-only disk
        raise ModelError(
            f"cannot use {folder} for this node's copy of model {ref.model_id}: {exc.strerror or exc}; set "
            "SD_ASSETS_MODEL_CACHE (the generator's model_cache_dir) to a folder this process can write"
        ) from None
    with hold_lock(folder, COPY_LOCK, on_wait):
        _remove_temporary_files(folder)
        return LocalCopy(folder, _copy_missing_files(store, ref, manifest, folder))


def _remove_temporary_files(folder: Path) -> None:
    """The files ``store.replacing`` left in ``folder`` for a process killed before it renamed them.
    Only under the folder's lock: a live copier's temporary file is renamed before it lets go."""
    for path in folder.rglob("*"):
        if is_temporary_file(path.name) and path.is_file():
            path.unlink(missing_ok=True)


def _copy_missing_files(store: ArtifactStore, ref: ModelRef, manifest: dict, folder: Path) -> int:
    """Fetch the files of ``manifest`` that ``folder`` lacks or holds otherwise; the bytes fetched."""
    local_manifest, local_stamps = folder / MANIFEST, folder / VERIFIED
    stamps = _read_json(local_stamps) if _read_json(local_manifest) == manifest else None
    stamps = stamps if isinstance(stamps, dict) else {}
    local_manifest.unlink(missing_ok=True)
    copied = 0
    for entry in manifest["files"]:
        target = folder / entry["path"]
        if target.is_file() and stamps.get(entry["path"]) == _local_tag(target):
            continue
        if target.is_file() and target.stat().st_size == entry["bytes"] and sha256_file(target) == entry["sha256"]:
            continue
        store.download_file(ref.prefix + entry["path"], target)
        actual = sha256_file(target)
        if actual != entry["sha256"]:
            target.unlink(missing_ok=True)
            raise ModelError(
                f"model {ref.model_id}@{ref.revision}: {entry['path']} in {store.location(ref.prefix)} "
                "does not match its manifest; materialize model_weights again to rebuild the cache"
            )
        copied += entry["bytes"]
    # Stamps first, the manifest last: without the manifest the stamps are not trusted.
    tags = {entry["path"]: _local_tag(folder / entry["path"]) for entry in manifest["files"]}
    atomic_write(local_stamps, json.dumps(tags).encode())
    atomic_write(local_manifest, json.dumps(manifest, indent=1).encode())
    return copied
