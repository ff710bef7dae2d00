"""The new_subject_lists sensor and the subject lists it watches: what a user sees in ticks and runs."""

from __future__ import annotations

import base64
import hashlib
import json
import os
import time
import zlib
from pathlib import Path

import dagster as dg
import pytest

from sd_assets.definitions import build_definitions
from sd_assets.domain.errors import GridError, SdAssetsError
from sd_assets.domain.grid import load_grid
from sd_assets.domain.prompts import grid_inputs_version
from sd_assets.domain.store import LocalStore
from sd_assets.domain.subject_lists import (
    FolderSource,
    ListedFile,
    StoreSource,
    decode_cursor,
    encode_cursor,
    change_key,
    read_subject_lists,
    scan_subject_lists,
)
from sd_assets.orchestration.sensors import NEW_SUBJECT_LISTS
from sd_assets_tests.helpers import image_paths, materialize_style, write_grid

STYLES = ["Banksy", "Andy Warhol"]
AN_HOUR_AGO_NS = time.time_ns() - 3600 * 10**9


def short_hash(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()[:16]


def settle(path: Path) -> None:
    """Age a file's mtime past the sensor's settle window, as if written a while ago."""
    os.utime(path, ns=(AN_HOUR_AGO_NS, AN_HOUR_AGO_NS))


class SensorTicks:
    """Evaluates the sensor tick after tick, carrying the cursor as the daemon does."""

    def __init__(self, grid: Path, instance: dg.DagsterInstance, **environ: str):
        self.defs = build_definitions({"SD_ASSETS_GRID": str(grid), "SD_ASSETS_DEVICE": "cpu", **environ})
        self.sensor = self.defs.resolve_sensor_def(NEW_SUBJECT_LISTS)
        self.instance = instance
        self.cursor: str | None = None

    def tick(self) -> dg.SensorResult:
        # A context manager: the store resource's S3 client is set up and torn down around a tick.
        with dg.build_sensor_context(
            instance=self.instance, cursor=self.cursor, definitions=self.defs, resources=self.defs.resources
        ) as context:
            result = self.sensor(context)
        if result.cursor is not None:
            self.cursor = result.cursor
        return result


@pytest.fixture
def grid(tmp_path) -> Path:
    path = write_grid(tmp_path, styles=STYLES)
    settle(tmp_path / "subjects" / "people.txt")
    return path


@pytest.fixture
def ticks(grid, instance) -> SensorTicks:
    return SensorTicks(grid, instance)


def requests(result: dg.SensorResult) -> list[tuple[str, str]]:
    return [(request.partition_key, request.run_key) for request in result.run_requests or []]


def test_sensor_is_stopped_until_turned_on_and_targets_the_partitioned_job(ticks):
    assert ticks.sensor.default_status == dg.DefaultSensorStatus.STOPPED
    assert ticks.sensor.job_name == "generate_images"
    assert ticks.sensor.minimum_interval_seconds == 30


def in_store(folder: Path, grid: Path) -> str:
    """The run key's last part: the store the run makes its images in, and the grid's settings
    (``grid_inputs_version`` without the subjects)."""
    settings = grid_inputs_version(load_grid(grid), [])[:8]
    return "@" + hashlib.sha256(str(folder).encode()).hexdigest()[:8] + "~" + settings


def test_a_list_asks_for_one_run_per_style_with_keys_from_its_hash(ticks, grid, capsys):
    people = (grid.parent / "subjects" / "people.txt").read_bytes()
    first = ticks.tick()
    assert "1 new or changed subject list (people.txt): one run for each of 2 styles" in capsys.readouterr().err
    key, store = f"people.txt:{short_hash(people)}", in_store(grid.parent / "data", grid)
    assert requests(first) == [("Banksy", f"{key}:Banksy{store}"), ("Andy Warhol", f"{key}:Andy Warhol{store}")]
    again = ticks.tick()
    assert requests(again) == []
    assert "no new or changed subject lists among 1" in again.skip_reason.skip_message


def test_a_changed_list_asks_again_with_new_keys_and_a_touched_one_does_not(ticks, grid):
    people = grid.parent / "subjects" / "people.txt"
    ticks.tick()
    people.write_text("alan turing\nada lovelace\ngrace hopper\n")
    settle(people)
    changed = ticks.tick()
    key, store = f"people.txt:{short_hash(people.read_bytes())}", in_store(grid.parent / "data", grid)
    assert requests(changed) == [("Banksy", f"{key}:Banksy{store}"), ("Andy Warhol", f"{key}:Andy Warhol{store}")]
    os.utime(people)  # touched: new mtime, same bytes
    assert requests(ticks.tick()) == []


def test_a_removed_list_asks_for_a_run_of_every_style_and_a_malformed_one_removed_does_not(ticks, grid, capsys):
    # Its subjects leave the grid: the runs draw the pages without them (editing its lines out did already).
    subjects = grid.parent / "subjects"
    for name, text in (("painters.txt", "frida kahlo\n"), ("broken.txt", "\n")):
        (subjects / name).write_text(text)
        settle(subjects / name)
    assert len(requests(ticks.tick())) == 2
    capsys.readouterr()
    (subjects / "painters.txt").unlink()
    removed = ticks.tick()
    key = f"-painters.txt:{short_hash(b'frida kahlo' + bytes([10]))}"
    store = in_store(grid.parent / "data", grid)
    assert requests(removed) == [(style, f"{key}:{style}{store}") for style in STYLES]
    assert "1 subject list removed (painters.txt): one run for each of 2 styles" in capsys.readouterr().err
    assert requests(ticks.tick()) == []
    (subjects / "broken.txt").unlink()  # it never had subjects in the grid
    assert requests(ticks.tick()) == []


def test_a_list_put_back_after_the_grids_settings_changed_asks_for_new_runs(ticks, grid):
    # Dagster drops a run key it has seen: the keys of a list put back must not be those its first
    # runs had when the grid's images are now others (a new seed), or they would never be made.
    people = grid.parent / "subjects" / "people.txt"
    (grid.parent / "subjects" / "painters.txt").write_text("frida kahlo\n")
    settle(grid.parent / "subjects" / "painters.txt")
    first = requests(ticks.tick())
    text = people.read_bytes()
    people.unlink()
    assert len(requests(ticks.tick())) == 2
    people.write_bytes(text)
    settle(people)
    put_back = requests(ticks.tick())
    key = f"people.txt:{short_hash(text)}"
    assert put_back == [(style, f"{key}:{style}{in_store(grid.parent / 'data', grid)}") for style in STYLES]
    # The same again, with another seed: new keys.
    people.unlink()
    ticks.tick()
    grid.write_text(grid.read_text().replace("seed: 42", "seed: 7"))
    people.write_bytes(text)
    settle(people)
    reseeded = requests(ticks.tick())
    assert len(reseeded) == 2 and not {k for _, k in reseeded} & {k for _, k in put_back + first}
    assert all(k.startswith(f"{key}:") for _, k in reseeded)


def test_a_lost_cursor_yields_the_same_run_keys_again(ticks, grid):
    """A cursor lost (reset in the UI) asks for the same runs under the same keys, which Dagster
    drops as seen (the daemon's side is test_daemon_e2e's: no run twice)."""
    first = requests(ticks.tick())
    ticks.cursor = None
    assert requests(ticks.tick()) == first


def test_lists_run_again_into_a_new_store_and_an_older_cursor_counts_as_this_store(grid, instance, tmp_path, capfd):
    first = SensorTicks(grid, instance)
    assert len(requests(first.tick())) == 2 and requests(first.tick()) == []
    # The same lists, images now going elsewhere (SD_ASSETS_STORAGE fixed, the daemon restarted).
    moved = SensorTicks(grid, instance, SD_ASSETS_STORAGE=str(tmp_path / "other-store"))
    moved.cursor = first.cursor
    again = requests(moved.tick())
    key = f"people.txt:{short_hash((grid.parent / 'subjects' / 'people.txt').read_bytes())}"
    assert again == [(style, f"{key}:{style}{in_store(tmp_path / 'other-store', grid)}") for style in STYLES]
    assert f"images now go to {tmp_path / 'other-store'} (were {grid.parent / 'data'})" in capfd.readouterr().err
    assert requests(moved.tick()) == []
    # A cursor from before the store was kept (format z2) stands for the store in use: nothing fires.
    older = SensorTicks(grid, instance)
    state = decode_cursor(first.cursor).state
    table = {name: [s.size, s.mtime_ns, s.sha, int(s.valid), s.version] for name, s in state.items()}
    older.cursor = "z2:" + base64.b64encode(zlib.compress(json.dumps(table).encode())).decode()
    result = older.tick()
    assert requests(result) == [] and decode_cursor(older.cursor).store == str(grid.parent / "data")


def test_lists_wait_while_the_grids_styles_differ_from_the_loaded_ones_and_run_in_the_new_styles_after_a_reload(
    ticks, grid, instance, capfd
):
    assert len(requests(ticks.tick())) == 2
    # The styles edited while the daemon runs: one renamed, one added; then a new list.
    grid.write_text(grid.read_text().replace("[Banksy, Andy Warhol]", "[Banksy, Andy warhol, Claude Monet]"))
    (grid.parent / "subjects" / "painters.txt").write_text("frida kahlo\n")
    settle(grid.parent / "subjects" / "painters.txt")
    cursor = ticks.cursor
    held = ticks.tick()
    expected = (
        f"the grid {grid} has other styles than when the code location loaded (added 'Andy warhol', "
        "'Claude Monet'; removed 'Andy Warhol'): new or changed subject lists wait until you reload the "
        "code location (UI: Deployment > Reload; `dagster dev` also picks the grid up on a restart)"
    )
    assert requests(held) == [] and held.skip_reason.skip_message == expected
    assert expected in capfd.readouterr().err
    assert requests(ticks.tick()) == [] and ticks.cursor == cursor, "the lists stay new"
    # Reloaded: the definitions are built from the edited grid, with the cursor the daemon kept.
    reloaded = SensorTicks(grid, instance)
    reloaded.cursor = ticks.cursor
    key = f"painters.txt:{short_hash((grid.parent / 'subjects' / 'painters.txt').read_bytes())}"
    store = in_store(grid.parent / "data", grid)
    assert requests(reloaded.tick()) == [
        (style, f"{key}:{style}{store}") for style in ("Banksy", "Andy warhol", "Claude Monet")
    ]


def test_styles_put_in_another_order_change_nothing_the_sensor_does(ticks, grid):
    assert len(requests(ticks.tick())) == 2
    grid.write_text(grid.read_text().replace("[Banksy, Andy Warhol]", "[Andy Warhol, Banksy]"))
    (grid.parent / "subjects" / "painters.txt").write_text("frida kahlo\n")
    settle(grid.parent / "subjects" / "painters.txt")
    assert [partition for partition, _ in requests(ticks.tick())] == STYLES


def test_malformed_lists_are_skipped_with_a_message_and_good_lists_still_run(ticks, grid, capfd):
    subjects = grid.parent / "subjects"
    (subjects / "binary.txt").write_bytes(b"a\0b\n")
    (subjects / "latin1.txt").write_bytes("caf\xe9\n".encode("latin-1"))
    (subjects / "empty.txt").write_text("# nothing yet\n\n")
    (subjects / "long.txt").write_text("katherine johnson\n" + "x" * 501 + "\n")  # its good line stands
    (subjects / "many.txt").write_text("\n".join(f"subject {i}" for i in range(10_001)))
    result = ticks.tick()
    assert [partition for partition, _ in requests(result)] == STYLES
    assert all(run_key.startswith("long.txt+1more:") for _, run_key in requests(result))
    logged = capfd.readouterr().err
    assert "skipped subject list binary.txt: binary content (a NUL byte)" in logged
    assert "skipped subject list latin1.txt: not UTF-8 text (line 1, byte 3)" in logged
    assert "skipped subject list empty.txt: no subjects" in logged
    assert (
        "subject list long.txt, skipped line 2: 501 characters, over the 500 a subject has; the list's other "
        "subjects are taken"
    ) in logged
    assert "skipped subject list many.txt: 10001 subjects, more than max_subjects_per_list=10000" in logged
    quiet = ticks.tick()
    assert requests(quiet) == []
    assert "skipped subject list" not in capfd.readouterr().err, "a bad list is reported once per content"
    (subjects / "worse.txt").write_bytes(b"\0")
    alone = ticks.tick()  # a bad list and nothing new: the tick's skip reason names it
    assert requests(alone) == []
    assert alone.skip_reason.skip_message.endswith(
        f"in {subjects}; skipped subject list worse.txt: binary content (a NUL byte); expected UTF-8 text"
    ), alone.skip_reason.skip_message
    (subjects / "empty.txt").write_text("grace hopper\n")
    fixed = ticks.tick()
    assert {run_key.split(":")[0] for _, run_key in requests(fixed)} == {"empty.txt"}


def test_lists_found_together_cost_one_run_per_style(ticks, grid):
    subjects = grid.parent / "subjects"
    for name in ("b.txt", "c.txt"):
        (subjects / name).write_text(f"subject of {name}\n")
    result = ticks.tick()
    run_keys = [run_key for _, run_key in requests(result)]
    assert len(run_keys) == 2
    assert all(run_key.startswith("b.txt+2more:") for run_key in run_keys)
    # The same two lists changed together, twice: new contents, new keys each time (Dagster
    # skips a run key it has seen, so a repeated key would leave the new subjects unmade).
    rounds = []
    for version in ("second", "third"):
        for name in ("b.txt", "c.txt"):
            (subjects / name).write_text(f"{version} subject of {name}\n")
        rounds.append({run_key for _, run_key in requests(ticks.tick())})
    assert all(len(keys) == 2 and all(k.startswith("b.txt+1more:") for k in keys) for keys in rounds)
    assert not rounds[0] & rounds[1]


def test_an_unreadable_cursor_is_reported_and_every_list_read_again(ticks, capfd):
    ticks.cursor = "not a cursor"
    result = ticks.tick()
    assert len(requests(result)) == 2
    assert "the subject list cursor is unreadable" in capfd.readouterr().err
    assert decode_cursor(ticks.cursor).state.keys() == {"people.txt"}


def test_a_missing_subjects_folder_fails_the_tick_with_the_folder_named(ticks, grid):
    (grid.parent / "subjects" / "people.txt").unlink()
    (grid.parent / "subjects").rmdir()
    with pytest.raises(GridError, match="subject lists folder .*subjects does not exist"):
        ticks.tick()


def test_the_sensor_interval_comes_from_the_environment(grid):
    defs = build_definitions({"SD_ASSETS_GRID": str(grid), "SD_ASSETS_SENSOR_INTERVAL": "2"})
    assert defs.resolve_sensor_def(NEW_SUBJECT_LISTS).minimum_interval_seconds == 2
    for bad in ("0", "²", "30s"):
        expected = f"SD_ASSETS_SENSOR_INTERVAL='{bad}': expected a whole number of 1 or more"
        with pytest.raises(SdAssetsError, match=expected):
            build_definitions({"SD_ASSETS_GRID": str(grid), "SD_ASSETS_SENSOR_INTERVAL": bad})


def test_unchanged_lists_are_not_read_again(tmp_path):
    for i in range(50):
        (tmp_path / f"list-{i:02d}.txt").write_text(f"subject {i}\n")
        settle(tmp_path / f"list-{i:02d}.txt")
    source = FolderSource(tmp_path)
    first = scan_subject_lists(source, {}, max_subjects=100)
    assert (first.listed, first.read, len(first.changed)) == (50, 50, 50)
    state = decode_cursor(encode_cursor(first.state, "store")).state
    assert state == first.state
    second = scan_subject_lists(source, state, max_subjects=100)
    assert (second.listed, second.read, second.changed) == (50, 0, [])


def test_a_just_written_list_is_read_again_until_it_settles(tmp_path):
    """Two writes within one mtime tick keep (size, mtime): a fresh file is not trusted yet."""
    fresh = tmp_path / "fresh.txt"
    fresh.write_text("grace hopper\n")
    written = fresh.stat()
    source = FolderSource(tmp_path)
    first = scan_subject_lists(source, {}, max_subjects=100)
    fresh.write_text("ada lovelace\n")  # same size; mtime put back as if in the same tick
    os.utime(fresh, ns=(written.st_atime_ns, written.st_mtime_ns))
    second = scan_subject_lists(source, first.state, max_subjects=100)
    assert [sl.subjects for sl in second.changed] == [("ada lovelace",)]
    settle(fresh)
    third = scan_subject_lists(source, second.state, max_subjects=100)
    assert (third.read, third.changed) == (1, [])
    assert (scan_subject_lists(source, third.state, max_subjects=100).read) == 0


def test_lists_in_a_store_prefix_are_found_through_the_store_interface(tmp_path):
    store = LocalStore(tmp_path / "bucket")
    store.write_text("subjects/people.txt", "alan turing\n")
    store.write_text("subjects/nested/ignored.txt", "not a list of this prefix\n")
    store.write_text("subjects/notes.md", "not a list\n")
    store.write_text("subjects/PHYSICISTS.TXT", "isaac newton\n")  # as some editors save it
    source = StoreSource(store)
    first = scan_subject_lists(source, {}, max_subjects=100)
    assert [sl.name for sl in first.changed] == ["PHYSICISTS.TXT", "people.txt"] and first.read == 2
    again = scan_subject_lists(source, decode_cursor(encode_cursor(first.state, "store")).state, max_subjects=100)
    assert again.changed == [] and again.read == 0, "an unchanged object (same version tag) is not read"
    store.write_text("subjects/people.txt", "ada lovelace\n")
    changed = scan_subject_lists(source, again.state, max_subjects=100)
    assert [sl.subjects for sl in changed.changed] == [("ada lovelace",)] and changed.read == 1


def test_a_list_saved_as_upper_case_txt_is_a_list_and_other_files_are_not(tmp_path):
    (tmp_path / "people.txt").write_text("alan turing\n")
    (tmp_path / "Physicists.TXT").write_text("isaac newton\n")
    (tmp_path / "notes.md").write_text("not a list\n")
    (tmp_path / "people.txt~").write_text("an editor's backup\n")
    read = read_subject_lists(FolderSource(tmp_path), max_subjects=100)
    assert [(sl.name, sl.subjects) for sl in read.lists] == [
        ("Physicists.TXT", ("isaac newton",)), ("people.txt", ("alan turing",))
    ]  # fmt: skip


def test_reading_lists_skips_bad_ones_and_fails_only_when_none_is_valid(tmp_path):
    (tmp_path / "good.txt").write_text("alan turing\n")
    (tmp_path / "bad.txt").write_bytes(b"\xffbad")
    read = read_subject_lists(FolderSource(tmp_path), max_subjects=100)
    assert [sl.name for sl in read.lists] == ["good.txt"]
    assert read.problems == [
        "skipped subject list bad.txt: not UTF-8 text (line 1, byte 0): invalid start byte; save it as UTF-8"
    ]
    (tmp_path / "good.txt").unlink()
    with pytest.raises(GridError, match=r"no valid subject lists in .*\n- skipped subject list bad.txt"):
        read_subject_lists(FolderSource(tmp_path), max_subjects=100)


class VanishingListSource(FolderSource):
    """A folder whose listing still shows a list deleted before it could be read."""

    def listing(self) -> list[ListedFile]:
        return [*super().listing(), ListedFile("gone.txt", 12, time.time_ns() - 10**10)]


def test_a_linked_list_whose_file_is_not_there_is_skipped_by_name_and_read_once_it_is(tmp_path):
    lists = tmp_path / "lists"
    lists.mkdir()
    (lists / "people.txt").write_text("alan turing\n")
    share = tmp_path / "share"  # a share not mounted yet
    (lists / "shared.txt").symlink_to(share / "scientists.txt")
    (lists / "drafts.txt").mkdir()  # a folder, and a link to one, are no lists
    (lists / "linked-folder.txt").symlink_to(lists / "drafts.txt")
    settle(lists / "people.txt")
    read = read_subject_lists(FolderSource(lists), max_subjects=100)
    assert [sl.name for sl in read.lists] == ["people.txt"]
    assert read.problems == [
        f"skipped subject list shared.txt: cannot read it: it links to {share / 'scientists.txt'}, which is not there"
    ]
    first = scan_subject_lists(FolderSource(lists), {}, max_subjects=100)
    assert first.problems == read.problems and "shared.txt" not in first.state

    share.mkdir()
    (share / "scientists.txt").write_text("ada lovelace\n")
    again = scan_subject_lists(FolderSource(lists), first.state, max_subjects=100)
    assert [(sl.name, sl.subjects) for sl in again.changed] == [("shared.txt", ("ada lovelace",))]
    assert again.problems == []


def test_a_list_that_cannot_be_read_is_skipped_and_tried_again_next_look(tmp_path):
    (tmp_path / "good.txt").write_text("alan turing\n")
    settle(tmp_path / "good.txt")
    source = VanishingListSource(tmp_path)
    read = read_subject_lists(source, max_subjects=100)
    assert [sl.name for sl in read.lists] == ["good.txt"]
    [problem] = read.problems
    assert problem.startswith("skipped subject list gone.txt: cannot read it: ") and "No such file" in problem
    first = scan_subject_lists(source, {}, max_subjects=100)
    assert [sl.name for sl in first.changed] == ["good.txt"] and first.problems == [problem]
    assert "gone.txt" not in first.state, "not remembered, so the next look reads it again"
    again = scan_subject_lists(source, first.state, max_subjects=100)
    assert (again.read, again.problems) == (1, [problem])


def test_a_malformed_list_does_not_fail_a_run(grid_path, instance):
    (grid_path.parent / "subjects" / "broken.txt").write_bytes(b"\0\0\0")
    (grid_path.parent / "subjects" / "more.txt").write_text("grace hopper\n")
    result = materialize_style(grid_path, "Banksy", instance)
    prompt_grid = next(
        m for m in result.get_asset_materialization_events() if m.asset_key == dg.AssetKey("prompt_grid")
    )
    metadata = prompt_grid.materialization.metadata
    assert metadata["subject_lists"].value == "more.txt, people.txt"
    assert metadata["skipped_subject_lists"].value == (
        "skipped subject list broken.txt: binary content (a NUL byte); expected UTF-8 text"
    )
    assert all(path.is_file() for path in image_paths(grid_path, "Banksy", ["grace hopper"]))


def test_a_list_whose_file_name_is_not_utf8_is_read_and_named_by_its_bytes(grid_path, instance):
    # "café.txt" from an archive made where file names were Latin-1: é is the one byte 0xE9.
    latin1_name = os.fsdecode(b"caf\xe9 people.txt")
    (grid_path.parent / "subjects" / latin1_name).write_text("marie curie\n")

    result = materialize_style(grid_path, "Banksy", instance)
    prompt_grid = next(
        m for m in result.get_asset_materialization_events() if m.asset_key == dg.AssetKey("prompt_grid")
    )
    assert prompt_grid.materialization.metadata["subject_lists"].value == "caf\\xe9 people.txt, people.txt"
    assert all(path.is_file() for path in image_paths(grid_path, "Banksy", ["marie curie"]))

    scan = scan_subject_lists(FolderSource(grid_path.parent / "subjects"), {}, max_subjects=100)
    assert change_key(scan.changed).startswith("caf\\xe9 people.txt+1more:")
    assert decode_cursor(encode_cursor(scan.state, "store")).state == scan.state


def test_a_list_deleted_between_the_folder_listing_and_its_stat_is_left_out(tmp_path, monkeypatch):
    (tmp_path / "good.txt").write_text("alan turing\n")
    (tmp_path / "gone.txt").write_text("ada lovelace\n")
    scandir = os.scandir

    def listed_then_deleted(folder):  # someone removes gone.txt just after the folder is listed
        entries = list(scandir(folder))
        (tmp_path / "gone.txt").unlink()
        return iter(entries)

    monkeypatch.setattr(os, "scandir", listed_then_deleted)
    assert [listed.name for listed in FolderSource(tmp_path).listing()] == ["good.txt"]
