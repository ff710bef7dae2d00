"""The local-folder store: whole files or nothing, with the usual modes; what the file system refuses, or a
file that is not what it should be, as StoreError."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from sd_assets.domain.errors import StoreError
from sd_assets.domain.prompts import read_prompt_rows
from sd_assets.domain.store import LocalStore, atomic_write, new_temporary_file


def test_writes_replace_whole_files_and_leave_no_temporary_files(tmp_path, monkeypatch):
    store = LocalStore(tmp_path / "data")
    store.write_text("grids/banksy.json", "[1]")
    with open(tmp_path / "data" / "grids" / "banksy.json") as reader:  # a reader that opened the old file
        store.write_text("grids/banksy.json", "[1, 2]")
        assert reader.read() == "[1]"
    assert store.read_text("grids/banksy.json") == "[1, 2]"

    # A write that dies half-way (a full disk) leaves the old file whole.
    def half_then_fail(path, data):
        with open(path, "wb") as out:
            out.write(data[: len(data) // 2])
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(Path, "write_bytes", half_then_fail)
    with pytest.raises(StoreError, match="No space left on device"):
        store.write_text("grids/banksy.json", "[1, 2, 3, 4]")
    monkeypatch.undo()
    assert store.read_text("grids/banksy.json") == "[1, 2]"
    assert sorted(p.name for p in (tmp_path / "data" / "grids").iterdir()) == ["banksy.json"]


def test_a_store_path_that_is_a_file_is_a_store_error_naming_the_path(tmp_path):
    afile = tmp_path / "afile"
    afile.write_text("not a folder")
    for storage in (afile, afile / "data" / "deeper"):
        with pytest.raises(StoreError, match=rf"^storage {storage}: {afile} is a file, not a folder$"):
            LocalStore(storage)

    # A file where one of the store's folders should be, put there after the store was opened.
    store = LocalStore(tmp_path / "data")
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "models").write_text("not a folder")
    with pytest.raises(StoreError, match=rf"^cannot write {tmp_path}/data/models/m/manifest.json: "
                       rf"{tmp_path}/data/models is a file, not a folder$"):  # fmt: skip
        store.write_text("models/m/manifest.json", "{}")
    with pytest.raises(StoreError, match=rf"{tmp_path}/data/models/m/manifest.json does not exist"):
        store.read_text("models/m/manifest.json")
    store.delete("models/m/manifest.json")  # nothing there to delete
    # A folder where a file should be.
    (tmp_path / "data" / "catalog" / "banksy.parquet").mkdir(parents=True)
    with pytest.raises(StoreError, match=rf"cannot read {tmp_path}/data/catalog/banksy.parquet: Is a directory"):
        store.read_bytes("catalog/banksy.parquet")
    with pytest.raises(StoreError, match=rf"cannot delete {tmp_path}/data/catalog/banksy.parquet: Is a directory"):
        store.delete("catalog/banksy.parquet")
    with pytest.raises(StoreError, match=rf"^cannot write {tmp_path}/data/catalog/banksy.parquet: a folder is there$"):
        store.write_bytes("catalog/banksy.parquet", b"rows")


def test_a_write_the_file_system_refuses_gives_its_reason_without_the_temporary_file(tmp_path):
    # A name the file system takes, whose temporary twin (".<name>.<hex>.tmp") is too long.
    name = "n" * 245 + ".json"
    with pytest.raises(StoreError) as refused:
        atomic_write(tmp_path / name, b"{}")
    assert str(refused.value) == f"cannot write {tmp_path / name}: File name too long"
    assert list(tmp_path.iterdir()) == []
    # A name the file system does not take: its own words, not a traceback from looking at it.
    with pytest.raises(StoreError, match=r"^cannot write .*: File name too long$"):
        atomic_write(tmp_path / ("n" * 300) / "x.json", b"{}")


def test_a_failed_copy_leaves_neither_a_half_file_nor_a_temporary_one(tmp_path):
    store = LocalStore(tmp_path / "data")
    store.write_text("models/m/manifest.json", "{}")
    with pytest.raises(StoreError, match=r"cannot write .*models/m/manifest.json: .*no-such-source"):
        store.upload_file(tmp_path / "no-such-source", "models/m/manifest.json")
    assert store.read_text("models/m/manifest.json") == "{}"
    assert [p.name for p in (tmp_path / "data" / "models" / "m").iterdir()] == ["manifest.json"]


def test_files_get_the_mode_open_would_give_them_so_a_web_server_can_serve_the_gallery(tmp_path):
    umask = os.umask(0o022)
    os.umask(umask)
    store = LocalStore(tmp_path / "data")
    store.write_text("gallery/index.html", "<html>")
    (tmp_path / "source.bin").write_bytes(b"weights")
    store.upload_file(tmp_path / "source.bin", "models/m/weights.bin")
    store.download_file("models/m/weights.bin", tmp_path / "node-cache" / "weights.bin")
    plain = tmp_path / "plain"
    plain.write_text("x")
    for path in (tmp_path / "data/gallery/index.html", tmp_path / "data/models/m/weights.bin",
                 tmp_path / "node-cache/weights.bin"):  # fmt: skip
        assert stat.S_IMODE(path.stat().st_mode) == stat.S_IMODE(plain.stat().st_mode) == 0o666 & ~umask, path


def test_a_prompt_grid_that_is_not_one_is_a_store_error_naming_it(tmp_path):
    store = LocalStore(tmp_path / "data")
    store.write_text("grids/frida-kahlo.json", '[{"subject": "cut sho')
    with pytest.raises(StoreError, match=rf"^{tmp_path}/data/grids/frida-kahlo.json is not a prompt grid \(.*\); "
                       "a run of the style 'Frida Kahlo' writes it again$"):  # fmt: skip
        read_prompt_rows(store, "Frida Kahlo")


def test_a_write_in_flight_is_not_an_object_of_the_store(tmp_path):
    store = LocalStore(tmp_path)
    store.write_bytes("images/ab/done.png", b"png")
    # The hidden file a write fills before renaming it (a killed write leaves it behind).
    fd, half = new_temporary_file(tmp_path / "images" / "ab", "half.png")
    os.write(fd, b"pn")
    os.close(fd)

    assert half.is_file()
    assert list(store.list_keys("images/")) == ["images/ab/done.png"]
    assert set(store.versions("images/")) == {"images/ab/done.png"}
    assert store.existing(["images/ab/done.png", "images/ab/half.png"]) == {"images/ab/done.png"}


@pytest.mark.parametrize("key", ["../outside.png", "images/../../outside.png", "/etc/passwd", "images//x.png", "./x", ""])
def test_a_key_that_would_leave_the_store_or_name_no_file_is_refused_before_any_file_is_touched(tmp_path, key):
    store = LocalStore(tmp_path / "data")
    (tmp_path / "outside.png").write_bytes(b"not the store's")
    for touch in (lambda: store.write_bytes(key, b"png"), lambda: store.read_bytes(key), lambda: store.exists(key),
                  lambda: store.delete(key),
                  # A listing's prefix too (but "", the whole store's).
                  *([lambda: list(store.list_keys(key)), lambda: store.versions(key)] if key else [])):  # fmt: skip
        with pytest.raises(StoreError, match=r"^invalid store key .*: use a relative path without '\.' or '\.\.' parts$"):
            touch()
    assert (tmp_path / "outside.png").read_bytes() == b"not the store's"
    assert not (tmp_path / "data").exists(), "nothing was written"


def test_versions_leave_out_a_file_deleted_between_the_listing_and_its_stat(tmp_path):
    class MergedMeanwhile(LocalStore):
        """Another run merges (and deletes) a pending batch just after this one listed it."""

        def list_keys(self, prefix: str):
            keys = list(super().list_keys(prefix))
            (self.root / "catalog" / "pending" / "banksy" / "run-1.jsonl").unlink()
            yield from keys

    store = MergedMeanwhile(tmp_path)
    store.write_bytes("catalog/banksy.parquet", b"rows")
    store.write_bytes("catalog/pending/banksy/run-1.jsonl", b"{}\n")
    versions = store.versions("catalog/")
    assert list(versions) == ["catalog/banksy.parquet"] and versions["catalog/banksy.parquet"].size == 4


def test_the_half_written_files_of_some_keys_are_discarded_and_no_other_file(tmp_path):
    store = LocalStore(tmp_path)
    store.write_bytes("images/ab/abcd.png", b"made")
    folder = tmp_path / "images" / "ab"
    killed = [folder / ".abcd.png.0123456789ab.tmp", folder / ".abef.png.ba9876543210.tmp"]
    in_flight = folder / ".ab99.png.aaaaaaaaaaaa.tmp"  # another key's write: not this caller's to remove
    for path in (*killed, in_flight):
        path.write_bytes(b"half a png")
    keys = ["images/ab/abcd.png", "images/ab/abef.png", "images/cd/cdef.png"]  # cd/: no folder yet
    assert store.discard_partial_writes(keys) == 2
    assert sorted(p.name for p in folder.iterdir()) == [in_flight.name, "abcd.png"]
    assert store.read_bytes("images/ab/abcd.png") == b"made"
    assert store.discard_partial_writes(keys) == 0
