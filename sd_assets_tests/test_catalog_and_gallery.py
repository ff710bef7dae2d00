"""Catalog merging and searching, and the static gallery pages, on a local store."""

import hashlib
import io
import json
import re
import shutil
from dataclasses import asdict, replace
from pathlib import Path

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image, PngImagePlugin

from sd_assets.domain import catalog, gallery
from sd_assets.domain.errors import SdAssetsError, StoreError
from sd_assets.domain.pngmeta import PROVENANCE_CHUNK, Provenance, encode_png, image_key_path, read_provenance
from sd_assets.domain.prompts import PromptRow
from sd_assets.domain.store import LocalStore
from sd_assets_tests.helpers import claiming_size


def _row(subject: str, style: str, index: int = 0) -> PromptRow:
    key = hashlib.sha256(f"{subject}|{style}|{index}".encode()).hexdigest()
    return PromptRow(subject, style, index, f"{subject} by {style}", "", 100 + index, key)


def _provenance(row: PromptRow, run_id: str) -> Provenance:
    return Provenance(
        key=row.key, subject=row.subject, style=row.style, image_index=row.image_index, prompt=row.prompt,
        negative_prompt="", seed=row.seed, model_id="tiny-random", model_revision="0" * 40,
        scheduler="PNDMScheduler", steps=2, guidance_scale=7.5, width=64, height=64, run_id=run_id,
        partition=row.style, created="2026-11-27T00:00:00+00:00", device="cpu", dtype="float32",
    )  # fmt: skip


def _store_image(store: LocalStore, row: PromptRow, run_id: str) -> dict:
    key = image_key_path(row.key)
    store.write_bytes(key, encode_png(Image.new("RGB", (64, 64)), _provenance(row, run_id)))
    return catalog.catalog_record(_provenance(row, run_id), store.location(key))


def test_merge_folds_pending_records_and_recovers_rows_from_pngs(tmp_path):
    store = LocalStore(tmp_path)
    rows = [_row("alan turing", "Banksy"), _row("ada lovelace", "Banksy"), _row("grace hopper", "Banksy")]
    records = [_store_image(store, row, "run-1") for row in rows[:2]]
    catalog.write_pending(store, "Banksy", "run-1-000002", records)
    _store_image(store, rows[2], "run-crashed")  # PNG written, record never flushed
    merged, report = catalog.merge_catalog(store, "Banksy", rows)
    assert report.rows == 3 and report.added_from_records == 2 and report.recovered_from_png == 1
    assert set(merged["run_id"].to_pylist()) == {"run-1", "run-crashed"}
    assert list(store.list_keys("catalog/pending/")) == []
    again, report = catalog.merge_catalog(store, "Banksy", rows)
    assert len(again) == 3 and report.added_from_records == 0 and report.recovered_from_png == 0


def test_a_png_whose_record_was_lost_gets_its_row_in_a_catalog_that_already_exists(tmp_path):
    store = LocalStore(tmp_path)
    first, second = _row("alan turing", "Banksy"), _row("ada lovelace", "Banksy")
    catalog.write_pending(store, "Banksy", "run-1-000001", [_store_image(store, first, "run-1")])
    catalog.merge_catalog(store, "Banksy", [first])
    _store_image(store, second, "run-2")  # a later run died between the PNG and its record
    _merged, report = catalog.merge_catalog(store, "Banksy", [first, second])
    assert report.recovered_from_png == 1
    found = catalog.search(catalog.read_catalog(store), subject="ada")
    assert found["run_id"].tolist() == ["run-2"], "the row is in the catalog file, where search reads it"


def test_a_png_from_a_newer_version_whose_record_was_lost_gets_its_row_and_stays_in_the_store(tmp_path):
    # Two versions sharing one store (a rolling upgrade): the newer records a field this one lacks.
    store = LocalStore(tmp_path)
    row = _row("alan turing", "Banksy")
    made = _provenance(row, "run-newer")
    info = PngImagePlugin.PngInfo()
    info.add_text(PROVENANCE_CHUNK, json.dumps({**asdict(made), "field_of_a_newer_version": "x"}))
    buffer = io.BytesIO()
    Image.new("RGB", (64, 64)).save(buffer, format="PNG", pnginfo=info)
    store.write_bytes(image_key_path(row.key), buffer.getvalue())
    merged, report = catalog.merge_catalog(store, "Banksy", [row])
    assert (report.recovered_from_png, report.set_aside) == (1, ())
    assert merged["run_id"].to_pylist() == ["run-newer"] and "field_of_a_newer_version" not in merged.column_names
    assert store.read_bytes(image_key_path(row.key)) == buffer.getvalue(), "not set aside to be made again"


def test_a_catalog_written_before_the_later_columns_reads_with_their_old_values(tmp_path):
    store = LocalStore(tmp_path)
    row = _row("alan turing", "Banksy")
    old = {k: v for k, v in _store_image(store, row, "r1").items() if k not in catalog.LATER_COLUMNS}
    (tmp_path / "catalog").mkdir(exist_ok=True)
    pd.DataFrame([old]).to_parquet(tmp_path / catalog.catalog_key("Banksy"))
    [read] = catalog.read_catalog(store).to_dict("records")
    # What images made before these columns existed were: no DeepCache, no weights variant
    # chosen, library versions not recorded, not checked for safety.
    assert {c: read[c] for c in ("deep_cache", "model_variant", "software", "safety_flagged")} == {
        "deep_cache": "", "model_variant": "", "software": "", "safety_flagged": False
    }  # fmt: skip
    assert read["run_id"] == "r1"


def test_a_damaged_catalog_is_left_out_when_asked_but_a_failing_store_is_not_taken_for_one(tmp_path):
    store = LocalStore(tmp_path)
    banksy, warhol = _row("alan turing", "Banksy"), _row("alan turing", "Andy Warhol")
    for row in (banksy, warhol):
        catalog.write_pending(store, row.style, "run-1-000001", [_store_image(store, row, "run-1")])
        catalog.merge_catalog(store, row.style, [row])
    whole = store.read_bytes(catalog.catalog_key("Banksy"))
    store.write_bytes(catalog.catalog_key("Banksy"), whole[:200])

    unreadable: list[catalog.UnreadableCatalog] = []
    assert catalog.read_catalog(store, unreadable)["style"].tolist() == ["Andy Warhol"]
    assert catalog.catalog_styles(store, unreadable) == {"Andy Warhol": [warhol.key]}
    assert [(u.key, u.slug) for u in unreadable] == [(catalog.catalog_key("Banksy"), "banksy")] * 2
    location = store.location(catalog.catalog_key("Banksy"))
    assert unreadable[0].message.startswith(f"{location} is not a readable catalog")

    # A store that cannot give the file (S3 throttled, the network down) says nothing of the file:
    # the read fails as a whole, rather than report a sound catalog as damaged.
    store.write_bytes(catalog.catalog_key("Banksy"), whole)

    class Throttled(LocalStore):
        def read_bytes(self, key: str) -> bytes:
            if key.startswith("catalog/"):
                raise StoreError(f"cannot read {key}: SlowDown (please reduce your request rate)")
            return super().read_bytes(key)

    unreadable.clear()
    for read in (catalog.read_catalog, catalog.catalog_styles):
        with pytest.raises(StoreError, match="SlowDown"):
            read(Throttled(tmp_path), unreadable)
    assert unreadable == []


def test_a_cut_short_catalog_or_png_is_named_with_the_way_out_and_nothing_is_deleted(tmp_path):
    store = LocalStore(tmp_path)
    rows = [_row("alan turing", "Banksy"), _row("ada lovelace", "Banksy")]
    catalog.write_pending(store, "Banksy", "run-1-000001", [_store_image(store, rows[0], "run-1")])
    catalog.merge_catalog(store, "Banksy", rows[:1])
    whole = store.read_bytes(catalog.catalog_key("Banksy"))
    store.write_bytes(catalog.catalog_key("Banksy"), whole[:200])
    location = store.location(catalog.catalog_key("Banksy"))
    for read in (lambda: catalog.read_catalog(store), lambda: catalog.merge_catalog(store, "Banksy", rows)):
        with pytest.raises(StoreError, match=rf"^{re.escape(location)} is not a readable catalog .*sd-assets rebuild-catalog"):
            read()
    assert store.read_bytes(catalog.catalog_key("Banksy")) == whole[:200]
    # A whole Parquet file, but not a catalog: a search export of two columns saved in its place.
    pq.write_table(pa.table({"subject": ["x"], "style": ["y"]}), store.local_path(catalog.catalog_key("Banksy")))
    with pytest.raises(StoreError, match=rf"^{re.escape(location)} is not a readable catalog \(no column 'key', "):
        catalog.read_catalog(store)

    store.delete(catalog.catalog_key("Banksy"))  # moved aside: the rows come back from the PNGs
    _store_image(store, rows[1], "run-2")
    image = image_key_path(rows[1].key)
    png = store.read_bytes(image)
    store.write_bytes(image, png[:100])  # cut short: a node lost power as it wrote it, say
    merged, report = catalog.merge_catalog(store, "Banksy", rows)
    # Set aside, not a merge that fails every run: the image is missing now, and the next run makes it.
    [(problem, aside)] = report.set_aside
    assert problem.startswith(f"{store.location(image)} is not a readable image of this project (")
    assert aside == store.location(f"unreadable/{image}") and store.read_bytes(f"unreadable/{image}") == png[:100]
    assert not store.exists(image) and merged["key"].to_pylist() == [rows[0].key]
    assert report.recovered_from_png == 1
    store.write_bytes(image, png)  # made again
    merged, report = catalog.merge_catalog(store, "Banksy", rows)
    assert report.recovered_from_png == 1 and sorted(merged["key"].to_pylist()) == sorted(r.key for r in rows)


def test_a_png_whose_provenance_does_not_fit_the_catalog_is_named_and_set_aside_when_a_run_recovers_it(tmp_path):
    store = LocalStore(tmp_path)
    odd = _row("odd seed", "Banksy")
    image = image_key_path(odd.key)
    store.write_bytes(image, encode_png(Image.new("RGB", (8, 8)), replace(_provenance(odd, "r"), seed="x")))
    merged, report = catalog.merge_catalog(store, "Banksy", [odd])
    [(problem, aside)] = report.set_aside
    assert problem.startswith(f"{store.location(image)} has provenance the catalog cannot hold (")
    assert aside == store.location(f"unreadable/{image}") and not store.exists(image)
    assert len(merged) == 0 and report.recovered_from_png == 0


def test_rebuild_gives_every_image_a_row_whichever_grid_made_it_and_sets_a_broken_catalog_aside(tmp_path):
    store = LocalStore(tmp_path)
    # Banksy: an image of an old grid and one of the current grid, both merged; then the catalog breaks.
    old, new = _row("alan turing", "Banksy"), _row("ada lovelace", "Banksy")
    catalog.write_pending(store, "Banksy", "r1", [_store_image(store, old, "r1"), _store_image(store, new, "r2")])
    catalog.merge_catalog(store, "Banksy", [new])
    broken = store.read_bytes(catalog.catalog_key("Banksy"))[:300]
    store.write_bytes(catalog.catalog_key("Banksy"), broken)
    # Frida Kahlo: a readable catalog whose one image was deleted since, and an image with no row.
    gone, unlisted = _row("alan turing", "Frida Kahlo"), _row("grace hopper", "Frida Kahlo")
    catalog.write_pending(store, "Frida Kahlo", "r3", [_store_image(store, gone, "r3")])
    catalog.merge_catalog(store, "Frida Kahlo", [gone])
    store.delete(image_key_path(gone.key))
    _store_image(store, unlisted, "r4")
    # And a PNG cut short.
    cut = _row("edsger dijkstra", "Banksy")
    _store_image(store, cut, "r5")
    store.write_bytes(image_key_path(cut.key), store.read_bytes(image_key_path(cut.key))[:100])

    # And one whose provenance has a seed the catalog's int64 column cannot hold.
    odd = _row("odd seed", "Banksy")
    store.write_bytes(image_key_path(odd.key), encode_png(Image.new("RGB", (8, 8)), replace(_provenance(odd, "r6"), seed="x")))

    rebuild = catalog.rebuild_catalogs(store)

    assert (rebuild.images, rebuild.catalogs) == (5, 2)
    banksy, kahlo = rebuild.reports
    assert (banksy.catalog, banksy.rows, banksy.kept, banksy.recovered_from_png) == ("catalog/banksy.parquet", 2, 0, 2)
    assert (kahlo.catalog, kahlo.rows, kahlo.kept, kahlo.recovered_from_png) == ("catalog/frida-kahlo.parquet", 2, 1, 1)
    assert kahlo.set_aside is None
    assert re.fullmatch(rf"{re.escape(str(tmp_path))}/catalog/unreadable/banksy-\d{{8}}T\d{{6}}Z\.parquet", banksy.set_aside)
    assert Path(banksy.set_aside).read_bytes() == broken
    cut_error, odd_error = sorted(rebuild.errors, key=lambda e: e.startswith(store.location(image_key_path(odd.key))))
    assert cut_error.startswith(f"{store.location(image_key_path(cut.key))} is not a readable image of this project")
    # It may be an image of an earlier grid, which no run makes again: no advice to delete it outright.
    assert cut_error.endswith("it gets no catalog row; if it is an image of the current grid, deleting it makes "
                              "the next run of the style make it again")  # fmt: skip
    assert odd_error.startswith(f"{store.location(image_key_path(odd.key))} has provenance the catalog cannot hold")

    rows = catalog.read_catalog(store)
    assert sorted(zip(rows["style"], rows["subject"], rows["run_id"])) == [
        ("Banksy", "ada lovelace", "r2"), ("Banksy", "alan turing", "r1"),
        ("Frida Kahlo", "alan turing", "r3"), ("Frida Kahlo", "grace hopper", "r4"),
    ]  # fmt: skip
    assert rows.set_index("key").loc[unlisted.key, "path"] == store.location(image_key_path(unlisted.key))
    # Nothing left to do but the cut PNG, which is still named.
    again = catalog.rebuild_catalogs(store)
    assert again.reports == [] and len(again.errors) == 2


def test_rebuild_sets_aside_only_a_catalog_that_is_not_one_never_one_the_store_failed_to_give(tmp_path):
    # A read the store failed (any StoreError but CatalogUnreadable) says nothing of the file: set
    # aside and rebuilt from the PNGs, a sound catalog would lose the rows of images deleted since.
    store = LocalStore(tmp_path)
    gone = _row("alan turing", "Banksy")
    catalog.write_pending(store, "Banksy", "r1", [_store_image(store, gone, "r1")])
    catalog.merge_catalog(store, "Banksy", [gone])
    store.delete(image_key_path(gone.key))
    whole = store.read_bytes(catalog.catalog_key("Banksy"))

    class ResetOnce(LocalStore):
        reset = False

        def read_bytes(self, key: str) -> bytes:
            if key.startswith("catalog/") and not ResetOnce.reset:
                ResetOnce.reset = True
                raise StoreError(f"cannot read {key}: the connection was reset")
            return super().read_bytes(key)

    with pytest.raises(StoreError, match="the connection was reset"):
        catalog.rebuild_catalogs(ResetOnce(tmp_path))
    assert store.read_bytes(catalog.catalog_key("Banksy")) == whole
    assert list(store.list_keys("catalog/unreadable/")) == []


def test_rebuild_names_each_png_whose_provenance_does_not_fit_and_gives_the_others_their_rows(tmp_path):
    # The PNGs are checked against the catalog's columns together, then one by one when some do not fit.
    store = LocalStore(tmp_path)
    good = [_row(f"subject {n}", "Banksy") for n in range(6)]
    for row in good:
        _store_image(store, row, "r1")
    odd = [_row("odd seed", "Banksy"), _row("odd steps", "Banksy")]
    for row, change in zip(odd, ({"seed": "x"}, {"steps": 2**70})):
        png = encode_png(Image.new("RGB", (8, 8)), replace(_provenance(row, "r2"), **change))
        store.write_bytes(image_key_path(row.key), png)
    # And a subject that is not text: JSON's escape of a lone surrogate, which no encoder writes.
    odd.append(_row("odd subject", "Banksy"))
    info = PngImagePlugin.PngInfo()
    info.add_text(PROVENANCE_CHUNK, json.dumps({**asdict(_provenance(odd[-1], "r2")), "subject": "odd \udcff"}))
    buffer = io.BytesIO()
    Image.new("RGB", (8, 8)).save(buffer, format="PNG", pnginfo=info)
    store.write_bytes(image_key_path(odd[-1].key), buffer.getvalue())

    rebuild = catalog.rebuild_catalogs(store, threads=3)

    named = sorted(error.partition(" has provenance the catalog cannot hold (")[0] for error in rebuild.errors)
    assert named == sorted(store.location(image_key_path(row.key)) for row in odd)
    [report] = rebuild.reports
    assert (report.rows, report.recovered_from_png) == (6, 6)
    rows = catalog.read_catalog(store)
    assert sorted(rows["key"]) == sorted(row.key for row in good)
    assert rows.set_index("key").loc[good[0].key, "path"] == store.location(image_key_path(good[0].key))


def test_rebuild_names_a_png_claiming_more_pixels_than_pillow_opens_and_reads_one_just_under_without_decoding(
        tmp_path):  # fmt: skip
    store = LocalStore(tmp_path)
    rows = [_row(f"subject {n}", "Banksy") for n in range(3)]
    for row in rows:
        _store_image(store, row, "r1")
    bomb, huge = (image_key_path(row.key) for row in rows[:2])
    store.write_bytes(bomb, claiming_size(store.read_bytes(bomb), 20000, 20000))
    store.write_bytes(huge, claiming_size(store.read_bytes(huge), 13000, 13000))

    with pytest.warns(Image.DecompressionBombWarning):
        rebuild = catalog.rebuild_catalogs(store)

    [error] = rebuild.errors
    assert error.startswith(f"{store.location(bomb)} is not a readable image of this project (ValueError('Image size")
    assert sorted(catalog.read_catalog(store)["key"]) == sorted(row.key for row in rows[1:])


def test_rows_of_an_old_grid_stay_in_the_catalog(tmp_path):
    store = LocalStore(tmp_path)
    old = _row("alan turing", "Banksy")
    catalog.write_pending(store, "Banksy", "r1", [_store_image(store, old, "r1")])
    catalog.merge_catalog(store, "Banksy", [old])
    merged, _ = catalog.merge_catalog(store, "Banksy", [_row("ada lovelace", "Banksy")])
    assert merged["subject"].to_pylist() == ["alan turing"]


def test_a_copied_store_finds_its_own_images_not_those_where_it_was_written(tmp_path):
    store = LocalStore(tmp_path / "data")
    row = _row("alan turing", "Banksy")
    catalog.write_pending(store, "Banksy", "r1", [_store_image(store, row, "r1")])
    catalog.merge_catalog(store, "Banksy", [row])
    shutil.copytree(tmp_path / "data", tmp_path / "moved")
    shutil.rmtree(tmp_path / "data")
    [path] = catalog.read_catalog(LocalStore(tmp_path / "moved"))["path"]
    assert path == str(tmp_path / "moved" / image_key_path(row.key)) and Path(path).is_file()


def test_a_catalog_written_before_the_deep_cache_column_still_merges(tmp_path):
    store = LocalStore(tmp_path)
    old, new = _row("alan turing", "Banksy"), _row("ada lovelace", "Banksy")
    catalog.write_pending(store, "Banksy", "r1", [_store_image(store, old, "r1")])
    catalog.merge_catalog(store, "Banksy", [old])
    frame = pd.read_parquet(store.root / catalog.catalog_key("Banksy")).drop(columns=["deep_cache"])
    frame.to_parquet(store.root / catalog.catalog_key("Banksy"), index=False)
    catalog.write_pending(store, "Banksy", "r2", [_store_image(store, new, "r2")])
    merged, report = catalog.merge_catalog(store, "Banksy", [old, new])
    assert report.rows == 2 and merged["deep_cache"].to_pylist() == ["", ""]
    assert list(catalog.read_catalog(store)["deep_cache"]) == ["", ""]


def test_a_pending_batch_written_before_the_later_columns_merges_with_their_old_values(tmp_path):
    store = LocalStore(tmp_path)
    row = _row("alan turing", "Banksy")
    record = {k: v for k, v in _store_image(store, row, "r1").items() if k not in catalog.LATER_COLUMNS}
    store.write_bytes(catalog.pending_prefix("Banksy") + "r1-000001.jsonl", (json.dumps(record) + "\n").encode())
    merged, report = catalog.merge_catalog(store, "Banksy", [row])
    assert report.added_from_records == 1
    [merged_row] = merged.to_pylist()
    assert {column: merged_row[column] for column in catalog.LATER_COLUMNS} == catalog.LATER_COLUMNS


def test_rows_from_before_the_safety_checker_was_recorded_say_it_checked_the_images_it_flagged(tmp_path):
    store = LocalStore(tmp_path)
    rows = [_row("alan turing", "Banksy"), _row("ada lovelace", "Banksy"), _row("grace hopper", "Banksy")]
    old = [
        {k: v for k, v in {**_store_image(store, row, "r1"), "safety_flagged": flagged}.items() if k != "safety_checker"}
        for row, flagged in zip(rows, (True, False, True))
    ]  # fmt: skip
    (tmp_path / "catalog").mkdir(exist_ok=True)
    pd.DataFrame(old[:2]).to_parquet(tmp_path / catalog.catalog_key("Banksy"))
    store.write_bytes(catalog.pending_prefix("Banksy") + "r1-000001.jsonl", (json.dumps(old[2]) + "\n").encode())
    read = catalog.read_catalog(store).set_index("subject")
    assert read["safety_checker"].to_dict() == {"alan turing": True, "ada lovelace": False, "grace hopper": True}
    assert catalog.search(read.reset_index(), where={"safety_checker": "false"})["subject"].tolist() == [
        "ada lovelace"
    ]


def test_an_image_recorded_twice_gets_one_row_the_record_of_the_png_in_the_store(tmp_path):
    store = LocalStore(tmp_path)
    old, new = _row("alan turing", "Banksy"), _row("ada lovelace", "Banksy")

    def made(row, run_id, created):  # writes the PNG, as a run does, and gives its record
        return {**_store_image(store, row, run_id), "created": created}

    catalog.write_pending(store, "Banksy", "r0-000001", [made(old, "r0", "2026-11-27T01:00:00+00:00")])
    catalog.merge_catalog(store, "Banksy", [old])
    # Its PNG deleted, r1 makes the catalog's image again, and the new one; r2 makes the new one
    # again later (one batch is Parquet); r3's record of it is older than r2's.
    store.delete(image_key_path(old.key))
    records = [made(old, "r1", "2026-11-27T02:00:00+00:00"), made(new, "r1", "2026-11-27T02:00:00+00:00")]
    catalog.write_pending(store, "Banksy", "r3-000001", [made(new, "r3", "2026-11-27T02:30:00+00:00")])
    catalog.write_pending(store, "Banksy", "r1-000001", records)
    pending = store.root / catalog.pending_prefix("Banksy")
    pd.DataFrame([made(new, "r2", "2026-11-27T03:00:00+00:00")]).to_parquet(pending / "r2-000001.parquet")
    merged, report = catalog.merge_catalog(store, "Banksy", [old, new])
    assert (report.added_from_records, report.replaced_from_records, report.rows) == (1, 1, 2)
    rows = sorted((r["subject"], r["run_id"]) for r in merged.to_pylist())
    assert rows == [("ada lovelace", "r2"), ("alan turing", "r1")]
    assert rows == sorted((r["subject"], r["run_id"]) for r in catalog.read_catalog(store).to_dict("records"))
    # Each row is the record of the PNG the store holds now.
    for row in merged.to_pylist():
        assert read_provenance(store.read_bytes(image_key_path(row["key"]))).run_id == row["run_id"]


def test_a_stale_batch_merged_after_a_newer_record_replaces_nothing(tmp_path):
    store = LocalStore(tmp_path)
    row, other = _row("alan turing", "Banksy"), _row("ada lovelace", "Banksy")
    newer = {**_store_image(store, row, "r-new"), "created": "2026-11-28T02:00:00+00:00"}
    catalog.write_pending(store, "Banksy", "r-new-000001", [newer])
    catalog.merge_catalog(store, "Banksy", [row, other])
    # A batch of an earlier run turns up after that merge: its record of the image is older.
    older = {**newer, "run_id": "r-old", "created": "2026-11-28T01:00:00+00:00"}
    catalog.write_pending(store, "Banksy", "r-old-000001", [older, _store_image(store, other, "r-old")])
    merged, report = catalog.merge_catalog(store, "Banksy", [row, other])

    assert (report.added_from_records, report.replaced_from_records, report.rows) == (1, 0, 2)
    rows = [(r["subject"], r["run_id"]) for r in catalog.read_catalog(store).to_dict("records")]
    assert rows == [("ada lovelace", "r-old"), ("alan turing", "r-new")]
    # A late batch that changes nothing leaves the file alone; the merge still gives its rows in order.
    catalog.write_pending(store, "Banksy", "r-old-000002", [older])
    written = (store.root / catalog.catalog_key("Banksy")).stat().st_mtime_ns
    merged, report = catalog.merge_catalog(store, "Banksy", [row, other])
    assert (report.added_from_records, report.replaced_from_records) == (0, 0)
    assert [(r["subject"], r["run_id"]) for r in merged.to_pylist()] == rows
    assert (store.root / catalog.catalog_key("Banksy")).stat().st_mtime_ns == written
    assert list(store.list_keys(catalog.pending_prefix("Banksy"))) == []


def test_images_a_dead_run_was_making_get_their_rows_whether_or_not_the_grid_still_has_them(tmp_path):
    store = LocalStore(tmp_path)
    kept, dropped, unmade = (_row(subject, "Banksy") for subject in ("alan turing", "ada lovelace", "grace hopper"))
    catalog.write_intent(store, "Banksy", "r1", [kept.key, dropped.key, unmade.key])
    _store_image(store, kept, "r1")
    _store_image(store, dropped, "r1")  # then r1 died, its records unsaved; "ada lovelace" leaves the list
    merged, report = catalog.merge_catalog(store, "Banksy", [kept])

    assert report.recovered_from_png == 2
    rows = sorted((r["subject"], r["run_id"]) for r in merged.to_pylist())
    assert rows == [("ada lovelace", "r1"), ("alan turing", "r1")]
    assert list(store.list_keys(catalog.pending_prefix("Banksy"))) == []
    broken = catalog.pending_prefix("Banksy") + "r2" + catalog.INTENT_SUFFIX
    store.write_text(broken, '{"keys": ')
    with pytest.raises(StoreError, match=rf"^{re.escape(store.location(broken))} is not a list of image keys"):
        catalog.merge_catalog(store, "Banksy", [kept])


def test_an_image_recorded_twice_in_one_batch_gets_one_row(tmp_path):
    store = LocalStore(tmp_path)
    row = _row("alan turing", "Banksy")
    catalog.write_pending(store, "Banksy", "r1-000001", [_store_image(store, row, "r1"), _store_image(store, row, "r9")])
    merged, report = catalog.merge_catalog(store, "Banksy", [row])
    assert report.added_from_records == 1 and [r["run_id"] for r in merged.to_pylist()] == ["r1"]


def test_a_broken_pending_batch_is_named_with_the_way_out_and_an_empty_one_is_nothing(tmp_path):
    store = LocalStore(tmp_path)
    row = _row("alan turing", "Banksy")
    record = _store_image(store, row, "r1")
    store.write_bytes(catalog.pending_prefix("Banksy") + "r0-000001.jsonl", b"")
    newer = {**record, "a_field_of_a_newer_version": 1}
    store.write_bytes(catalog.pending_prefix("Banksy") + "r1-000001.jsonl", (json.dumps(newer) + "\n").encode())
    merged, report = catalog.merge_catalog(store, "Banksy", [row])
    assert report.added_from_records == 1 and merged["run_id"].to_pylist() == ["r1"]
    broken = catalog.pending_prefix("Banksy") + "r2-000001.jsonl"
    store.write_bytes(broken, b'{"key": ')
    with pytest.raises(StoreError, match=rf"^{re.escape(store.location(broken))} is not a readable batch .*delete it"):
        catalog.merge_catalog(store, "Banksy", [row])


def test_a_pending_batch_left_in_parquet_by_an_earlier_version_still_merges(tmp_path):
    store = LocalStore(tmp_path)
    row = _row("alan turing", "Banksy")
    pending = store.root / catalog.pending_prefix("Banksy")
    pending.mkdir(parents=True)
    pd.DataFrame([_store_image(store, row, "r1")]).drop(columns=["deep_cache"]).to_parquet(pending / "r1-000001.parquet")
    merged, report = catalog.merge_catalog(store, "Banksy", [row])
    assert report.added_from_records == 1 and report.recovered_from_png == 0
    assert [(r["run_id"], r["deep_cache"]) for r in merged.to_pylist()] == [("r1", "")]
    assert list(store.list_keys("catalog/pending/")) == []


def test_search_is_case_insensitive_substring_and(tmp_path):
    frame = pd.DataFrame(
        [
            {"subject": "Alan Turing", "style": "Banksy", "model_id": "tiny-random", "run_id": "abc"},
            {"subject": "alan turing", "style": "Vincent Van Gogh", "model_id": "tiny-random", "run_id": "def"},
            {"subject": "ada lovelace", "style": "Vincent Van Gogh", "model_id": "org/sd", "run_id": "abc"},
        ]
    )
    assert len(catalog.search(frame, subject="TURING")) == 2
    assert list(catalog.search(frame, subject="turing", style="van")["run_id"]) == ["def"]
    assert list(catalog.search(frame, model_id="org", run_id="ab")["subject"]) == ["ada lovelace"]
    assert len(catalog.search(frame)) == 3
    # An empty cell (catalogs put together in a notebook) is read as empty text, not an error.
    gaps = pd.concat([frame, pd.DataFrame([{"style": "Banksy", "run_id": "xyz", "prompt": "alan turing"},
                                           {"subject": "nan", "run_id": "nos", "safety_flagged": True}])])  # fmt: skip
    assert list(catalog.search(gaps, subject="turing", style="banksy")["run_id"]) == ["abc"]
    assert list(catalog.search(gaps, where={"prompt": "alan turing"})["run_id"]) == ["xyz"]
    assert list(catalog.search(gaps, subject="nan")["run_id"]) == ["nos"]  # an empty cell is not 'nan'
    assert list(catalog.search(gaps, where={"safety_flagged": True})["run_id"]) == ["nos"]  # nor true
    # The slug of a style (its gallery folder) finds it; so does an accent typed as a separate mark.
    assert len(catalog.search(frame, style="vincent-van-gogh")) == 2
    accents = pd.DataFrame([{"subject": "Émile Zola", "style": "Banksy", "model_id": "m", "run_id": "r"}])
    assert len(catalog.search(accents, subject="E\u0301mile")) == len(catalog.search(accents, subject="ÉMILE")) == 1
    # A part typed without its accents finds it too, and one typed with accents finds it unaccented.
    assert len(catalog.search(accents, subject="emile zola")) == len(catalog.search(accents, subject="ZÒLA")) == 1
    manet = pd.DataFrame([{"subject": "Olympia", "style": "Édouard Manet", "model_id": "m", "run_id": "r"}])
    assert len(catalog.search(manet, style="edouard")) == len(catalog.search(manet, style="edouard-manet")) == 1
    # Only accents: in other scripts the marks tell letters apart (パン bread is not ハン, 고 is not part of 공 ball).
    other_scripts = pd.DataFrame(
        [{"subject": s, "style": "Banksy", "model_id": "m", "run_id": "r"} for s in ("ハンバーガー", "공 놀이", "パン")]
    )
    assert list(catalog.search(other_scripts, subject="パン")["subject"]) == ["パン"]
    assert catalog.search(other_scripts, subject="고").empty
    assert list(catalog.search(other_scripts, subject="ﾊﾝ")["subject"]) == ["ハンバーガー"]  # half-width kana
    assert not catalog.search_may_reach("공-놀이", style="고")
    # --where gives a whole value: there, accents are part of it.
    assert catalog.search(accents, where={"subject": "Emile Zola"}).empty
    assert len(catalog.search(accents, where={"subject": "émile zola"})) == 1
    # A filter is text, not a pattern: "c++" finds C++, and "." is a full stop.
    code = pd.DataFrame(
        [{"subject": s, "style": "Banksy (c)", "model_id": "m", "run_id": "r"} for s in ("c++ coder", "stx paul")]
    )
    assert list(catalog.search(code, subject="C++")["subject"]) == ["c++ coder"]
    assert catalog.search(code, subject="st. paul").empty and len(catalog.search(code, style="(c)")) == 2


def test_search_of_many_rows_of_few_styles_finds_each_by_its_slug_and_its_name_unaccented():
    # Each distinct value is folded once and looked up for its rows (a million rows hold a few dozen
    # styles): every row of a style must get its own style's fold.
    frame = pd.DataFrame([{"subject": f"subject {n % 500}", "style": style, "model_id": "m", "run_id": "r"}
                          for n in range(1000) for style in ("Banksy", "Vincent Van Gogh", "Édouard Manet")])  # fmt: skip
    found = catalog.search(frame, subject="SUBJECT 1", style="edouard-manet")
    assert len(found) == 2 * 111 and set(found["style"]) == {"Édouard Manet"}  # subject 1, 1x and 1xx
    assert sorted(set(found["subject"]))[:3] == ["subject 1", "subject 10", "subject 100"]
    assert len(catalog.search(frame, style="van")) == 1000
    assert catalog.search(frame, where={"style": "édouard manet"})["subject"].nunique() == 500


@pytest.mark.parametrize(
    ("style", "where", "slug", "reached"),
    [
        ("gogh", None, "vincent-van-gogh", True),
        ("Van Gogh", None, "vincent-van-gogh", True),  # slugged, as its name would be
        ("warhol", None, "banksy", False),
        (None, [("style", "Banksy")], "banksy", True),
        (None, [("style", "Andy Warhol")], "banksy", False),
        (None, {"style": "Andy Warhol", "steps": 50}, "andy-warhol", True),
        # As search compares: case folded ("STRASSE" finds "Straße") and accents in one form.
        ("STRASSE", None, "straße-kunst", True),
        (None, [("style", "Cafe\u0301 Noir")], "caf\u00e9-noir", True),
        ("CAFE\u0301", None, "caf\u00e9-noir", True),
        ("cafe", None, "caf\u00e9-noir", True),  # a part without its accents, as search finds it
        (None, [("style", "Cafe Noir")], "caf\u00e9-noir", False),  # a whole value keeps them
    ],
)
def test_a_search_reaches_a_catalog_it_cannot_read_unless_its_style_filter_leaves_the_style_out(
    style, where, slug, reached
):
    assert catalog.search_may_reach(slug, style=style, where=where) is reached
    # Where search would find the style's rows, were its catalog readable, it must be reached.
    name = {"straße-kunst": "Straße Kunst", "caf\u00e9-noir": "Caf\u00e9 Noir", "banksy": "Banksy",
            "andy-warhol": "Andy Warhol", "vincent-van-gogh": "Vincent Van Gogh"}[slug]  # fmt: skip
    frame = pd.DataFrame([{"subject": "x", "style": name, "model_id": "m", "run_id": "r", "steps": 50}])
    assert catalog.search(frame, style=style, where=where).empty is not reached


def test_search_finds_an_image_by_prompt_by_its_file_and_by_whole_settings(tmp_path):
    store = LocalStore(tmp_path)
    turing, lovelace = _row("alan turing", "Banksy"), _row("ada lovelace", "Banksy")
    records = [_store_image(store, turing, "r1"), _store_image(store, lovelace, "r1")]
    records.append({**_store_image(store, _row("alan turing", "Banksy", 1), "r2"), "steps": 50, "safety_checker": True})
    frame = pd.DataFrame(records)

    assert list(catalog.search(frame, prompt="TURING BY")["image_index"]) == [0, 1]
    # A PNG's name, or its path in the store, finds its own row.
    path = tmp_path / image_key_path(lovelace.key)
    for given in (path.name, str(path), lovelace.key[:10], path.name.upper()):
        assert list(catalog.search(frame, key=given)["subject"]) == ["ada lovelace"], given
    # Whole values: a number as a number, a flag as true/false, text in any case.
    assert list(catalog.search(frame, where={"steps": "50.0"})["image_index"]) == [1]
    assert list(catalog.search(frame, where={"steps": "5"})["image_index"]) == []
    assert len(catalog.search(frame, where={"safety_checker": "False", "scheduler": "pndmscheduler"})) == 2
    assert catalog.search(frame, where={"scheduler": "PNDM"}).empty, "a part of the value is not the value"
    # From Python, a number or a flag as Python holds it.
    assert list(catalog.search(frame, where={"steps": 50, "safety_checker": True})["image_index"]) == [1]
    assert len(catalog.search(frame, where={"safety_flagged": False, "guidance_scale": 7.5})) == 3
    for where, message in [
        ({"sampler": "x"}, r"no catalog column 'sampler'; the columns are key, subject, "),
        ({"steps": "many"}, r"steps is a number, not 'many'"),
        ({"steps": "4_0"}, r"steps is a number, not '4_0'"),  # Python reads it as 40
        ({"safety_flagged": "yes"}, r"safety_flagged is true or false, not 'yes'"),
    ]:
        with pytest.raises(SdAssetsError, match=message):
            catalog.search(frame, where=where)


def _made(row: PromptRow, run_id: str, steps: int = 2, created: str = "2026-11-27T00:00:00+00:00") -> dict:
    """The catalog row of ``row`` made by ``run_id``."""
    return catalog.catalog_record(replace(_provenance(row, run_id), steps=steps, created=created), "")


def test_style_pages_paginate_escape_and_link_relatively(tmp_path):
    store = LocalStore(tmp_path)
    rows = [_row(f"subject {i}", "Banksy") for i in range(5)] + [_row("<script>alert(1)</script>", "Banksy")]
    made = [_made(r, "3f2a1b2c-run") for r in rows[:4]]
    written = gallery.render_style_pages(store, "Banksy", rows, made, page_size=4)
    assert written.pages == ["gallery/banksy/page-1.html", "gallery/banksy/page-2.html"]
    assert written.earlier_pages == [] and written.earlier_images == 0 and written.written == 2
    first = store.read_text(written.pages[0])
    assert first.count("<img ") == 4 and "4 of 6 images made" in first
    # The settings the grid's images were made with (as the catalog has them), above them.
    assert "Grid settings: 2 steps · 64x64 · guidance 7.5 · PNDMScheduler · tiny-random@0000000 · float32 on cpu<" in first
    assert f'src="../../images/{rows[0].key[:2]}/{rows[0].key}.png"' in first
    # The run's first 8 characters, and its whole id on hover (to find it in Dagster).
    assert f'seed {rows[0].seed} · image_index 0 · <span title="run 3f2a1b2c-run">run 3f2a1b2c</span>' in first
    assert 'href="page-2.html"' in first
    assert "earlier" not in first
    second = store.read_text(written.pages[1])
    assert "<script>alert" not in second and "&lt;script&gt;" in second
    assert second.count("not made yet") == 2 and "run " not in second
    assert "counts and the last generation are on" in second and "images made" not in second
    # Nothing changed: nothing written again.
    assert gallery.render_style_pages(store, "Banksy", rows, made, page_size=4).written == 0
    store.delete(written.pages[1])  # ... unless a page went missing
    assert gallery.render_style_pages(store, "Banksy", rows, made, page_size=4).written == 1
    # A smaller grid later removes the page that no longer exists.
    gallery.render_style_pages(store, "Banksy", rows[:2], made, page_size=4)
    assert not store.exists(written.pages[1])
    assert "1 of 1 image made" in store.read_text(
        gallery.render_style_pages(store, "Banksy", rows[:1], made[:1]).pages[0]
    )
    gallery.render_style_pages(store, "Banksy", rows, made, page_size=4)
    # A new image on page 2 and a new profile: page 2 for its image, page 1 for the counts, no more.
    profile = {"made_by": "Run r2, ended 2026-12-07 04:00 UTC.",
               "summary": "CPU: no GPU utilisation measured (1.0 s of generation).", "chart_svg": ""}  # fmt: skip
    pages = gallery.render_style_pages(store, "Banksy", rows, made + [_made(rows[4], "r2")], 4, profile)
    assert pages.written == 2 and "5 of 6 images made" in store.read_text(written.pages[0])
    # Later runs that add images to page 2 leave page 1's images as they were, but not its counts.
    rows_on_three_pages = rows + [_row(f"late {i}", "Banksy") for i in range(4)]
    third = gallery.render_style_pages(store, "Banksy", rows_on_three_pages, made + [_made(rows[4], "r2")], 4, profile)
    assert third.written == 3, "a page more: every page's pager changes"
    more = made + [_made(rows[4], "r2"), _made(rows_on_three_pages[8], "r3")]
    assert gallery.render_style_pages(store, "Banksy", rows_on_three_pages, more, 4, profile).written == 2


def test_pages_say_the_tiny_models_images_are_noise_and_only_its(tmp_path):
    store = LocalStore(tmp_path)
    rows = [_row("alan turing", "Banksy"), _row("ada lovelace", "Banksy")]
    tiny = [_made(row, "r1") for row in rows]
    real = [{**record, "model_id": "org/sd-real"} for record in tiny]
    pages = {
        name: store.read_text(gallery.render_style_pages(store, name, rows, made).pages[0])
        for name, made in (("Tiny", tiny), ("Real", real), ("Nothing made", []))
    }
    assert "noise by design" in pages["Tiny"]
    assert "noise by design" not in pages["Real"] and "noise by design" not in pages["Nothing made"]
    # The grid moved to a real model: its pages have no note, the earlier pages of noise do.
    switched = gallery.render_style_pages(store, "Switched", rows, real + [_made(_row("grace hopper", "Banksy"), "r0")])
    assert "noise by design" not in store.read_text(switched.pages[0])
    assert "noise by design" in store.read_text(switched.earlier_pages[0])
    summaries = [gallery.StyleSummary("Banksy", 2, 2, has_pages=True)]
    for model_id, noted in (("tiny-random", True), ("org/sd-real", False)):
        gallery.render_index(store, summaries, {"Banksy": rows}, {row.key for row in rows}, model_id=model_id)
        assert ("noise by design" in store.read_text(gallery.INDEX_KEY)) == noted, model_id


def test_read_catalog_has_the_records_no_run_merged_yet_as_the_merge_would_keep_them(tmp_path):
    store = LocalStore(tmp_path)
    alan, ada = _row("alan turing", "Banksy"), _row("ada lovelace", "Banksy")
    mary, lise = _row("mary somerville", "Banksy"), _row("lise meitner", "Banksy")
    grace = _row("grace hopper", "Andy Warhol")
    catalog.write_pending(store, "Banksy", "r1", [_store_image(store, row, "r1") for row in (alan, mary, lise)])
    catalog.merge_catalog(store, "Banksy", [alan, mary, lise])
    # A stale record (older than the catalog's) loses; one as old as the catalog's wins, as in a merge.
    stale = {**_store_image(store, mary, "r0"), "created": "2026-11-26T00:00:00+00:00"}
    catalog.write_pending(store, "Banksy", "r0-000001", [stale, _store_image(store, lise, "r5")])
    # A later run made alan again (its PNG deleted) and ada, then failed before its merge; a
    # run of a style with no catalog yet was killed after its first batch.
    remade = {**_store_image(store, alan, "r2"), "created": "2026-11-28T00:00:00+00:00"}
    catalog.write_pending(store, "Banksy", "r2-000001", [remade, _store_image(store, ada, "r2")])
    catalog.write_pending(store, "Andy Warhol", "r3-000001", [_store_image(store, grace, "r3")])

    frame = catalog.read_catalog(store)
    assert list(zip(frame["subject"], frame["run_id"])) == [
        ("grace hopper", "r3"),
        ("ada lovelace", "r2"), ("alan turing", "r2"), ("lise meitner", "r5"), ("mary somerville", "r1"),
    ], "each image once, with the record a merge keeps; styles in slug order"  # fmt: skip
    assert store.exists(catalog.catalog_key("Banksy")) and not store.exists(catalog.catalog_key("Andy Warhol"))
    # Reading merged nothing: the next run of each style still finds its records waiting, and
    # its merge keeps what the read showed.
    assert len(list(store.list_keys(catalog.PENDING_PREFIX))) == 3
    merged, _report = catalog.merge_catalog(store, "Banksy", [alan, ada, mary, lise])
    assert sorted(zip(merged["subject"].to_pylist(), merged["run_id"].to_pylist())) == sorted(
        (subject, run) for subject, run in zip(frame["subject"], frame["run_id"]) if subject != "grace hopper"
    )

    # A batch that is not one leaves out its own records, named; the others are read.
    store.write_bytes(catalog.pending_prefix("Andy Warhol") + "r4-000001.jsonl", b"{not json")
    with pytest.raises(catalog.CatalogUnreadable, match=r"r4-000001.jsonl is not a readable batch"):
        catalog.read_catalog(store)
    unreadable: list[catalog.UnreadableCatalog] = []
    frame = catalog.read_catalog(store, unreadable)
    assert len(frame) == 5 and "grace hopper" in set(frame["subject"])
    assert [(entry.slug, entry.key) for entry in unreadable] == [
        ("andy-warhol", catalog.pending_prefix("Andy Warhol") + "r4-000001.jsonl")
    ]


def test_read_catalog_finds_every_row_while_a_merge_moves_them(tmp_path):
    rows = [_row("alan turing", "Banksy"), _row("ada lovelace", "Banksy")]
    writer = LocalStore(tmp_path)
    catalog.write_pending(writer, "Banksy", "r1-000001", [_store_image(writer, row, "r1") for row in rows])

    class MergedRightAfterListing(LocalStore):
        """A store in which the style's image_catalog merges just after a reader lists the batches."""

        def list_keys(self, prefix):
            keys = list(super().list_keys(prefix))
            if prefix == catalog.PENDING_PREFIX:
                catalog.merge_catalog(writer, "Banksy", rows)
            return iter(keys)

    frame = catalog.read_catalog(MergedRightAfterListing(tmp_path))
    assert sorted(frame["subject"]) == ["ada lovelace", "alan turing"]
    assert not list(writer.list_keys(catalog.PENDING_PREFIX)), "the batch was merged away under the reader"


def test_a_captions_prompt_is_isolated_so_its_direction_marks_stop_at_its_end(tmp_path):
    # A right-to-left override in a subject would otherwise turn the seed and run after it around.
    store = LocalStore(tmp_path)
    row = _row("alan \u202eturing", "Banksy")
    page = store.read_text(gallery.render_style_pages(store, "Banksy", [row], [_made(row, "r1")]).pages[0])
    # The subject has its own: the override stops before " by Banksy" too.
    assert "<figcaption><bdi><bdi>alan \u202eturing</bdi> by Banksy</bdi><br>" in page
    # A subject whose text the prompt holds twice is not guessed at: only the prompt is isolated.
    art = replace(_row("art", "Banksy"), prompt="digital art portrait of art by Banksy")
    page = store.read_text(gallery.render_style_pages(store, "Banksy", [art], [_made(art, "r1")]).pages[0])
    assert "<figcaption><bdi>digital art portrait of art by Banksy</bdi><br>" in page


def test_an_image_the_safety_checker_blacked_out_says_so_under_it(tmp_path):
    store = LocalStore(tmp_path)
    rows = [_row("alan turing", "Banksy"), _row("ada lovelace", "Banksy")]
    made = [_made(rows[0], "r1"), {**_made(rows[1], "r1"), "safety_flagged": True}]
    page = store.read_text(gallery.render_style_pages(store, "Banksy", rows, made).pages[0])
    alan, ada = page.split("<figure>")[1:]
    assert "flagged by the safety checker (blacked out)" in ada and "flagged" not in alan


def test_images_of_earlier_grids_get_pages_of_their_own_newest_first(tmp_path):
    store = LocalStore(tmp_path)
    now = [_row("alan turing", "Banksy", i) for i in range(2)]
    before = [_row("ada lovelace", "Banksy", i) for i in range(3)]
    made = [_made(r, "run-now") for r in now] + [
        _made(row, f"run-{i}", steps=4, created=f"2026-11-2{i}T00:00:00+00:00") for i, row in enumerate(before)
    ]
    made[-1]["negative_prompt"] = "blurry"  # differs only there from the row before it
    made[2]["deep_cache"] = "interval 3, branch 0"  # the oldest, made with DeepCache
    written = gallery.render_style_pages(store, "Banksy", now, made, page_size=2)
    assert written.pages == ["gallery/banksy/page-1.html"]
    assert written.earlier_pages == ["gallery/banksy/earlier-1.html", "gallery/banksy/earlier-2.html"]
    assert written.earlier_images == 3
    first = store.read_text(written.pages[0])
    assert '<a href="earlier-1.html">3 earlier images</a> of this style' in first
    # The counts are the grid's: its earlier images are not among the ones it made.
    assert "2 of 2 images made" in first and "5 of 2" not in first
    assert "ada lovelace" not in first
    earlier = store.read_text(written.earlier_pages[0])
    assert "Banksy: earlier images" in earlier and 'href="page-1.html"' in earlier and 'href="earlier-2.html"' in earlier
    assert "of this style not in its grid now (subjects its lists no longer hold, other settings or models)" in earlier
    # Newest first, each with what made it.
    runs = re.findall(r">run (run-\d)<", earlier + store.read_text(written.earlier_pages[1]))
    assert runs == ["run-2", "run-1", "run-0"]
    assert earlier.count("4 steps · 64x64 · guidance 7.5 · PNDMScheduler · tiny-random@0000000 · float32 on cpu · 2026-11-2") == 1
    assert "· 2026-11-20 00:00 UTC" in store.read_text(written.earlier_pages[1])
    assert "4 steps · 64x64 · guidance 7.5 · PNDMScheduler · tiny-random@0000000 · negative prompt: blurry" in earlier
    assert "tiny-random@0000000 · DeepCache interval 3, branch 0 · float32 on cpu · 2026-11-20 00:00 UTC" in store.read_text(
        written.earlier_pages[1]
    )
    assert f'src="../../images/{before[2].key[:2]}/{before[2].key}.png"' in earlier

    # Back to the grid that made them: no earlier images left, and their pages go.
    written = gallery.render_style_pages(store, "Banksy", now + before, made)
    assert written.earlier_pages == [] and not store.exists("gallery/banksy/earlier-1.html")
    assert "earlier" not in store.read_text(written.pages[0])


def test_one_runs_earlier_images_stay_in_subject_order_whatever_second_each_was_written(tmp_path):
    store = LocalStore(tmp_path)
    subjects = ["zeno", "alan turing", "ada lovelace"]
    old = [_row(subject, "Banksy") for subject in subjects]
    # One run over two seconds, zeno written last; an older run's one image; one step each.
    made = [_made(row, "run-b", steps=1, created=f"2026-11-27T10:00:0{i}+00:00") for i, row in enumerate(old)]
    made.append(_made(_row("grace hopper", "Banksy"), "run-a", steps=1, created="2026-11-26T09:00:00+00:00"))
    written = gallery.render_style_pages(store, "Banksy", [_row("new", "Banksy")], made)
    earlier = store.read_text(written.earlier_pages[0])
    order = re.findall(r"<figcaption><bdi><bdi>(.*?)</bdi> by Banksy</bdi><br>", earlier)
    assert order == ["ada lovelace", "alan turing", "zeno", "grace hopper"]
    assert "1 step · 64x64" in earlier and "1 steps" not in earlier


def test_a_pager_links_a_bounded_set_of_pages():
    assert gallery.pager_numbers(1, 3) == [1, 2, 3]
    assert gallery.pager_numbers(1, 1250) == [1, 2, 3, None, 1250]
    assert gallery.pager_numbers(600, 1250) == [1, None, 598, 599, 600, 601, 602, None, 1250]
    assert gallery.pager_numbers(1250, 1250) == [1, None, 1248, 1249, 1250]
    # Every page is linked or stands behind an ellipsis; one page alone between two links is linked.
    assert gallery.pager_numbers(5, 10) == [1, 2, 3, 4, 5, 6, 7, None, 10]
    assert gallery.pager_numbers(6, 10) == [1, None, 4, 5, 6, 7, 8, 9, 10]
    assert gallery.pager_numbers(3, 7) == [1, 2, 3, 4, 5, 6, 7]


def test_index_lists_styles_and_a_contact_sheet(tmp_path):
    store = LocalStore(tmp_path)
    banksy = [_row("alan turing", "Banksy", i) for i in range(2)]
    warhol = [_row("alan turing", "Andy Warhol", i) for i in range(2)]
    frida = [_row("alan turing", "Frida Kahlo", i) for i in range(2)]
    present = {banksy[0].key, banksy[1].key, warhol[0].key}
    summaries = [
        gallery.StyleSummary("Banksy", 2, 2, has_pages=True),
        gallery.StyleSummary("Andy Warhol", 2, 1, has_pages=True),
        gallery.StyleSummary("Frida Kahlo", 2, 0, has_pages=False),  # its first run has not made pages yet
    ]
    rows = {"Banksy": banksy, "Andy Warhol": warhol, "Frida Kahlo": frida}
    others = [gallery.StyleSummary("Claude Monet", 1, 1, has_pages=True)]  # in the store, not in the grid
    gallery.render_index(store, summaries, rows, present, other_styles=others)
    html = store.read_text(gallery.INDEX_KEY)
    assert 'href="banksy/page-1.html"' in html and 'href="andy-warhol/page-1.html"' in html
    assert "frida-kahlo/" not in html and "<li>Frida Kahlo (no gallery pages yet): 0 of 2 images</li>" in html
    assert "1 of 2 images" in html and "3 of 6 images of the grid made, across 3 styles" in html
    assert 'Other styles in this store</h2>' in html and '<a href="claude-monet/page-1.html">Claude Monet</a>: 1 image<' in html
    assert "Their pages are as the style's last run left them: their counts and settings are those of the grid it ran" in html
    cells = re.findall(r'<img src="\.\./images/[0-9a-f]{2}/([0-9a-f]+)\.png"', html)
    assert cells == [banksy[0].key, warhol[0].key], "image_index 0 of each subject in each style"
    assert html.count(">not made yet<") == 1, "Frida Kahlo's cell"


def test_the_index_names_every_style_whose_catalog_could_not_be_read(tmp_path):
    store = LocalStore(tmp_path)
    rows = {style: [_row("alan turing", style)] for style in ("Banksy", "Andy Warhol", "Frida Kahlo")}
    summaries = [
        gallery.StyleSummary("Banksy", 1, 0, has_pages=True, unreadable=True),
        gallery.StyleSummary("Andy Warhol", 1, 1, has_pages=True),
        gallery.StyleSummary("Frida Kahlo", 1, 0, has_pages=True, unreadable=True),
    ]
    others = [gallery.StyleSummary("claude-monet", 0, 0, has_pages=False, unreadable=True)]
    gallery.render_index(store, summaries, rows, {rows["Andy Warhol"][0].key}, other_styles=others)
    html = store.read_text(gallery.INDEX_KEY)
    assert ("The catalogs of Banksy, Frida Kahlo, claude-monet could not be read, so their images are not counted "
            "or shown here; <code>sd-assets rebuild-catalog</code> rebuilds them") in html  # fmt: skip
    assert ">Banksy</a>: ? of 1 image (catalog unreadable)</li>" in html
    assert "<li>claude-monet: catalog unreadable</li>" in html
    assert html.count(">catalog unreadable</span>") == 2 and "not made yet" not in html

    gallery.render_index(store, summaries[1:2], {"Andy Warhol": rows["Andy Warhol"]}, {rows["Andy Warhol"][0].key})
    assert "could not be read" not in store.read_text(gallery.INDEX_KEY)


def test_the_index_and_contact_sheet_show_subjects_and_styles_as_text(tmp_path):
    store = LocalStore(tmp_path)
    subject, style = "<script>alert(1)</script> & co", "Tom & Jerry"
    rows = {style: [_row(subject, style)]}
    present = {rows[style][0].key}
    gallery.render_index(store, [gallery.StyleSummary(style, 1, 1, has_pages=True)], rows, present)
    index = store.read_text(gallery.INDEX_KEY)
    assert "&lt;script&gt;alert(1)&lt;/script&gt; &amp; co" in index and "Tom &amp; Jerry" in index
    assert "<script>" not in index


def test_a_contact_sheet_of_many_subjects_goes_on_pages_written_only_when_they_change(tmp_path):
    store = LocalStore(tmp_path)
    per_page = gallery.CONTACT_PAGE_SUBJECTS
    rows = {"Banksy": [_row(f"subject {i:03d}", "Banksy") for i in range(2 * per_page + 5)]}
    present = {row.key for row in rows["Banksy"]}
    summaries = [gallery.StyleSummary("Banksy", len(present), len(present), has_pages=True)]
    gallery.render_index(store, summaries, rows, present)

    index = store.read_text(gallery.INDEX_KEY)
    assert index.count("<tr><th>subject ") == per_page
    assert "subject 000<" in index and f"subject {per_page:03d}<" not in index
    assert '<a href="_contact/page-2.html">next &rarr;</a>' in index and '<a href="_contact/page-3.html">3</a>' in index
    second = store.read_text("gallery/_contact/page-2.html")
    assert "Contact sheet, page 2 of 3" in second and '<a href="../index.html">Gallery</a>' in second
    assert '<a href="../index.html#contact-sheet">&larr; previous</a>' in second
    assert '<a href="page-3.html">3</a>' in second
    first_cell = rows["Banksy"][per_page].key
    assert f'<img src="../../images/{first_cell[:2]}/{first_cell}.png"' in second
    assert store.read_text("gallery/_contact/page-3.html").count("<tr><th>subject ") == 5

    # A run that changes nothing on them leaves the contact pages as they are; the index has the counts.
    pages = {p.name: p.stat().st_mtime_ns for p in (tmp_path / "gallery" / "_contact").glob("*.html")}
    fewer = {"Banksy": rows["Banksy"][: per_page + 1]}
    gallery.render_index(store, summaries, rows, present)
    assert {p.name: p.stat().st_mtime_ns for p in (tmp_path / "gallery" / "_contact").glob("*.html")} == pages
    gallery.render_index(store, summaries, fewer, present)
    assert sorted(p.name for p in (tmp_path / "gallery" / "_contact").glob("*.html")) == ["page-2.html"]
    # A record that is JSON but not one (written by hand, say) means: write every page again.
    store.write_text("gallery/_contact/pages.json", "null")
    gallery.render_index(store, summaries, fewer, present)
    assert json.loads(store.read_text("gallery/_contact/pages.json")) != {}
    # A style named Contact keeps its own pages beside the contact sheet's.
    contact = [_row("alan turing", "Contact")]
    gallery.render_style_pages(store, "Contact", contact, [_made(contact[0], "r1")])
    gallery.render_index(store, summaries, rows, present)
    assert store.exists("gallery/contact/page-1.html") and store.exists("gallery/_contact/page-3.html")


def test_a_rebuild_in_chunks_gives_the_rows_reports_and_errors_of_one_read_whole(tmp_path, monkeypatch):
    # Chunks bound its memory; what it finds must not depend on where a chunk ends: a copy of an
    # image in another chunk, a misfit, two styles across chunks.
    def store_at(folder) -> LocalStore:
        store = LocalStore(folder)
        for n in range(7):
            row = _row(f"subject {n}", ("Banksy", "Andy Warhol")[n % 2])
            _store_image(store, row, f"r{n}")
            if n == 1:
                copy = store.read_bytes(image_key_path(row.key))
                store.write_bytes(f"images/ff/{row.key} (copy).png", copy)  # listed last: another chunk
        odd = _row("odd seed", "Banksy")
        misfit = replace(_provenance(odd, "r"), seed="x")
        store.write_bytes(image_key_path(odd.key), encode_png(Image.new("RGB", (8, 8)), misfit))
        return store

    whole = catalog.rebuild_catalogs(store_at(tmp_path / "whole"))
    monkeypatch.setattr(catalog, "REBUILD_CHUNK", 2)
    chunked_store = store_at(tmp_path / "chunked")
    chunked = catalog.rebuild_catalogs(chunked_store)

    def rows(folder) -> list[tuple]:
        table = catalog.read_catalog(LocalStore(folder))
        return sorted(zip(table["key"], table["style"], table["run_id"]))

    assert rows(tmp_path / "chunked") == rows(tmp_path / "whole") and len(rows(tmp_path / "whole")) == 7
    assert [(r.catalog, r.rows, r.recovered_from_png) for r in chunked.reports] == [
        (r.catalog, r.rows, r.recovered_from_png) for r in whole.reports] == [
        ("catalog/andy-warhol.parquet", 3, 3), ("catalog/banksy.parquet", 4, 4)]  # fmt: skip
    assert [e.replace(str(tmp_path / "chunked"), "") for e in chunked.errors] == [
        e.replace(str(tmp_path / "whole"), "") for e in whole.errors] and len(whole.errors) == 1  # fmt: skip
    assert chunked.images == whole.images == 9


def test_rebuild_gives_an_image_copied_under_another_name_one_row(tmp_path):
    # A PNG copied in the store (a sync tool's "copy", a hand-made backup) carries its provenance
    # along: the same content key. The rebuild reads both files, and the catalog gets one row for it.
    store = LocalStore(tmp_path)
    row = _row("alan turing", "Banksy")
    _store_image(store, row, "r1")
    png = store.read_bytes(image_key_path(row.key))
    store.write_bytes(f"images/{row.key[:2]}/{row.key} (copy).png", png)
    rebuild = catalog.rebuild_catalogs(store)
    assert rebuild.images == 2 and rebuild.errors == []
    [report] = rebuild.reports
    assert (report.rows, report.recovered_from_png) == (1, 1)
    assert catalog.read_catalog(store)["key"].tolist() == [row.key]


def test_a_grid_made_in_two_dtypes_says_which_under_its_images_and_its_earlier_images_once(tmp_path):
    store = LocalStore(tmp_path)
    rows = [_row(f"subject {i}", "Banksy") for i in range(3)]
    made = [_made(rows[0], "r1"), {**_made(rows[1], "r2"), "dtype": "bfloat16"}]
    earlier = {**_made(_row("gone", "Banksy"), "r0", steps=4), "dtype": "bfloat16"}
    written = gallery.render_style_pages(store, "Banksy", rows, [*made, earlier])
    page = store.read_text(written.pages[0])
    assert "· made in bfloat16 on cpu (1 image), float32 on cpu (1 image)</p>" in page
    assert page.count("</span> · float32 on cpu") == page.count("</span> · bfloat16 on cpu") == 1
    earlier_page = store.read_text(written.earlier_pages[0])
    assert earlier_page.count("bfloat16 on cpu") == 1 and "4 steps · 64x64" in earlier_page
