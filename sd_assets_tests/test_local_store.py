"""The local-folder store: whole files or nothing, and what the file system refuses, as StoreError."""

from __future__ import annotations

import pytest

from sd_assets.domain.errors import StoreError
from sd_assets.domain.store import LocalStore


def test_writes_replace_whole_files_and_leave_no_temporary_files(tmp_path):
    store = LocalStore(tmp_path / "data")
    store.write_text("grids/banksy.json", "[1]")
    store.write_text("grids/banksy.json", "[1, 2]")
    assert store.read_text("grids/banksy.json") == "[1, 2]"
    assert sorted(p.name for p in (tmp_path / "data" / "grids").iterdir()) == ["banksy.json"]


def test_a_store_path_that_is_a_file_is_a_store_error_naming_the_path(tmp_path):
    (tmp_path / "afile").write_text("not a folder")
    store = LocalStore(tmp_path / "afile")
    with pytest.raises(StoreError, match=rf"cannot write {tmp_path / 'afile'}/grids/banksy.json: .*Not a directory"):
        store.write_text("grids/banksy.json", "[]")
    with pytest.raises(StoreError, match=rf"{tmp_path / 'afile'}/grids/banksy.json does not exist"):
        store.read_text("grids/banksy.json")


def test_a_failed_copy_leaves_neither_a_half_file_nor_a_temporary_one(tmp_path):
    store = LocalStore(tmp_path / "data")
    store.write_text("models/m/manifest.json", "{}")
    with pytest.raises(StoreError, match=r"cannot write .*models/m/manifest.json: .*no-such-source"):
        store.upload_file(tmp_path / "no-such-source", "models/m/manifest.json")
    assert store.read_text("models/m/manifest.json") == "{}"
    assert [p.name for p in (tmp_path / "data" / "models" / "m").iterdir()] == ["manifest.json"]
