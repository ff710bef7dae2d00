"""The asset graph end to end on the embedded default: images, catalog, galleries, idempotence."""

import hashlib
import io
import json
import logging
import re
import shutil
from html import escape
from pathlib import Path

import dagster as dg
import diffusers
import numpy as np
import pandas as pd
import pytest
import torch
import transformers
from PIL import Image

from sd_assets import cli
from sd_assets.definitions import build_definitions
from sd_assets.domain.pngmeta import read_provenance
from sd_assets_tests.helpers import materialize_style, write_grid

STYLES = ("Banksy", "Andy Warhol")


def _metadata(result, asset: str) -> dict:
    [event] = [
        e for e in result.get_asset_materialization_events() if e.asset_key.to_user_string() == asset
    ]
    materialization = event.step_materialization_data.materialization
    return {k: v.value for k, v in materialization.metadata.items()} | {
        "data_version": materialization.tags.get("dagster/data_version")
    }


def _pngs(root):
    return {p.name: p.stat().st_mtime_ns for p in (root / "images").rglob("*.png")}


def test_two_styles_make_images_catalog_and_gallery(grid_path, instance):
    data = grid_path.parent / "data"
    results = {style: materialize_style(grid_path, style, instance) for style in STYLES}

    images = _pngs(data)
    assert len(images) == 2 * 2 * 2, "2 styles x 2 subjects x 2 images"
    for result in results.values():
        meta = _metadata(result, "style_images")
        assert meta["generated"] == 4 and meta["skipped"] == 0 and meta["device"] == "cpu"
        assert meta["images_per_minute"] > 0 and meta["previews"].count("](data:image/jpeg;base64,") == 4
        # The first images of the grid, in its order, each with its caption: alike in every style.
        # (Markdown's own characters escaped: "_" would start italics.)
        captions = re.findall(r"\*\*(.*?)\*\*", meta["previews"])
        assert captions == ["alan turing, image\\_index 0", "alan turing, image\\_index 1",
                            "ada lovelace, image\\_index 0", "ada lovelace, image\\_index 1"]  # fmt: skip
    # The second style reuses the pipeline this process loaded for the first: a dict lookup, not a load.
    loads = {style: _metadata(result, "style_images")["model_load_seconds"] for style, result in results.items()}
    assert loads["Andy Warhol"] < loads["Banksy"], loads

    catalog = pd.concat(pd.read_parquet(p) for p in (data / "catalog").glob("*.parquet"))
    assert len(catalog) == 8 and set(catalog["style"]) == set(STYLES)
    assert set(catalog["run_id"]) == {r.run_id for r in results.values()}
    assert set(catalog["model_id"]) == {"tiny-random"} and set(catalog["steps"]) == {2}
    assert set(catalog["model_variant"]) == {""}
    assert set(catalog["software"]) == {
        f"torch {torch.__version__}, diffusers {diffusers.__version__}, transformers {transformers.__version__}"
    }
    for row in catalog.itertuples():
        provenance = read_provenance((data / row.path.split("/data/", 1)[1]).read_bytes())
        assert (provenance.key, provenance.seed, provenance.prompt) == (row.key, row.seed, row.prompt)
        with Image.open(row.path) as image:
            assert image.size == (64, 64) and image.mode == "RGB"
            assert image.text["parameters"].splitlines()[0] == row.prompt

    # A contact-sheet row compares styles under the same starting noise.
    seeds = catalog.pivot_table(index=["subject", "image_index"], columns="style", values="seed")
    assert (seeds["Banksy"] == seeds["Andy Warhol"]).all()

    index = (data / "gallery" / "index.html").read_text()
    assert "8 of 8 images of the grid made, across 2 styles" in index
    # The demo's model makes noise, and its pages say so where the images are.
    assert "<code>tiny-random</code>, the model with random weights" in index and "noise by design" in index
    assert "noise by design" in (data / "gallery" / "andy-warhol" / "page-1.html").read_text()


def test_the_gallery_follows_the_grid_and_keeps_earlier_images_in_reach(grid_path, instance):
    data = grid_path.parent / "data"
    for style in STYLES:
        materialize_style(grid_path, style, instance)
    # New settings: Banksy runs again and makes 4 new images; Andy Warhol has not run since.
    grid_path.write_text(grid_path.read_text().replace("steps: 2", "steps: 3"))
    changed = materialize_style(grid_path, "Banksy", instance)

    # What the UI shows of each step: the catalog keeps the old grid's rows beside the new grid's,
    # the pages show the new grid's images and link the old ones, the index counts the grid's.
    catalog = _metadata(changed, "image_catalog")
    counts = ("rows", "rows_of_current_grid", "added", "replaced", "recovered_from_png", "runs")
    assert [catalog[name] for name in counts] == [8, 4, 4, 0, 0, 2]
    assert catalog["path"] == str(data / "catalog" / "banksy.parquet")
    pages = _metadata(changed, "style_gallery")
    assert (pages["pages"], pages["images_shown"], pages["earlier_images"]) == (1, 4, 4)
    assert pages["first_page"] == str(data / "gallery" / "banksy" / "page-1.html")
    index_meta = _metadata(changed, "gallery_index")
    assert (index_meta["styles"], index_meta["images"], index_meta["grid_images"]) == (2, 4, 8)
    assert index_meta["index"] == str(data / "gallery" / "index.html")

    index = (data / "gallery" / "index.html").read_text()
    assert '<a href="banksy/page-1.html">Banksy</a>: 4 of 4 images' in index
    assert '<a href="andy-warhol/page-1.html">Andy Warhol</a>: 0 of 4 images' in index
    assert "4 of 8 images of the grid made, across 2 styles" in index
    # The settings of the grid now, which made Banksy's new images: not those Andy Warhol's older ones had.
    settings = (
        r'<p class="settings">Grid settings: 3 steps · 64x64 · guidance 7.5 · PNDMScheduler · tiny-random@[0-9a-f]{7} '
        r"· float32 on cpu</p>"
    )
    assert re.search(settings, index), index
    page = (data / "gallery" / "banksy" / "page-1.html").read_text()
    assert "Grid settings: 3 steps · 64x64" in page and page.count("<img ") == 4
    # The page says which run wrote it, and when: a style not run since keeps its older pages.
    assert re.search(r"4 of 4 images made, as of run [0-9a-f]{8}, \d{4}-\d\d-\d\d \d\d:\d\d UTC\.", page)
    assert '<a href="earlier-1.html">4 earlier images</a> of this style' in page
    earlier = (data / "gallery" / "banksy" / "earlier-1.html").read_text()
    assert earlier.count("<img ") == 4 and earlier.count("2 steps · 64x64 · guidance 7.5") == 4
    for page_html in (page, earlier):  # every image link is a PNG in the store
        for link in re.findall(r'<img src="([^"]+)"', page_html):
            assert (data / "gallery" / "banksy" / link).resolve().is_file(), link

    # A grid with other styles: the ones it lacks stay listed, with their pages.
    grid_path.write_text(
        grid_path.read_text().replace("styles: [Banksy, Andy Warhol]", "styles: [Banksy, Claude Monet]")
    )
    materialize_style(grid_path, "Banksy", instance)
    index = (data / "gallery" / "index.html").read_text()
    assert "<li>Claude Monet (no gallery pages yet): 0 of 4 images</li>" in index
    assert "Other styles in this store" in index
    assert '<a href="andy-warhol/page-1.html">Andy Warhol</a>: 4 images' in index
    assert "a style's own pages are as of its last run" in index


def test_second_run_makes_nothing_and_a_new_subject_makes_exactly_its_images(grid_path, instance):
    data = grid_path.parent / "data"
    first = {style: materialize_style(grid_path, style, instance) for style in STYLES}
    before = _pngs(data)
    assert len(before) == 8

    again = materialize_style(grid_path, "Banksy", instance)
    meta = _metadata(again, "style_images")
    assert meta["generated"] == 0 and meta["skipped"] == 4
    assert _pngs(data) == before, "no image was written again"
    assert meta["data_version"] == _metadata(first["Banksy"], "style_images")["data_version"]

    (grid_path.parent / "subjects" / "more.txt").write_text("grace hopper\n")
    grown = {style: materialize_style(grid_path, style, instance) for style in STYLES}
    after = _pngs(data)
    assert {k: v for k, v in after.items() if k in before} == before, "old images untouched"
    assert len(after) == len(before) + len(STYLES) * 2, "styles x images_per_prompt new images"
    for style in STYLES:
        meta = _metadata(grown[style], "style_images")
        assert meta["generated"] == 2 and meta["skipped"] == 4
        assert meta["data_version"] != _metadata(first[style], "style_images")["data_version"]
    grid_rows = json.loads((data / "grids" / "banksy.json").read_text())
    assert sorted({r["subject"] for r in grid_rows}) == ["ada lovelace", "alan turing", "grace hopper"]


def test_a_crash_after_writing_pngs_loses_no_catalog_rows(grid_path, instance):
    data = grid_path.parent / "data"
    materialize_style(grid_path, "Banksy", instance)
    # As if the run had died after the PNGs were written but before their records were merged.
    (data / "catalog" / "banksy.parquet").unlink()
    shutil.rmtree(data / "catalog" / "pending", ignore_errors=True)
    result = materialize_style(grid_path, "Banksy", instance)
    meta = _metadata(result, "image_catalog")
    assert meta["recovered_from_png"] == 4 and meta["rows"] == 4
    assert _metadata(result, "style_images")["generated"] == 0


def test_an_image_made_again_after_its_png_was_deleted_has_the_new_runs_catalog_row(grid_path, instance):
    data = grid_path.parent / "data"
    first = materialize_style(grid_path, "Banksy", instance)
    [deleted, *_] = sorted((data / "images").rglob("*.png"))
    deleted.unlink()
    second = materialize_style(grid_path, "Banksy", instance)
    assert _metadata(second, "style_images")["generated"] == 1
    meta = _metadata(second, "image_catalog")
    assert (meta["rows"], meta["added"], meta["replaced"]) == (4, 0, 1)
    rows = pd.read_parquet(data / "catalog" / "banksy.parquet")
    run_of = dict(zip(rows["key"], rows["run_id"]))
    assert run_of.pop(deleted.stem) == second.run_id == read_provenance(deleted.read_bytes()).run_id
    assert set(run_of.values()) == {first.run_id}


def test_the_ui_marks_a_style_stale_when_its_inputs_change_and_fresh_once_regenerated(
    grid_path, instance, monkeypatch
):
    # The same resolver the Dagster UI uses for its stale badges.
    from dagster._core.definitions.data_version import CachingStaleStatusResolver, StaleStatus
    from dagster._core.definitions.observe import observe
    from dagster._core.loader import LoadingContextForTest

    defs = build_definitions({"SD_ASSETS_GRID": str(grid_path), "SD_ASSETS_DEVICE": "cpu"})
    graph = defs.resolve_asset_graph()
    grid_inputs = graph.get(dg.AssetKey("grid_inputs")).assets_def

    def status(asset: str) -> StaleStatus:
        resolver = CachingStaleStatusResolver(instance, graph, LoadingContextForTest(instance))
        return resolver.get_status(dg.AssetKey(asset), "Banksy")

    # A run observes the grid's inputs itself: observing them again, unchanged, leaves it fresh.
    materialize_style(grid_path, "Banksy", instance)
    assert status("prompt_grid") == status("style_images") == StaleStatus.FRESH
    assert observe([grid_inputs], instance=instance).success
    assert status("prompt_grid") == status("style_images") == StaleStatus.FRESH

    (grid_path.parent / "subjects" / "more.txt").write_text("grace hopper\n")
    assert observe([grid_inputs], instance=instance).success
    assert status("prompt_grid") == StaleStatus.STALE

    materialize_style(grid_path, "Banksy", instance)
    assert status("prompt_grid") == status("style_images") == StaleStatus.FRESH

    grid_path.write_text(grid_path.read_text().replace("steps: 2", "steps: 3"))
    assert observe([grid_inputs], instance=instance).success
    assert status("prompt_grid") == StaleStatus.STALE

    # A new model revision (here: the tiny model's spec changed) makes the images stale.
    monkeypatch.setattr("sd_assets.domain.tiny_model.tiny_revision", lambda: "f" * 40)
    only_weights = defs.resolve_implicit_global_asset_job_def()
    assert only_weights.execute_in_process(asset_selection=[dg.AssetKey("model_weights")], instance=instance).success
    assert status("style_images") == StaleStatus.STALE


def test_a_prompt_grid_built_without_model_weights_in_its_run_records_the_files_it_was_built_from(grid_path, instance):
    # prompt_grid materialized alone from the UI, and the runs an asset backfill splits a style into
    # (its grid, images, catalog and pages): neither holds grid_inputs or model_weights.
    from dagster._core.definitions.data_version import CachingStaleStatusResolver, StaleStatus
    from dagster._core.definitions.observe import observe
    from dagster._core.loader import LoadingContextForTest

    defs = build_definitions({"SD_ASSETS_GRID": str(grid_path), "SD_ASSETS_DEVICE": "cpu"})
    graph = defs.resolve_asset_graph()
    job = defs.resolve_job_def("generate_images")
    for style in STYLES:
        materialize_style(grid_path, style, instance)
    (grid_path.parent / "subjects" / "more.txt").write_text("grace hopper\n")

    def status(asset: str, style: str) -> StaleStatus:
        return CachingStaleStatusResolver(instance, graph, LoadingContextForTest(instance)).get_status(
            dg.AssetKey(asset), style
        )

    alone = job.execute_in_process(
        partition_key="Banksy", asset_selection=[dg.AssetKey("prompt_grid")], instance=instance
    )
    assert _metadata(alone, "prompt_grid")["rows"] == 6, "it read the new list"
    [observation] = instance.fetch_observations(dg.AssetKey("grid_inputs"), limit=1).records
    assert observation.run_id == alone.run_id
    assert observation.asset_observation.metadata["observed_by"].value == (
        "prompt_grid (this run has no grid_inputs step)"
    )
    split = [dg.AssetKey(name) for name in ("prompt_grid", "style_images", "image_catalog", "style_gallery")]
    backfill_run = job.execute_in_process(partition_key="Andy Warhol", asset_selection=split, instance=instance)
    assert _metadata(backfill_run, "style_images")["generated"] == 2

    assert observe([graph.get(dg.AssetKey("grid_inputs")).assets_def], instance=instance).success
    assert status("prompt_grid", "Banksy") == status("prompt_grid", "Andy Warhol") == StaleStatus.FRESH
    assert status("style_images", "Andy Warhol") == StaleStatus.FRESH
    # Banksy's images were not made again: its grid is newer than they are, as the UI shows.
    assert status("style_images", "Banksy") == StaleStatus.STALE


def test_a_run_launched_from_the_uis_materialize_dialog_observes_the_grid_inputs_it_built_from(grid_path, instance):
    from dagster._core.definitions.data_version import CachingStaleStatusResolver, StaleStatus
    from dagster._core.definitions.observe import observe
    from dagster._core.loader import LoadingContextForTest

    defs = build_definitions({"SD_ASSETS_GRID": str(grid_path), "SD_ASSETS_DEVICE": "cpu"})
    graph = defs.resolve_asset_graph()
    job = defs.resolve_job_def("generate_images")
    # What the UI's Materialize dialog launches: the job with its assets selected, not its source.
    assets = [key for key in job.asset_layer.executable_asset_keys if key != dg.AssetKey("grid_inputs")]
    assert len(assets) == 6

    def ui_run() -> dg.ExecuteInProcessResult:
        result = job.execute_in_process(partition_key="Banksy", asset_selection=assets, instance=instance)
        assert result.success
        return result

    def banksy(asset: str) -> StaleStatus:
        resolver = CachingStaleStatusResolver(instance, graph, LoadingContextForTest(instance))
        return resolver.get_status(dg.AssetKey(asset), "Banksy")

    def observations() -> list:
        return instance.fetch_observations(dg.AssetKey("grid_inputs"), limit=100).records

    # The first run on a new instance: nothing had observed the grid, and a later observation of
    # the same files finds the style fresh.
    result = ui_run()
    [record] = observations()
    assert record.run_id == result.run_id
    metadata = record.asset_observation.metadata
    assert metadata["observed_by"].value == "model_weights (this run has no grid_inputs step)"
    assert metadata["subject_lists"].value == "people.txt" and metadata["subjects"].value == 2
    assert observe([graph.get(dg.AssetKey("grid_inputs")).assets_def], instance=instance).success
    assert banksy("prompt_grid") == banksy("style_images") == StaleStatus.FRESH

    # A list added after that observation: the run reads it, makes its images and records the
    # version it read, so observing again changes nothing.
    (grid_path.parent / "subjects" / "more.txt").write_text("grace hopper\n")
    meta = _metadata(ui_run(), "style_images")
    assert meta["generated"] == 2 and meta["skipped"] == 4
    assert observe([graph.get(dg.AssetKey("grid_inputs")).assets_def], instance=instance).success
    assert banksy("prompt_grid") == banksy("style_images") == StaleStatus.FRESH

    # model_weights alone (the model fetched ahead) reads no list; a whole run observes in its own step.
    before = len(observations())
    assert job.execute_in_process(asset_selection=[dg.AssetKey("model_weights")], instance=instance).success
    assert len(observations()) == before
    result = materialize_style(grid_path, "Banksy", instance)
    [latest] = instance.fetch_observations(dg.AssetKey("grid_inputs"), limit=1).records
    assert latest.run_id == result.run_id and "observed_by" not in latest.asset_observation.metadata
    assert len(observations()) == before + 1


def test_a_comment_a_new_style_or_a_subject_moved_to_another_list_leaves_every_style_fresh(
    grid_path, instance
):
    from dagster._core.definitions.data_version import CachingStaleStatusResolver, StaleStatus
    from dagster._core.definitions.observe import observe
    from dagster._core.loader import LoadingContextForTest

    materialize_style(grid_path, "Banksy", instance)
    subjects = grid_path.parent / "subjects"

    def banksy_after(edit) -> StaleStatus:
        edit()
        # The code location reloaded after the edit, as the UI's Reload or `dagster dev`'s restart does.
        defs = build_definitions({"SD_ASSETS_GRID": str(grid_path), "SD_ASSETS_DEVICE": "cpu"})
        graph = defs.resolve_asset_graph()
        assert observe([graph.get(dg.AssetKey("grid_inputs")).assets_def], instance=instance).success
        resolver = CachingStaleStatusResolver(instance, graph, LoadingContextForTest(instance))
        return resolver.get_status(dg.AssetKey("prompt_grid"), "Banksy")

    assert banksy_after(lambda: grid_path.write_text("# the demo grid\n" + grid_path.read_text())) == StaleStatus.FRESH
    new_style = grid_path.read_text().replace("[Banksy, Andy Warhol]", "[Banksy, Andy Warhol, Claude Monet]")
    assert banksy_after(lambda: grid_path.write_text(new_style)) == StaleStatus.FRESH

    def move_a_subject():
        (subjects / "people.txt").write_text("alan turing\n# more below\n")
        (subjects / "scientists.txt").write_text("ada lovelace\n")  # read after people.txt: the order stays

    assert banksy_after(move_a_subject) == StaleStatus.FRESH
    # A batch size tried changes no image's key.
    larger_batches = grid_path.read_text().replace("batch_size: 4", "batch_size: 8")
    assert banksy_after(lambda: grid_path.write_text(larger_batches)) == StaleStatus.FRESH
    # What does change a style's rows still marks it stale.
    new_subject = "ada lovelace\ngrace hopper\n"
    assert banksy_after(lambda: (subjects / "scientists.txt").write_text(new_subject)) == StaleStatus.STALE


def test_observing_the_grid_inputs_shows_which_file_and_lists_it_read_and_who_owns_them(tmp_path, instance):
    from dagster._core.definitions.observe import observe

    grid_path = write_grid(tmp_path)
    (tmp_path / "subjects" / "empty.txt").write_text("")
    defs = build_definitions({"SD_ASSETS_GRID": str(grid_path), "SD_ASSETS_DEVICE": "cpu"})
    node = defs.resolve_asset_graph().get(dg.AssetKey("grid_inputs"))
    # The UI's Definition panel: the source's owners and kinds beside the assets'.
    assert node.owners == ["team:sd-assets"] and node.kinds == {"yaml"}

    assert observe([node.assets_def], instance=instance).success
    [record] = instance.fetch_observations(dg.AssetKey("grid_inputs"), limit=1).records
    metadata = {key: value.value for key, value in record.asset_observation.metadata.items()}
    assert metadata == {
        "grid_file": str(grid_path),
        "styles": "Banksy, Andy Warhol",
        "subjects_location": str(tmp_path / "subjects"),
        "subject_lists": "people.txt",
        "subjects": 2,
        "skipped_subject_lists": "skipped subject list empty.txt: no subjects (the file is empty)",
    }


@pytest.mark.parametrize("deep_cache", ["", ", deep_cache: {interval: 2}"], ids=["full", "deep-cache"])
def test_a_compiled_run_reports_its_compile_time_and_makes_the_same_pictures(
    tmp_path, tiny_model_store, instance, deep_cache
):
    # The same three images, once eager and once with the UNet and the VAE decoder compiled.
    # With DeepCache, the UNet's full and short paths are compiled, two graphs.
    stores = {}
    for name, inference in (("eager", deep_cache), ("compiled", f", compile: true, compile_vae: true{deep_cache}")):
        folder = tmp_path / name
        grid = write_grid(folder, styles=("Banksy",), subjects=("alan turing",), images_per_prompt=3, batch_size=2)
        grid.write_text(grid.read_text().replace("batch_size: 2}", f"batch_size: 2{inference}}}"))
        shutil.copytree(tiny_model_store.root / "models", folder / "data" / "models")
        stores[name] = (folder / "data", _metadata(materialize_style(grid, "Banksy", instance), "style_images"))

    eager_data, eager = stores["eager"]
    compiled_data, compiled = stores["compiled"]
    assert "compiled" not in eager and "compile_seconds" not in eager
    assert compiled["generated"] == 3 and compiled["compiled"] == "unet, vae decoder"
    assert eager.get("deep_cache") == compiled.get("deep_cache") == ("interval 2, branch 0" if deep_cache else None)
    # The first batch compiled; the second ran warm and sets what running warm costs. (How much
    # the compile took is timing: with Inductor's disk cache warm and the machine busy it may be 0;
    # test_engine checks the arithmetic.)
    assert 0 <= compiled["compile_seconds"] <= compiled["first_batch_seconds"]
    assert compiled["padded_images"] == 0, "a CPU renders rows one at a time: nothing to fill"
    assert _pngs(eager_data).keys() == _pngs(compiled_data).keys()
    for path in (eager_data / "images").rglob("*.png"):
        with Image.open(path) as plain, Image.open(compiled_data / path.relative_to(eager_data)) as fast:
            difference = np.abs(np.asarray(plain, dtype=int) - np.asarray(fast, dtype=int))
        # Inductor fuses and reorders float sums: a level or two may move, no more.
        assert difference.max() <= 2, path.name


def test_turning_deep_cache_on_makes_new_images_that_say_so_and_keeps_the_old_ones(
    grid_path, instance, monkeypatch, capsys
):
    data = grid_path.parent / "data"
    plain = _metadata(materialize_style(grid_path, "Banksy", instance), "style_images")
    plain_images = _pngs(data)
    assert plain["generated"] == 4 and "deep_cache" not in plain
    revision = plain["model_revision"][:7]
    assert plain["settings"] == (
        f"2 steps · 64x64 · guidance 7.5 · PNDMScheduler · tiny-random@{revision} · float32 on cpu"
    )
    assert "DeepCache" not in (data / "gallery" / "banksy" / "page-1.html").read_text()

    grid_path.write_text(grid_path.read_text().replace("batch_size: 4}", "batch_size: 4, deep_cache: {interval: 2}}"))
    cached = _metadata(materialize_style(grid_path, "Banksy", instance), "style_images")
    assert cached["generated"] == 4 and cached["deep_cache"] == "interval 2, branch 0"
    assert cached["settings"] == plain["settings"].replace(" · float32", " · DeepCache interval 2, branch 0 · float32")
    images = _pngs(data)
    assert len(images) == 8 and {k: images[k] for k in plain_images} == plain_images, "the first images are untouched"

    catalog = pd.read_parquet(data / "catalog" / "banksy.parquet")
    assert sorted(catalog["deep_cache"]) == [""] * 4 + ["interval 2, branch 0"] * 4
    for row in catalog.itertuples():
        with Image.open(row.path) as image:
            assert ("DeepCache: interval 2; branch 0" in image.text["parameters"]) == bool(row.deep_cache)
    # The same subject, image and seed with and without the option: other pixels.
    pairs = catalog.pivot_table(index=["subject", "image_index"], columns="deep_cache", values="path", aggfunc="first")
    for full_path, cached_path in zip(pairs[""], pairs["interval 2, branch 0"], strict=True):
        with Image.open(full_path) as full, Image.open(cached_path) as fast:
            assert not np.array_equal(np.asarray(full), np.asarray(fast))

    # The gallery shows the grid's images now, each saying how it was made.
    page = (data / "gallery" / "banksy" / "page-1.html").read_text()
    assert page.count("· DeepCache interval 2, branch 0</span>") == 4

    # Searching the catalog shows the setting as a column once any image has one.
    monkeypatch.setenv("SD_ASSETS_GRID", str(grid_path))
    assert cli.main(["search", "--style", "banksy"]) == 0
    header, *lines = capsys.readouterr().out.splitlines()
    assert header.split()[-2:] == ["deep_cache", "path"] and len(lines) == 8
    assert sum("  interval 2, branch 0  " in line for line in lines) == 4

    again = _metadata(materialize_style(grid_path, "Banksy", instance), "style_images")
    assert again["generated"] == 0 and again["skipped"] == 4


def test_a_deep_cache_branch_the_model_lacks_fails_the_run_with_the_reason_and_writes_nothing(grid_path, instance):
    grid_path.write_text(
        grid_path.read_text().replace("batch_size: 4}", "batch_size: 4, deep_cache: {interval: 3, branch: 9}}")
    )
    defs = build_definitions({"SD_ASSETS_GRID": str(grid_path), "SD_ASSETS_DEVICE": "cpu"})
    result = defs.resolve_job_def("generate_images").execute_in_process(
        partition_key="Banksy", instance=instance, raise_on_error=False
    )
    assert not result.success
    [failure] = [event for event in result.all_events if event.is_step_failure]
    assert "inference.deep_cache.branch is 9, but this UNet has 6 skip branches (0 to 5)" in str(
        failure.step_failure_data.error
    )
    assert _pngs(grid_path.parent / "data") == {}


def test_a_wide_image_is_wide_in_its_pixels_parameters_catalog_and_gallery(grid_path, instance):
    grid_path.write_text(grid_path.read_text().replace("width: 64, height: 64", "width: 96, height: 64"))
    materialize_style(grid_path, "Banksy", instance)
    data = grid_path.parent / "data"

    catalog = pd.read_parquet(data / "catalog" / "banksy.parquet")
    assert len(catalog) == 4 and set(zip(catalog["width"], catalog["height"])) == {(96, 64)}
    for row in catalog.itertuples():
        with Image.open(row.path) as image:
            assert image.size == (96, 64)
            assert ", Size: 96x64, " in image.text["parameters"]
        provenance = read_provenance(Path(row.path).read_bytes())
        assert (provenance.width, provenance.height) == (96, 64)
    page = (data / "gallery" / "banksy" / "page-1.html").read_text()
    assert "96x64" in page and "64x96" not in page


def test_images_step_alone_refuses_a_prompt_grid_built_with_other_settings(grid_path, instance):
    data = grid_path.parent / "data"
    materialize_style(grid_path, "Banksy", instance)
    made = _pngs(data)
    # A new subject's rows are written at 2 steps; then the grid says 3 and only the images step runs.
    (grid_path.parent / "subjects" / "more.txt").write_text("grace hopper\n")
    defs = build_definitions({"SD_ASSETS_GRID": str(grid_path), "SD_ASSETS_DEVICE": "cpu"})
    job = defs.resolve_implicit_global_asset_job_def()
    assert job.execute_in_process(
        asset_selection=[dg.AssetKey("prompt_grid")], partition_key="Banksy", instance=instance
    ).success
    grid_path.write_text(grid_path.read_text().replace("steps: 2", "steps: 3"))
    result = job.execute_in_process(
        asset_selection=[dg.AssetKey("style_images")], partition_key="Banksy", instance=instance, raise_on_error=False
    )

    assert not result.success
    [failure] = [event for event in result.all_events if event.is_step_failure]
    assert failure.step_key == "style_images"
    error = str(failure.step_failure_data.error)
    assert "the prompt grid of 'Banksy'" in error and f"than {grid_path} and model tiny-random@" in error
    assert "(2 of 2 images to make would not match their keys); materialize prompt_grid again" in error
    assert _pngs(data) == made, "no image made under a key of other settings"

    # The whole job rebuilds the grid first and makes the new subject at 3 steps, under new keys.
    materialize_style(grid_path, "Banksy", instance)
    steps = {read_provenance(p.read_bytes()).steps for p in (data / "images").rglob("*.png")}
    assert len(_pngs(data)) == len(made) + 6 and steps == {2, 3}


def test_images_step_alone_with_its_grids_images_made_says_the_new_settings_made_nothing(grid_path, instance):
    data = grid_path.parent / "data"
    materialize_style(grid_path, "Banksy", instance)
    made = _pngs(data)
    grid_path.write_text(grid_path.read_text().replace("steps: 2", "steps: 3"))
    defs = build_definitions({"SD_ASSETS_GRID": str(grid_path), "SD_ASSETS_DEVICE": "cpu"})
    job, images_only = defs.resolve_implicit_global_asset_job_def(), [dg.AssetKey("style_images")]
    result = job.execute_in_process(asset_selection=images_only, partition_key="Banksy", instance=instance)

    assert result.success and _pngs(data) == made
    warnings = [entry.user_message for entry in instance.all_logs(result.run_id) if entry.level == logging.WARNING]
    said = f"Banksy: these images are the prompt grid's, built with other settings than {grid_path} and model tiny"
    advice = "(4 of 4); nothing was made with the new settings: materialize prompt_grid"
    assert any(said in message and advice in message for message in warnings), warnings

    # With the grid as it was, the same step says nothing of the kind.
    grid_path.write_text(grid_path.read_text().replace("steps: 3", "steps: 2"))
    again = job.execute_in_process(asset_selection=images_only, partition_key="Banksy", instance=instance)
    assert not [entry for entry in instance.all_logs(again.run_id) if entry.level == logging.WARNING]


def test_a_catalog_merge_and_a_gallery_wait_while_another_process_holds_the_style(grid_path, instance, tmp_path):
    import threading

    from sd_assets.orchestration.resources import GeneratorResource

    locks = tmp_path / "locks"
    data = grid_path.parent / "data"
    materialize_style(grid_path, "Banksy", instance, SD_ASSETS_DEVICE_LOCKS=str(locks))
    (data / "catalog" / "banksy.parquet").unlink()
    (data / "gallery" / "banksy" / "page-1.html").unlink()
    defs = build_definitions({"SD_ASSETS_GRID": str(grid_path), "SD_ASSETS_DEVICE": "cpu",
                              "SD_ASSETS_DEVICE_LOCKS": str(locks)})  # fmt: skip
    job = defs.resolve_implicit_global_asset_job_def()
    steps = [dg.AssetKey("image_catalog"), dg.AssetKey("style_gallery")]
    results = []

    def merge_and_render():
        results.append(job.execute_in_process(asset_selection=steps, partition_key="Banksy", instance=instance))

    # What a run making Banksy's images (or merging its catalog) holds, in another process.
    with GeneratorResource(device_lock_dir=str(locks)).exclusive("style", str(data), "Banksy"):
        worker = threading.Thread(target=merge_and_render)
        worker.start()
        worker.join(timeout=5)
        assert worker.is_alive(), "it waits for the lock"
        assert not (data / "catalog" / "banksy.parquet").exists()
    worker.join(timeout=120)

    assert results and results[0].success
    assert len(pd.read_parquet(data / "catalog" / "banksy.parquet")) == 4, "its rows recovered from the PNGs"
    assert (data / "gallery" / "banksy" / "page-1.html").is_file()


def test_a_run_without_a_style_fails_saying_how_to_give_one(grid_path, instance):
    defs = build_definitions({"SD_ASSETS_GRID": str(grid_path), "SD_ASSETS_DEVICE": "cpu"})
    result = defs.resolve_job_def("generate_images").execute_in_process(instance=instance, raise_on_error=False)
    assert (
        "a run of prompt_grid makes one style: give it a partition (dagster job execute ... "
        """--tags '{"dagster/partition": "Banksy"}', or pick a style in the UI)"""
    ) in _style_failure(result)
    assert _pngs(grid_path.parent / "data") == {}


def test_a_run_made_here_of_a_style_the_grid_no_longer_has_names_the_one_it_has_now(grid_path, instance):
    # dagster job execute reads the grid as the run starts: a style not in it was typed from memory.
    # (A run launched from a code location loaded earlier: test_daemon_e2e.)
    defs = build_definitions({"SD_ASSETS_GRID": str(grid_path), "SD_ASSETS_DEVICE": "cpu"})
    grid_path.write_text(
        grid_path.read_text().replace("[Banksy, Andy Warhol]", "[Banksy, Andy warhol, Claude Monet]")
    )
    result = defs.resolve_job_def("generate_images").execute_in_process(
        partition_key="Andy Warhol", instance=instance, raise_on_error=False
    )
    assert (
        f"this run's style 'Andy Warhol' is not in the grid {grid_path} (did you mean 'Andy warhol'?); its styles "
        "are ['Banksy', 'Andy warhol', 'Claude Monet']: give one of them as it is written there (--tags "
        "'{\"dagster/partition\": \"Andy warhol\"}')"
    ) in _style_failure(result)
    assert _pngs(grid_path.parent / "data") == {}


def test_a_run_of_a_misspelt_style_says_which_style_was_meant_not_to_reload(grid_path, instance):
    # `dagster job execute --tags` launches a partition key the code never had: a typo, not an edited grid.
    # Said before the model is fetched: with a hub model, the user would wait for gigabytes to learn of it.
    shutil.rmtree(grid_path.parent / "data" / "models")
    defs = build_definitions({"SD_ASSETS_GRID": str(grid_path), "SD_ASSETS_DEVICE": "cpu"})
    for typed in ("Andy Warhal", "andy-warhol", "warhol"):
        result = defs.resolve_job_def("generate_images").execute_in_process(
            tags={"dagster/partition": typed}, instance=instance, raise_on_error=False
        )
        error = _style_failure(result)
        assert (
            f"this run's style {typed!r} is not in the grid {grid_path} (did you mean 'Andy Warhol'?); its styles are "
            "['Banksy', 'Andy Warhol']: give one of them as it is written there (--tags '{\"dagster/partition\": "
            "\"Andy Warhol\"}')"
        ) in error
        assert "reload" not in error
    # Nothing like any style: the example is the grid's first.
    error = _style_failure(defs.resolve_job_def("generate_images").execute_in_process(
        tags={"dagster/partition": "Claude Monet"}, instance=instance, raise_on_error=False))  # fmt: skip
    assert "'Claude Monet' is not in the grid" in error and "(did you mean" not in error
    assert """(--tags '{"dagster/partition": "Banksy"}')""" in error
    assert _pngs(grid_path.parent / "data") == {}
    assert not (grid_path.parent / "data" / "models").exists()


def test_a_run_whose_subject_lists_fail_fetches_no_model(tmp_path, instance):
    # A mistyped subjects_dir: with a hub model, the user would wait for gigabytes to learn of it.
    grid_path = write_grid(tmp_path)  # its store holds no model yet
    grid_path.write_text(grid_path.read_text().replace("subjects_dir: subjects", "subjects_dir: lists"))
    defs = build_definitions({"SD_ASSETS_GRID": str(grid_path), "SD_ASSETS_DEVICE": "cpu"})
    result = defs.resolve_job_def("generate_images").execute_in_process(
        partition_key="Banksy", instance=instance, raise_on_error=False
    )
    failures = {e.step_key: str(e.step_failure_data.error) for e in result.all_events if e.is_step_failure}
    assert sorted(failures) == ["grid_inputs", "model_weights"]
    assert f"subject lists folder {grid_path.parent / 'lists'} does not exist" in failures["grid_inputs"]
    assert (
        "not run: grid_inputs failed in this run, and without the subject lists the run makes no image; fix what "
        "its error names and run again (the model is fetched then)"
    ) in failures["model_weights"]
    assert not (grid_path.parent / "data" / "models").exists()

    # Launched from the UI's Materialize dialog, without the grid_inputs step: model_weights reads
    # the lists before it fetches the model.
    job = defs.resolve_job_def("generate_images")
    assets = [key for key in job.asset_layer.executable_asset_keys if key != dg.AssetKey("grid_inputs")]
    result = job.execute_in_process(partition_key="Banksy", asset_selection=assets, instance=instance,
                                    raise_on_error=False)
    [failure] = [e for e in result.all_events if e.is_step_failure]
    assert failure.step_key == "model_weights"
    assert f"subject lists folder {grid_path.parent / 'lists'} does not exist" in str(failure.step_failure_data.error)
    assert not (grid_path.parent / "data" / "models").exists()


def _style_failure(result) -> str:
    """The error of a failed run refused for its style: model_weights fails, before any model is
    fetched, and no other step runs."""
    assert not result.success
    [failure] = [event for event in result.all_events if event.is_step_failure]
    assert failure.step_key == "model_weights"
    assert result.get_asset_materialization_events() == []
    return str(failure.step_failure_data.error)


def _check(result) -> dg.AssetCheckEvaluation:
    [evaluation] = result.get_asset_check_evaluations()
    assert evaluation.check_name == "prompts_fit_text_encoder"
    return evaluation


def test_a_prompt_longer_than_the_text_encoder_reads_is_refused_by_name_and_the_rest_is_made_and_shown(
    grid_path, instance
):
    # The pipeline reads the first 77 tokens of a prompt: "by Banksy" would be cut off, and Banksy
    # and Andy Warhol would make one picture under two keys.
    data = grid_path.parent / "data"
    long_subject = " ".join(["alan"] * 90)
    (grid_path.parent / "subjects" / "long.txt").write_text(long_subject + "\n")
    first = materialize_style(grid_path, "Banksy", instance)

    # The run succeeds; its check fails, naming the prompt.
    check = _check(first)
    assert not check.passed
    shown = " ".join(["alan"] * 11) + " al..."
    assert check.description.startswith(
        "Banksy: the text encoder reads 77 tokens of a prompt (this model's tokenizer reads a token a letter, as the "
        "demo's tiny-random does: about 75 characters of prompt, spaces not counted, where a real model's reads "
        f"most words as one token), and these are longer: the prompt of {shown!r} ("
    )
    assert "Shorten them (the subject lists, or the grid's prompt template or negative prompt)" in check.description
    assert check.description.endswith("Not made: 2 images of the prompts above; made: 4 other images of the style")
    assert check.description.count("the prompt of") == 1, "one subject named once, not once per image"
    assert (_metadata(first, "style_images")["generated"], _metadata(first, "style_images")["refused_images"]) == (4, 2)
    made = _pngs(data)
    assert len(made) == 4 and {read_provenance(p.read_bytes()).subject for p in (data / "images").rglob("*.png")} == {
        "alan turing", "ada lovelace"
    }  # fmt: skip
    # What was made is catalogued and shown at once; the long subject's places wait, unmade.
    assert _metadata(first, "image_catalog")["rows"] == 4
    page = (data / "gallery" / "banksy" / "page-1.html").read_text()
    # Their places say why, and what to do: a re-run alone would not make them.
    assert page.count(
        '<div class="missing">not made: its prompt is 370 tokens, over the 77 the text encoder reads; shorten it</div>'
    ) == 2 and "not made yet" not in page
    assert sum(f"{key.removesuffix('.png')}" in page for key in made) == 4
    # The index's contact sheet (image 0 of each subject) says so in the long subject's cell, and
    # waits for the style not yet run.
    index = (data / "gallery" / "index.html").read_text()
    long_row = index[index.index(f"<tr><th>{long_subject}</th>"):].split("</tr>")[0]
    assert long_row.count(
        '<span class="missing-cell">not made: its prompt is 370 tokens, over the 77 the text encoder reads; '
        "shorten it</span>"
    ) == 1 and long_row.count('<span class="missing-cell">not made yet</span>') == 1

    # Run again unchanged: refused again, nothing made twice.
    again = materialize_style(grid_path, "Banksy", instance)
    assert not _check(again).passed
    assert (_metadata(again, "style_images")["generated"], _metadata(again, "style_images")["refused_images"]) == (0, 2)
    assert _pngs(data) == made

    # Shortened, it is made and the check passes; the images made beside the refusal are kept.
    (grid_path.parent / "subjects" / "long.txt").write_text("grace hopper\n")
    shortened = materialize_style(grid_path, "Banksy", instance)
    assert _check(shortened).passed
    assert _metadata(shortened, "style_images")["generated"] == 2
    assert {k: v for k, v in _pngs(data).items() if k in made} == made
    assert _metadata(shortened, "image_catalog")["rows"] == 6
    assert "not made" not in (data / "gallery" / "banksy" / "page-1.html").read_text()
    assert "shorten it" not in (data / "gallery" / "index.html").read_text()
    assert not (data / "grids" / "banksy.refused.json").exists()
    # Nothing left to make: nothing loaded, nothing refused, and the metadata still says so.
    done = materialize_style(grid_path, "Banksy", instance)
    assert _check(done).passed and _metadata(done, "style_images")["refused_images"] == 0


@pytest.mark.parametrize("kind", ["in memory", "the CLI's temporary folder"])
def test_a_run_on_an_instance_that_is_not_kept_warns_that_its_run_id_will_lead_nowhere(grid_path, kind):
    # Without DAGSTER_HOME the demo runs in memory, and `dagster job execute` in a folder it deletes at exit.
    if kind == "in memory":
        instance = dg.DagsterInstance.ephemeral()
    else:
        (home := grid_path.parent / ".tmp_dagster_home_abc123").mkdir()
        instance = dg.DagsterInstance.local_temp(tempdir=str(home))
    result = materialize_style(grid_path, "Banksy", instance)
    warnings = [entry.user_message for entry in instance.all_logs(result.run_id) if entry.level == logging.WARNING]
    assert any(
        f"Banksy: this run's Dagster instance is not kept (DAGSTER_HOME is not set): the run id "
        f"{result.run_id}, which every image made now records, will be found in no instance later" in message
        for message in warnings
    ), warnings


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_the_readmes_recipe_remakes_an_image_from_its_png_alone(grid_path, instance, dtype):
    # bfloat16: the engine quantises its pixels as diffusers' own output does, in float32.
    grid_path.write_text(grid_path.read_text().replace("batch_size: 4}", f"batch_size: 4, dtype: {dtype}}}"))
    materialize_style(grid_path, "Banksy", instance)
    data = grid_path.parent / "data"
    readme = (Path(__file__).parents[1] / "README.md").read_text()
    recipe = re.search(r"### Reproducing an image\n.*?```python\n(.*?)```", readme, re.S).group(1)
    assert 'f"data/models/' in recipe
    for png_path in sorted((data / "images").rglob("*.png"))[:2]:
        scope = {"png_path": png_path}
        exec(recipe.replace('f"data/models/', f'f"{data}/models/'), scope)  # noqa: S102 - the README's own code
        with Image.open(png_path) as made:
            assert np.array_equal(np.asarray(scope["image"]), np.asarray(made.convert("RGB"))), png_path
    # The seed formula the README gives is the one the grid uses.
    formula = re.search(r"`(int\.from_bytes\(hashlib\.sha256.*?% 2\*\*32)`", readme).group(1)
    provenance = read_provenance(png_path.read_bytes())
    base_seed, subject, image_index = 42, provenance.subject, provenance.image_index  # noqa: F841 - used by eval
    assert eval(formula, {"hashlib": hashlib, **locals()}) == provenance.seed  # noqa: S307


def test_a_preview_caption_shows_a_subject_as_written_whatever_markdown_it_holds():
    from markdown_it import MarkdownIt

    from sd_assets.domain.prompts import PromptRow
    from sd_assets.orchestration.assets import _thumbnail_markdown

    for subject in ("a] strange one", "snake_case_name and *stars", "**bold** idea"):
        row = PromptRow(subject, "Banksy", 0, f"{subject} by Banksy", "", 1, "k")
        html = MarkdownIt().render(_thumbnail_markdown(Image.new("RGB", (64, 64)), row))
        assert f"<strong>{subject}, image_index 0</strong>" in html and f'alt="{subject}, image_index 0"' in html
        assert 'src="data:image/jpeg;base64,' in html


def test_the_prompt_grid_preview_shows_each_subject_as_written_in_its_own_cell():
    from markdown_it import MarkdownIt

    from sd_assets.domain.prompts import PromptRow
    from sd_assets.orchestration.assets import _rows_markdown

    subjects = ["a | b | c", "<script>alert(1)</script>", "[link](javascript:alert(1))", "**bold** & _it_"]
    rows = [PromptRow(subject, "Banksy", 0, f"{subject} by Banksy", "", 7, "0123456789abcdef") for subject in subjects]
    html = MarkdownIt("js-default").render(_rows_markdown(rows))
    body = re.findall(r"<tr>\s*(.*?)\s*</tr>", html, flags=re.S)[1:]
    cells = [re.findall(r"<td>(.*?)</td>", row, flags=re.S) for row in body]
    assert cells == [[escape(subject, quote=False), "0", "7", "<code>0123456789ab</code>"] for subject in subjects]
    assert "<script>" not in html and "href=" not in html


def test_an_index_drawn_while_another_style_merged_its_catalog_is_drawn_again_counting_it(grid_path, instance):
    from sd_assets.domain.catalog import rebuild_catalogs
    from sd_assets.domain.gallery import INDEX_KEY
    from sd_assets.domain.store import LocalStore
    from sd_assets.orchestration.resources import ArtifactStoreResource

    data = grid_path.parent / "data"
    for style in STYLES:
        materialize_style(grid_path, style, instance)
    (data / "catalog" / "andy-warhol.parquet").unlink()

    class MergedMeanwhile(LocalStore):
        """Andy Warhol's run merges its catalog after this index read the catalogs, before it is written."""

        merged = False

        def write_text(self, key: str, text: str) -> None:
            if key == INDEX_KEY and not MergedMeanwhile.merged:
                MergedMeanwhile.merged = True
                rebuild_catalogs(self)
            super().write_text(key, text)

    class MergedMeanwhileResource(ArtifactStoreResource):
        def open(self):
            return MergedMeanwhile(self.url)

    defs = build_definitions({"SD_ASSETS_GRID": str(grid_path), "SD_ASSETS_DEVICE": "cpu"})
    result = dg.materialize(
        [asset for asset in defs.assets if isinstance(asset, dg.AssetsDefinition)], selection="gallery_index",
        instance=instance,
        resources={**defs.resources, "store": MergedMeanwhileResource(url=str(data))},
    )  # fmt: skip

    assert MergedMeanwhile.merged and len(pd.read_parquet(data / "catalog" / "andy-warhol.parquet")) == 4
    assert "8 of 8 images of the grid made, across 2 styles" in (data / "gallery" / "index.html").read_text()
    assert _metadata(result, "gallery_index")["images"] == 8
    messages = [e.message for e in instance.all_logs(result.run_id) if e.level == logging.INFO]
    assert "a catalog changed while the gallery index was written; writing it again" in messages


def test_a_png_cut_short_without_its_row_is_set_aside_and_the_next_run_makes_it_again(grid_path, instance):
    data = grid_path.parent / "data"
    materialize_style(grid_path, "Banksy", instance)
    cut = sorted((data / "images").rglob("*.png"))[0]
    whole = cut.read_bytes()
    cut.write_bytes(whole[:100])  # a node lost power as it wrote it, say
    (data / "catalog" / "banksy.parquet").unlink()  # so its row comes back from the PNGs

    second = materialize_style(grid_path, "Banksy", instance)
    aside = data / "unreadable" / cut.relative_to(data)
    assert _metadata(second, "image_catalog")["images_set_aside"] == [str(aside)]
    assert aside.read_bytes() == whole[:100] and not cut.exists()
    warnings = [e.message for e in instance.all_logs(second.run_id) if e.level == logging.WARNING]
    assert any(m.startswith(f"{cut} is not a readable image of this project (") and
               m.endswith(f"; set aside as {aside}, and the next run of Banksy makes it again") for m in warnings)
    assert len(pd.read_parquet(data / "catalog" / "banksy.parquet")) == 3

    third = materialize_style(grid_path, "Banksy", instance)
    assert _metadata(third, "style_images")["generated"] == 1
    with Image.open(cut) as remade, Image.open(io.BytesIO(whole)) as original:
        assert np.array_equal(np.asarray(remade), np.asarray(original)), "the same picture, from its own seed"
    assert len(pd.read_parquet(data / "catalog" / "banksy.parquet")) == 4


def test_pages_of_a_grid_made_in_two_dtypes_say_how_many_images_each_made_and_which(grid_path, instance):
    # Made in float32, then two images lost and made again in bfloat16: same keys, other pixels.
    from sd_assets_tests.helpers import image_paths

    data = grid_path.parent / "data"
    materialize_style(grid_path, "Banksy", instance)
    for path in image_paths(grid_path, "Banksy", ["alan turing"]):
        path.unlink()
    grid_path.write_text(grid_path.read_text().replace("batch_size: 4}", "batch_size: 4, dtype: bfloat16}"))
    materialize_style(grid_path, "Banksy", instance)

    made_in = "made in bfloat16 on cpu (2 images), float32 on cpu (2 images)</p>"
    page = (data / "gallery" / "banksy" / "page-1.html").read_text()
    assert re.search(r"Grid settings: 2 steps · 64x64 · guidance 7.5 · PNDMScheduler · tiny-random@[0-9a-f]{7} · "
                     + re.escape(made_in), page), page  # fmt: skip
    # Each image says which, beside its run.
    assert page.count("</span> · bfloat16 on cpu") == 2 and page.count("</span> · float32 on cpu") == 2
    index = (data / "gallery" / "index.html").read_text()
    assert made_in in index and "· float32 on cpu</p>" not in index
