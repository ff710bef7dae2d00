"""The model cache's verification: a warm cache is trusted without reading it, a changed one never."""

import hashlib
import json
import os
import threading
import time

import pytest

from sd_assets.domain.errors import ModelError
from sd_assets.domain.grid import ModelConfig
from sd_assets.domain.models import (
    COPY_LOCK,
    MANIFEST,
    VERIFIED,
    ModelRef,
    ensure_model,
    local_model_folder,
    model_prefix,
    verify_in_store,
)
from sd_assets.domain.node_locks import hold_lock
from sd_assets.domain.store import LocalStore

FILES = {"model_index.json": b'{"scheduler": ["diffusers", "PNDMScheduler"]}', "unet/weights.bin": b"w" * 1000}


def _cache(tmp_path):
    store = LocalStore(tmp_path)
    prefix = model_prefix("org/model", "a" * 40)
    for path, data in FILES.items():
        store.write_bytes(prefix + path, data)
    manifest = {
        "model_id": "org/model",
        "revision": "a" * 40,
        "files": [
            {"path": path, "bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}
            for path, data in FILES.items()
        ],
    }
    return store, prefix, manifest


def test_a_sound_cache_is_hashed_once_then_trusted_while_unchanged(tmp_path):
    store, prefix, manifest = _cache(tmp_path)
    first = verify_in_store(store, manifest)
    assert first.problems == [] and first.bytes_hashed == sum(len(d) for d in FILES.values())
    assert store.exists(prefix + VERIFIED)
    again = verify_in_store(store, manifest)
    assert again.problems == [] and again.bytes_hashed == 0


def test_a_cache_never_checked_with_a_file_missing_is_named_and_not_marked_sound(tmp_path):
    # An upload cut short: the weights are there, the index is not, and nothing was checked yet.
    store, prefix, manifest = _cache(tmp_path)
    store.delete(prefix + "model_index.json")
    found = verify_in_store(store, manifest)
    assert found.problems == ["model_index.json: missing"] and found.bytes_hashed == 1000
    assert not store.exists(prefix + VERIFIED), "a cache with a problem is not stamped as sound"
    store.write_bytes(prefix + "model_index.json", FILES["model_index.json"])
    assert verify_in_store(store, manifest).problems == []


def test_a_rewritten_file_is_hashed_again_and_a_same_size_corruption_is_caught(tmp_path):
    store, prefix, manifest = _cache(tmp_path)
    verify_in_store(store, manifest)
    weights = store.local_path(prefix + "unet/weights.bin")
    weights.write_bytes(b"x" * 1000)
    stat = weights.stat()
    os.utime(weights, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1))  # a distinct mtime even on coarse clocks
    result = verify_in_store(store, manifest)
    assert result.bytes_hashed == 1000
    assert result.problems and result.problems[0].startswith("unet/weights.bin: sha256")
    weights.unlink()
    assert verify_in_store(store, manifest).problems == ["unet/weights.bin: missing"]


def test_a_file_of_another_size_is_named_with_both_sizes_without_reading_it(tmp_path):
    store, prefix, manifest = _cache(tmp_path)
    store.write_bytes(prefix + "unet/weights.bin", b"w" * 999)  # an upload cut one byte short
    result = verify_in_store(store, manifest)
    assert result.problems == ["unet/weights.bin: 999 bytes, manifest says 1000"]
    assert result.bytes_hashed == len(FILES["model_index.json"]), "only the file of the right size is hashed"
    assert not store.exists(prefix + VERIFIED)


class _RemoteStore(LocalStore):
    """A store that is not on this node's disk, as S3 is: workers copy the model from it."""

    def local_path(self, key):
        return None


def test_a_node_copy_is_fetched_once_and_an_altered_file_fetched_again(tmp_path):
    store, prefix, manifest = _cache(tmp_path / "store")
    store.write_text(prefix + "manifest.json", json.dumps(manifest))
    remote = _RemoteStore(tmp_path / "store")
    ref = ModelRef("org/model", "a" * 40, "PNDMScheduler", 1045, 2)
    node = tmp_path / "node"

    first = local_model_folder(remote, ref, node)
    assert first.bytes_copied == sum(len(d) for d in FILES.values())
    assert (first.folder / "unet" / "weights.bin").read_bytes() == FILES["unet/weights.bin"]
    assert local_model_folder(remote, ref, node).bytes_copied == 0

    weights = first.folder / "unet" / "weights.bin"
    weights.write_bytes(b"x" * 1000)  # same size, other bytes
    stat = weights.stat()
    os.utime(weights, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1))
    again = local_model_folder(remote, ref, node)
    assert again.bytes_copied == 1000 and weights.read_bytes() == FILES["unet/weights.bin"]


def _remote_model(tmp_path) -> tuple[_RemoteStore, ModelRef]:
    store, prefix, manifest = _cache(tmp_path / "store")
    store.write_text(prefix + "manifest.json", json.dumps(manifest))
    return _RemoteStore(tmp_path / "store"), ModelRef("org/model", "a" * 40, "PNDMScheduler", 1045, 2)


def test_temporary_files_of_copies_killed_half_way_are_removed_by_the_next_copy(tmp_path):
    remote, ref = _remote_model(tmp_path)
    folder = tmp_path / "node" / "org--model" / ("a" * 40)
    (folder / "unet").mkdir(parents=True)
    left = [folder / "unet" / ".weights.bin.3f2a9c41d0e7.tmp", folder / ".model_index.json.b47a33a2b55d.tmp"]
    for path in left:  # what store.replacing leaves when its process is killed: a weights file's worth each
        path.write_bytes(b"w" * 600)
    copy = local_model_folder(remote, ref, tmp_path / "node")
    assert copy.bytes_copied == sum(len(d) for d in FILES.values())
    assert not any(path.exists() for path in left)
    assert sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file()) == [
        COPY_LOCK, MANIFEST, "model_index.json", "unet/weights.bin", VERIFIED,
    ]  # fmt: skip


def test_a_second_copier_on_the_node_waits_for_the_first_and_leaves_its_file_in_flight_alone(tmp_path):
    remote, ref = _remote_model(tmp_path)
    folder = tmp_path / "node" / "org--model" / ("a" * 40)
    (folder / "unet").mkdir(parents=True)
    in_flight = folder / "unet" / ".weights.bin.0123456789ab.tmp"
    holding = threading.Event()

    def first_copier():  # another run's process on the node, half-way through the weights
        with hold_lock(folder, COPY_LOCK):
            in_flight.write_bytes(FILES["unet/weights.bin"])
            holding.set()
            time.sleep(1.0)
            os.replace(in_flight, folder / "unet" / "weights.bin")

    first = threading.Thread(target=first_copier)
    first.start()
    holding.wait()
    waited: list[str] = []
    copy = local_model_folder(remote, ref, tmp_path / "node", on_wait=waited.append)
    first.join()
    assert waited == [f"waiting for process {os.getpid()}, which holds {folder / COPY_LOCK}"]
    assert (folder / "unet" / "weights.bin").read_bytes() == FILES["unet/weights.bin"]
    assert copy.bytes_copied == len(FILES["model_index.json"]), "the weights the first one copied are not fetched"


def test_a_node_copy_of_a_store_file_that_does_not_match_the_manifest_is_refused_and_not_kept(tmp_path):
    store, prefix, manifest = _cache(tmp_path / "store")
    store.write_text(prefix + "manifest.json", json.dumps(manifest))
    store.write_bytes(prefix + "unet/weights.bin", b"x" * 1000)  # damaged in the store, same size
    remote = _RemoteStore(tmp_path / "store")
    ref = ModelRef("org/model", "a" * 40, "PNDMScheduler", 1045, 2)
    with pytest.raises(ModelError, match=r"^model org/model@a{40}: unet/weights.bin in .* does not match its "
                       r"manifest; materialize model_weights again"):  # fmt: skip
        local_model_folder(remote, ref, tmp_path / "node")
    folder = tmp_path / "node" / "org--model" / ("a" * 40)
    assert not (folder / "unet" / "weights.bin").exists(), "the damaged copy is not left for a later load"
    assert not (folder / MANIFEST).exists(), "nor is the folder marked as a sound copy"


def test_a_node_cache_folder_that_cannot_be_made_is_named_not_a_traceback(tmp_path):
    store, prefix, manifest = _cache(tmp_path / "store")
    store.write_text(prefix + "manifest.json", json.dumps(manifest))
    remote = _RemoteStore(tmp_path / "store")
    ref = ModelRef("org/model", "a" * 40, "PNDMScheduler", 1045, 2)
    (tmp_path / "node").write_text("SD_ASSETS_MODEL_CACHE names this file")
    with pytest.raises(ModelError, match=r"cannot use .*node/org--model/a{40} .*set SD_ASSETS_MODEL_CACHE"):
        local_model_folder(remote, ref, tmp_path / "node")


@pytest.mark.parametrize("damaged", [MANIFEST, VERIFIED])
def test_a_node_copy_whose_bookkeeping_was_cut_short_is_checked_again_not_a_crash(tmp_path, damaged):
    store, prefix, manifest = _cache(tmp_path / "store")
    store.write_text(prefix + "manifest.json", json.dumps(manifest))
    remote = _RemoteStore(tmp_path / "store")
    ref = ModelRef("org/model", "a" * 40, "PNDMScheduler", 1045, 2)
    first = local_model_folder(remote, ref, tmp_path / "node")
    # A worker killed while writing it (before writes were atomic) left half a JSON file.
    (first.folder / damaged).write_text('{"files": [{"path": ')
    again = local_model_folder(remote, ref, tmp_path / "node")
    assert again.bytes_copied == 0, "files that match the manifest are hashed, not fetched again"
    assert json.loads((first.folder / MANIFEST).read_text()) == manifest
    assert local_model_folder(remote, ref, tmp_path / "node").bytes_copied == 0


def test_a_warm_cache_is_used_without_writing_to_the_store(tmp_path):
    def files():
        return {p: p.stat().st_mtime_ns for p in tmp_path.rglob("*") if p.is_file()}

    store, model = LocalStore(tmp_path), ModelConfig(id="tiny-random")
    assert ensure_model(store, model).action == "built"
    written = files()
    assert ensure_model(store, model).action == "cached"
    assert files() == written, "a run with the model cached rewrites nothing (a read-only store would fail)"


def test_the_tiny_model_is_the_same_files_whatever_ran_before_it(tmp_path):
    # Its revision is a hash of its configuration, not of its weights: two builds of one revision
    # (two nodes, or a rebuild after damage) must be the same files, or one key names two pictures.
    import torch

    from sd_assets.domain.tiny_model import save_tiny_model

    hashes = []
    for seed, folder in ((1, tmp_path / "a"), (2, tmp_path / "b")):
        torch.manual_seed(seed)
        torch.rand(1000)
        save_tiny_model(folder)
        hashes.append({p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
                       for p in folder.rglob("*.safetensors")})  # fmt: skip
    assert len(hashes[0]) == 3 and hashes[0] == hashes[1]
