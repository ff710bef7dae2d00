"""The image catalog: one Parquet file per style listing every image made, with full provenance.

Owns its columns, the pending record batches that generation leaves behind, merging them (and any
image that lost its record in a crash, recovered from the PNG's own provenance chunk) into the
catalog, rebuilding every catalog from the PNGs when one is lost, and querying it. Rows are never
dropped: images of an older model or grid stay findable.

A run writes and merges the catalog with pyarrow, and turns Python values into a table only
through pyarrow's JSON reader (pending batches are JSON Lines): the first array pyarrow builds
from Python values makes it import pandas, about half a second. Only an empty catalog, or one
written before a column of ``LATER_COLUMNS`` existed, still takes that path. pandas is for the
readers, ``read_catalog`` and ``search``.
"""

from __future__ import annotations

import io
import json
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from typing import TYPE_CHECKING

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.json as pa_json
import pyarrow.parquet as pq

from sd_assets.domain.errors import SdAssetsError, StoreError
from sd_assets.domain.grid import slugify, unaccented
from sd_assets.domain.pngmeta import Provenance, image_key_path, read_provenance
from sd_assets.domain.prompts import PromptRow
from sd_assets.domain.store import ArtifactStore, ObjectVersion

if TYPE_CHECKING:
    import pandas as pd

SCHEMA = pa.schema(
    [
        ("key", pa.string()), ("subject", pa.string()), ("style", pa.string()), ("image_index", pa.int64()),
        ("prompt", pa.string()), ("negative_prompt", pa.string()), ("seed", pa.int64()),
        ("model_id", pa.string()), ("model_revision", pa.string()), ("scheduler", pa.string()),
        ("steps", pa.int64()), ("guidance_scale", pa.float64()), ("width", pa.int64()), ("height", pa.int64()),
        ("run_id", pa.string()), ("partition", pa.string()), ("path", pa.string()), ("created", pa.string()),
        ("device", pa.string()), ("dtype", pa.string()), ("deep_cache", pa.string()),
        ("model_variant", pa.string()), ("software", pa.string()), ("safety_flagged", pa.bool_()),
        ("safety_checker", pa.bool_()), ("cpu_threads", pa.int64()),
    ]
)  # fmt: skip
COLUMNS = SCHEMA.names
# Columns added after the first catalogs were written, with the value their older rows mean.
LATER_COLUMNS = {
    "deep_cache": "", "model_variant": "", "software": "", "safety_flagged": False, "safety_checker": False,
    "cpu_threads": 0,
}
SEARCH_FIELDS = ("subject", "style", "prompt", "model_id", "run_id", "key")


def catalog_key(style: str) -> str:
    return f"catalog/{slugify(style)}.parquet"


PENDING_PREFIX = "catalog/pending/"
PENDING_SUFFIXES = (".jsonl", ".parquet")


def pending_prefix(style: str) -> str:
    return f"{PENDING_PREFIX}{slugify(style)}/"


UNREADABLE_PREFIX = "catalog/unreadable/"


def _schema(columns: Sequence[str]) -> pa.Schema:
    return pa.schema([SCHEMA.field(c) for c in columns])


def _to_parquet(table: pa.Table) -> bytes:
    buffer = io.BytesIO()
    pq.write_table(table, buffer)
    return buffer.getvalue()


def _from_parquet(data: bytes, columns: Sequence[str] | None = None) -> pa.Table:
    """A catalog file in the current schema (only ``columns`` when given), whichever version wrote it."""
    wanted = list(columns or COLUMNS)
    parquet = pq.ParquetFile(pa.BufferReader(data))
    present = set(parquet.schema_arrow.names)
    table = parquet.read(columns=[c for c in wanted if c in present])
    for column in wanted:
        if column not in present:
            if column not in LATER_COLUMNS:
                raise pa.ArrowInvalid(f"no column {column!r}, which every catalog has")
            table = table.append_column(column, pa.array([LATER_COLUMNS[column]] * len(table)))
    return _checked_if_flagged(table.select(wanted).cast(_schema(wanted)))


def _checked_if_flagged(table: pa.Table) -> pa.Table:
    """Rows written before ``safety_checker`` was recorded read it as False; but the checker
    looked at an image it flagged, whose key hashes that setting."""
    if {"safety_checker", "safety_flagged"} <= set(table.column_names):
        index = table.schema.get_field_index("safety_checker")
        checked = pc.or_(table["safety_checker"], table["safety_flagged"])
        table = table.set_column(index, "safety_checker", checked)
    return table


class CatalogUnreadable(StoreError):
    """A style's catalog file, or a pending batch of its records, was read and is not one (cut
    short, overwritten)."""


class ImageUnreadable(StoreError):
    """An image file was read and is not a PNG this project wrote, or its provenance does not fit
    the catalog (cut short, overwritten)."""


def _read_catalog_file(store: ArtifactStore, key: str, columns: Sequence[str] | None = None) -> pa.Table:
    """``_from_parquet`` of a style's catalog in the store.

    Raises:
        CatalogUnreadable: the file is not a catalog, naming it and the way out.
        StoreError: the store could not give the file (not the file's fault).
    """
    data = store.read_bytes(key)
    try:
        return _from_parquet(data, columns)
    except (pa.ArrowException, OSError) as exc:
        raise CatalogUnreadable(
            f"{store.location(key)} is not a readable catalog ({exc}); `sd-assets rebuild-catalog` sets it "
            "aside and writes a new one, its rows rebuilt from the PNGs' own provenance"
        ) from None


def _json_lines(records: Sequence[dict]) -> bytes:
    return "".join(json.dumps({c: r[c] for c in COLUMNS}, ensure_ascii=False) + "\n" for r in records).encode()


def _from_json_lines(data: bytes) -> pa.Table:
    # A field this version does not know (written by a newer one) is left out, not an error.
    options = pa_json.ParseOptions(explicit_schema=SCHEMA, unexpected_field_behavior="ignore")
    table = pa_json.read_json(io.BytesIO(data), parse_options=options)
    # Records written before a later column existed lack it: they mean its old value, as in Parquet.
    for column, value in LATER_COLUMNS.items():
        if table[column].null_count:
            index = table.schema.get_field_index(column)
            table = table.set_column(index, column, pc.fill_null(table[column], value))
    # One without a column every record has (a newer version renamed it, a hand-made line) would
    # leave a hole in the catalog that the search, the gallery and every later merge trip on.
    for column in COLUMNS:
        if table[column].null_count:
            raise pa.ArrowInvalid(f"a record has no {column!r}")
    return _checked_if_flagged(table)


def _records_table(records: Sequence[dict]) -> pa.Table:
    """Catalog records as a table, through the JSON reader (see the module docstring: no pandas)."""
    return _from_json_lines(_json_lines(records))


def _read_pending(store: ArtifactStore, key: str) -> pa.Table:
    """A pending batch as a table in the current schema.

    Raises:
        CatalogUnreadable: the file is not a batch this project wrote, naming it and the way out.
        StoreError: the store could not give the file.
    """
    data = store.read_bytes(key)
    if not data.strip():
        return SCHEMA.empty_table()
    try:
        # Batches left by versions before JSON Lines are Parquet.
        return _from_parquet(data) if key.endswith(".parquet") else _from_json_lines(data)
    except (pa.ArrowException, OSError) as exc:
        raise CatalogUnreadable(
            f"{store.location(key)} is not a readable batch of catalog records ({exc}); delete it: the next run "
            "of the style recovers its images' rows from the PNGs (`sd-assets rebuild-catalog` those of older grids)"
        ) from None


def catalog_record(provenance: Provenance, path: str) -> dict:
    return {**asdict(provenance), "path": path}


def write_pending(store: ArtifactStore, style: str, name: str, records: Sequence[dict]) -> None:
    """Save a batch of new images' rows until ``merge_catalog`` folds them in."""
    if records:
        store.write_bytes(f"{pending_prefix(style)}{name}.jsonl", _json_lines(records))


# Beside the batches: the keys of the images a run is about to make.
INTENT_SUFFIX = ".making.json"


def write_intent(store: ArtifactStore, style: str, name: str, keys: Sequence[str]) -> None:
    """Note the images a run is about to make, before it makes any (``name``: the run's, or its try's).

    A run that dies before it saves their records leaves PNGs without rows. The next merge
    recovers the rows of the grid's images from their PNGs; these keys let it recover the others
    too, such as the images of a subject taken out of its list before that merge.
    """
    if keys:
        store.write_text(f"{pending_prefix(style)}{name}{INTENT_SUFFIX}", json.dumps(sorted(keys)))


def _read_intent(store: ArtifactStore, key: str) -> list[str]:
    try:
        keys = json.loads(store.read_text(key))
    except (ValueError, UnicodeDecodeError):
        keys = None
    if not (isinstance(keys, list) and all(isinstance(k, str) for k in keys)):
        raise StoreError(
            f"{store.location(key)} is not a list of image keys a run was making; delete it (`sd-assets "
            "rebuild-catalog` gives every image in the store its row)"
        )
    return keys


def read_style_catalog(store: ArtifactStore, style: str, columns: Sequence[str] | None = None) -> pa.Table:
    """A style's catalog (only ``columns`` when given; empty when it has none yet)."""
    key = catalog_key(style)
    if store.exists(key):
        return _read_catalog_file(store, key, columns)
    return _schema(columns or COLUMNS).empty_table()


def catalog_row(store: ArtifactStore, style: str, key: str) -> dict | None:
    """The catalog row of the image ``key`` in ``style``'s catalog, as a dict of its columns; None
    where the catalog has none (not made, or not merged yet)."""
    table = read_style_catalog(store, style)
    # Not pc.equal(table["key"], key): a Python value made a pyarrow scalar imports pandas (half a
    # second of every run's gallery index step; see the module docstring).
    keys = table["key"].to_pylist()
    return table.slice(keys.index(key), 1).to_pylist()[0] if key in keys else None


def _catalog_slug(key: str) -> str | None:
    """The style slug of a key ``catalog_key`` names; None for any other key (a pending batch, a file set aside)."""
    name = key.removeprefix("catalog/")
    if key == name or "/" in name or not name.endswith(".parquet"):
        return None
    return name.removesuffix(".parquet")


def catalog_versions(store: ArtifactStore) -> dict[str, ObjectVersion]:
    """Each style catalog's version, by slug, from one listing: a merge that rewrites it changes it."""
    return {
        slug: version for key, version in store.versions("catalog/").items() if (slug := _catalog_slug(key)) is not None
    }


def _style_catalog_keys(store: ArtifactStore) -> list[str]:
    return [key for key in sorted(store.list_keys("catalog/")) if _catalog_slug(key) is not None]


@dataclass(frozen=True)
class UnreadableCatalog:
    """A style's catalog file that could not be read: its key, its style's slug, and why."""

    key: str
    slug: str
    message: str


def _style_catalogs(
    store: ArtifactStore, columns: Sequence[str] | None, unreadable: list[UnreadableCatalog] | None
) -> dict[str, pa.Table]:
    """Every style's catalog, by its slug. One that is not a catalog raises, or, given
    ``unreadable``, is left out and noted there, so that one damaged file does not hide every other
    style's images; a store that cannot give a file (S3 throttling, the network) still raises: the
    file may be fine."""
    tables = {}
    for key in _style_catalog_keys(store):
        slug = _catalog_slug(key)
        try:
            tables[slug] = _read_catalog_file(store, key, columns)
        except CatalogUnreadable as exc:
            if unreadable is None:
                raise
            unreadable.append(UnreadableCatalog(key, slug, str(exc)))
    return tables


def catalog_styles(
    store: ArtifactStore, unreadable: list[UnreadableCatalog] | None = None, made_in: dict[str, tuple] | None = None
) -> dict[str, list[str]]:
    """The content keys of every style's catalog, by style name (reads only those two columns); an
    empty catalog has none to give. ``unreadable``: see ``_style_catalogs``. Given ``made_in``, it
    is filled with each key's ``(dtype, device)`` (two columns more)."""
    styles: dict[str, list[str]] = {}
    columns = ["key", "style"] + (["dtype", "device"] if made_in is not None else [])
    for table in _style_catalogs(store, columns, unreadable).values():
        if len(table):
            keys = table["key"].to_pylist()
            styles.setdefault(table["style"][0].as_py(), []).extend(keys)
            if made_in is not None:
                made_in.update(zip(keys, zip(table["dtype"].to_pylist(), table["device"].to_pylist())))
    return styles


def read_catalog(store: ArtifactStore, unreadable: list[UnreadableCatalog] | None = None) -> pd.DataFrame:
    """Every style's catalog together, as a pandas DataFrame, with the pending records no run has
    merged yet (a run that failed or was killed after making images leaves them; the next run of
    the style merges them), each image's newest record as the merge would keep it.

    ``path`` is where each image is in ``store`` now: a store copied or moved elsewhere (another
    folder, a bucket synced from one) finds its own images, not those of the place it was written.
    ``unreadable``: see ``_style_catalogs``; a pending batch that is not one is noted there too.
    """
    # The batches first, then the catalogs: a merge that runs meanwhile moves records from the
    # one to the other, so each is read at least once (a record read twice is kept once). A batch
    # listed and then merged away is gone: its records are in the catalog read after it.
    batches: dict[str, list[pa.Table]] = {}
    for key in sorted(store.list_keys(PENDING_PREFIX)):
        slug, _, name = key.removeprefix(PENDING_PREFIX).partition("/")
        if not name.endswith(PENDING_SUFFIXES):
            continue
        try:
            batches.setdefault(slug, []).append(_read_pending(store, key))
        except CatalogUnreadable as exc:
            if unreadable is None:
                raise
            unreadable.append(UnreadableCatalog(key, slug, str(exc)))
        except StoreError:
            if store.exists(key):
                raise
    tables = _style_catalogs(store, None, unreadable)
    for slug, pending in batches.items():
        if pending:
            newest = _newest_records(pa.concat_tables(pending), tables.get(slug))
            tables[slug] = _sorted(newest.drop_columns([_PENDING]))
    frame = pa.concat_tables([SCHEMA.empty_table(), *(tables[slug] for slug in sorted(tables))]).to_pandas()
    # One location, then string columns: a call per row was 0.4 s per 100,000 rows.
    probe = image_key_path("0" * 64)
    root = store.location(probe).removesuffix(probe)
    frame["path"] = root + "images/" + frame["key"].str[:2] + "/" + frame["key"] + ".png"
    return frame


def galleries_without_catalog(store: ArtifactStore) -> list[str]:
    """The slugs of styles with gallery pages but neither a catalog file nor pending records: their
    catalog was deleted, or not copied with the images, and ``read_catalog`` cannot know of them."""
    catalogued, galleries = set(), set()
    for key in store.list_keys("catalog/"):
        slug = _catalog_slug(key)
        if slug is not None:
            catalogued.add(slug)
        elif key.startswith(PENDING_PREFIX) and key.endswith(PENDING_SUFFIXES):  # records, not a run's intent
            catalogued.add(key.removeprefix(PENDING_PREFIX).partition("/")[0])
    for key in store.list_keys("gallery/"):
        slug, _, page = key.removeprefix("gallery/").partition("/")
        if page == "page-1.html":
            galleries.add(slug)
    return sorted(galleries - catalogued)


def _read_png_record(store: ArtifactStore, image_key: str, way_out: str = "") -> dict:
    """The catalog record of an image in the store, from its provenance chunk, not yet checked
    against the catalog's columns (``_misfits``; a plain dict: a rebuild holds one per image, a
    one-row table would cost ten times more).

    Raises:
        ImageUnreadable: the file is not a PNG this project wrote (cut short, say), naming it and ``way_out``.
        StoreError: the store could not be read.
    """
    location = store.location(image_key)
    try:
        provenance = read_provenance(store.read_bytes(image_key))
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise ImageUnreadable(f"{location} is not a readable image of this project ({exc!r}){way_out}") from None
    return catalog_record(provenance, location)


def _misfit(record: dict, way_out: str) -> str | None:
    """Why the catalog's columns cannot hold ``record``, naming its image and ``way_out``; None when they can."""
    try:
        _records_table([record])
    except (pa.ArrowException, TypeError, UnicodeError) as exc:  # UnicodeError: a lone surrogate, not text
        return f"{record['path']} has provenance the catalog cannot hold ({exc}){way_out}"
    return None


def _misfits(records: Sequence[dict], way_out: str) -> list[str | None]:
    """``_misfit`` of each of ``records``. They are checked together first: the JSON reader's
    set-up made a one-row table cost 0.9 ms, nine times the reading of the PNG, and a rebuild
    reads thousands; one at a time only when some record does not fit."""
    try:
        if records:
            _records_table(records)
        return [None] * len(records)
    except (pa.ArrowException, TypeError, UnicodeError):
        return [_misfit(record, way_out) for record in records]


def _png_record(store: ArtifactStore, image_key: str, way_out: str = "") -> dict:
    """``_read_png_record``, checked against the catalog's columns.

    Raises:
        ImageUnreadable: the file is not a PNG this project wrote (cut short, say), or its
            provenance does not fit the catalog's columns, naming it and ``way_out``.
        StoreError: the store could not be read.
    """
    record = _read_png_record(store, image_key, way_out)
    problem = _misfit(record, way_out)
    if problem:
        raise ImageUnreadable(problem)
    return record


UNREADABLE_IMAGES = "unreadable/"


def _set_image_aside(store: ArtifactStore, image_key: str) -> str:
    """Move an unreadable image out of ``images/`` (the store's copy is kept, under
    ``unreadable/``); its key is then missing, and the next run of its style makes it again."""
    aside = UNREADABLE_IMAGES + image_key
    store.write_bytes(aside, store.read_bytes(image_key))
    store.delete(image_key)
    return aside


@dataclass(frozen=True)
class MergeReport:
    rows: int
    added_from_records: int  # images the catalog had no row for
    recovered_from_png: int
    replaced_from_records: int = 0  # rows a newer record of the same image took over
    # Images with no row whose file is not a readable image of this project: each as (what was
    # wrong with it, where it now is, under unreadable/); the next run makes them again.
    set_aside: tuple[tuple[str, str], ...] = ()


# A column that marks pending records while a merge weighs them against the catalog's rows.
_PENDING = "_pending"


def merge_catalog(store: ArtifactStore, style: str, grid_rows: Sequence[PromptRow]) -> tuple[pa.Table, MergeReport]:
    """Fold pending records into the style's catalog, recovering rows for images without one.

    An image recorded more than once keeps one row, its newest record's (the newest ``created``;
    between equals, the pending one, then the first batch's): that is the record of the PNG now
    in the store, which a run remade after the last was deleted. An image that exists in the
    store but has no row (its run died between writing the PNG and its record) gets its row back
    from the PNG's provenance chunk: an image of ``grid_rows``, or one a run noted it was making
    (``write_intent``).
    """
    existed = store.exists(catalog_key(style))
    tables = [_read_catalog_file(store, catalog_key(style))] if existed else []
    listed = sorted(store.list_keys(pending_prefix(style)))
    pending_keys = [k for k in listed if k.endswith(PENDING_SUFFIXES)]
    intent_keys = [k for k in listed if k.endswith(INTENT_SUFFIX)]
    added = replaced = 0
    if pending_keys:
        # All batches and the catalog at once, so each step is one pass (batch by batch, checking
        # each against the keys merged so far cost 5.5 s for a run of 80,000 images): keep each
        # image's newest record, pending or catalogued (a stable sort, so equals keep their order:
        # pending first, then the first batch's). A stale batch merged late replaces nothing newer.
        batch = pa.concat_tables([_read_pending(store, key) for key in pending_keys])
        merged = _newest_records(batch, tables[0] if tables else None)
        won = merged.filter(merged[_PENDING])
        if tables:
            replaced = pc.sum(pc.is_in(won["key"], value_set=tables[0]["key"].combine_chunks())).as_py() or 0
        added = len(won) - replaced
        tables = [merged.drop_columns([_PENDING])]
    known_keys = {key for table in tables for key in table["key"].to_pylist()}
    recovered = []
    set_aside: list[tuple[str, str]] = []
    grid_keys = [row.key for row in grid_rows]
    intended = sorted({key for intent in intent_keys for key in _read_intent(store, intent)} - set(grid_keys))
    for key in grid_keys + intended:
        image_key = image_key_path(key)
        if key not in known_keys and store.exists(image_key):
            # A file cut short (a node lost power while writing it, say) would fail every run here.
            try:
                recovered.append(_png_record(store, image_key))
            except ImageUnreadable as exc:
                set_aside.append((str(exc), store.location(_set_image_aside(store, image_key))))
                continue
            known_keys.add(key)
    if recovered:
        tables.append(_records_table(recovered))
    merged = pa.concat_tables(tables) if tables else SCHEMA.empty_table()
    if pending_keys or recovered or not existed:  # the weighing above left the rows in time order
        merged = _sorted(merged)
    if added or replaced or recovered or not existed:
        store.write_bytes(catalog_key(style), _to_parquet(merged))
    for key in pending_keys + intent_keys:
        store.delete(key)
    report = MergeReport(len(merged), added, len(recovered), replaced_from_records=replaced, set_aside=tuple(set_aside))
    return merged, report


def _newest_records(pending: pa.Table, catalogued: pa.Table | None) -> pa.Table:
    """Each image's newest record among the ``pending`` batches (concatenated in key order) and its
    ``catalogued`` rows: the newest ``created``; between equals, the pending one, then the first
    batch's (a stable sort keeps their order). A ``_PENDING`` column says which came from a batch."""
    # The marks come from the key columns (never null), not from Python's True and False:
    # pyarrow imports pandas to convert a Python value, and every run would pay for that.
    candidates = [pending.append_column(_PENDING, pc.is_valid(pending["key"]))]
    if catalogued is not None:
        candidates.append(catalogued.append_column(_PENDING, pc.is_null(catalogued["key"])))
    merged = pa.concat_tables(candidates)
    merged = merged.take(pc.sort_indices(merged, sort_keys=[("created", "descending")]))
    merged_keys = merged["key"].combine_chunks()
    return merged.take(pc.index_in(pc.unique(merged_keys), value_set=merged_keys))


def _sorted(table: pa.Table) -> pa.Table:
    return table.sort_by([("subject", "ascending"), ("image_index", "ascending"), ("created", "ascending")])


# Images rebuild_catalogs reads before it turns their rows into tables.
REBUILD_CHUNK = 10_000
# An image rebuild_catalogs reads may be of an earlier grid, which no run makes again.
NOT_REMADE = (
    "; it gets no catalog row; if it is an image of the current grid, deleting it makes the next run "
    "of the style make it again"
)


@dataclass(frozen=True)
class Rebuild:
    """What ``rebuild_catalogs`` found and did."""

    reports: list[RebuildReport]
    errors: list[str]  # images that could not be read: no row, each error names the file
    images: int  # PNGs in the store
    catalogs: int  # catalog files found, readable or not


@dataclass(frozen=True)
class RebuildReport:
    """What ``rebuild_catalogs`` did to one catalog file."""

    catalog: str  # its store key
    rows: int
    kept: int  # rows the catalog had, when it was readable
    recovered_from_png: int
    set_aside: str | None  # where an unreadable catalog went


def rebuild_catalogs(store: ArtifactStore, threads: int = 16) -> Rebuild:
    """Give every image in the store a catalog row, read from the PNG's own provenance.

    A style's catalog keeps its rows (an image deleted since keeps its row, as in
    ``merge_catalog``) and gains one for each image it lacks, whichever grid or model made it:
    a run only recovers its own grid's images. An unreadable catalog is copied to
    ``catalog/unreadable/`` and replaced by one built from the PNGs alone. Only PNGs no
    readable catalog names are read (on ``threads`` threads: on S3 each is a request). Pending
    batches stay for the style's next run to merge.

    Returns:
        A report for each catalog written, and the errors of the images that could not be read
        or whose provenance does not fit the catalog's columns (they get no row).
    """
    catalogs: dict[str, pa.Table] = {}
    unreadable: list[str] = []
    for key in _style_catalog_keys(store):
        try:
            catalogs[key] = _read_catalog_file(store, key)
        except CatalogUnreadable:  # a store that could not give it raises: the file may be sound
            unreadable.append(key)
    known = {image_key for table in catalogs.values() for image_key in table["key"].to_pylist()}
    images = [key for key in sorted(store.list_keys("images/")) if key.endswith(".png")]
    missing = [key for key in images if key.rsplit("/", 1)[-1].removesuffix(".png") not in known]

    def read(image_key: str) -> dict | str:
        try:
            return _read_png_record(store, image_key, NOT_REMADE)
        except StoreError as exc:
            return str(exc)

    # REBUILD_CHUNK images at a time, each chunk's rows a table at once: a dict a row for every
    # image of a store took 260 MB more for 50,000 images, in tables 120 MB (50 of them the chunk's).
    found: dict[str, list[pa.Table]] = {}
    recovered: dict[str, int] = {}
    errors = []
    with ThreadPoolExecutor(max_workers=threads) as pool:
        for start in range(0, len(missing), REBUILD_CHUNK):
            results = list(pool.map(read, missing[start : start + REBUILD_CHUNK]))
            read_records = [result for result in results if isinstance(result, dict)]
            misfits = iter(_misfits(read_records, NOT_REMADE))
            chunk: dict[str, list[dict]] = {}
            for result in results:
                if isinstance(result, dict):
                    result = next(misfits) or result
                if isinstance(result, str):
                    errors.append(result)
                elif result["key"] not in known:
                    known.add(result["key"])
                    chunk.setdefault(catalog_key(result["style"]), []).append(result)
            for key, records in chunk.items():
                found.setdefault(key, []).append(_records_table(records))
                recovered[key] = recovered.get(key, 0) + len(records)

    stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    reports = []
    for key in sorted(set(found) | set(unreadable)):
        kept = catalogs.get(key, SCHEMA.empty_table())
        tables = [kept, *found.get(key, [])]
        set_aside = None
        if key in unreadable:
            set_aside = f"{UNREADABLE_PREFIX}{_catalog_slug(key)}-{stamp}.parquet"
            store.write_bytes(set_aside, store.read_bytes(key))
        merged = _sorted(pa.concat_tables(tables).combine_chunks())
        store.write_bytes(key, _to_parquet(merged))
        reports.append(
            RebuildReport(
                catalog=key, rows=len(merged), kept=len(kept), recovered_from_png=recovered.get(key, 0),
                set_aside=store.location(set_aside) if set_aside else None,
            )
        )  # fmt: skip
    return Rebuild(reports, errors, images=len(images), catalogs=len(catalogs) + len(unreadable))


# search's whole-value filters: a mapping, or (column, value) pairs.
Where = Mapping[str, str | int | float | bool] | Sequence[tuple[str, str]] | None


def search(
    catalog: pd.DataFrame,
    where: Where = None,
    **filters: str | None,
) -> pd.DataFrame:
    """Rows matching every given filter and every ``where`` setting.

    Filters are named by ``SEARCH_FIELDS`` and match a part of their column, in any case and
    with or without accents (``emile`` finds ``Émile``, as does an accent typed as a separate
    mark); a style also matches by its slug (``van-gogh``), the name of its gallery folder and
    catalog file; a key also by the image's file name or path (``images/3f/3f2a….png``).
    ``where`` gives catalog columns whole values, as a mapping (``{"steps": "50", "scheduler":
    "pndmscheduler"}``) or as (column, value) pairs, a column more than once if need be:
    numbers compare as numbers, true/false as booleans, text in any case but with its accents
    (in either Unicode form); a value may also be given as the Python number or bool
    (``{"steps": 50, "safety_flagged": True}``).

    Raises:
        SdAssetsError: a filter or ``where`` names no catalog column, or gives a value its column cannot hold.
    """
    import pandas as pd

    mask = pd.Series(True, index=catalog.index)
    for name, value in filters.items():
        if name not in SEARCH_FIELDS:
            raise SdAssetsError(f"cannot filter on {name!r}; use one of {', '.join(SEARCH_FIELDS)}")
        if value:
            if name == "key":  # a PNG's name is its key; its path holds it too
                given, value = value, value.strip().rstrip("/").rpartition("/")[2]
                value = value[: -len(".png")] if value.casefold().endswith(".png") else value
                if not value:  # would match every image
                    raise SdAssetsError(f"--key {given!r} holds no part of a content key")
            wanted = _unaccented(value)
            hits = _unaccented(catalog[name]).str.contains(wanted, regex=False)
            if name == "style":
                hits |= _each_value(_text(catalog[name]), lambda style: unaccented(slugify(style))).str.contains(
                    wanted, regex=False
                )
            mask &= hits
    for name, value in _where_pairs(where):
        mask &= _equals(catalog, name, value)
    return catalog[mask].reset_index(drop=True)


def _where_pairs(where: Where) -> Sequence[tuple[str, str | int | float | bool]]:
    # Pairs as well as a mapping: the command line may give one column twice, and both must match.
    return list(where.items()) if isinstance(where, Mapping) else list(where or ())


def search_may_reach(slug: str, style: str | None = None, where: Where = None) -> bool:
    """Whether ``search`` with these ``style`` and ``where`` filters could find rows in the catalog
    of the style ``slug``: one it could not read need not be reported to a search that leaves
    its style out. Only the slug is known of such a catalog, so a style named in part is tried
    against it slugged (``Van Gogh`` finds ``vincent-van-gogh``)."""
    # Compared as search compares (case folded: "STRASSE" finds "Straße"; a part without its
    # accents, a whole value with them), on both sides.
    if style:
        folded = _unaccented(slug)
        if _unaccented(style) not in folded and _unaccented(slugify(_normal(style))) not in folded:
            return False
    slug = _normal(slug)
    return all(slugify(_normal(str(value))) == slug for name, value in _where_pairs(where) if name == "style")


def _normal(text: pd.Series | str):
    """Text as search compares whole values (``where``): Unicode NFC, case folded."""
    import unicodedata

    if isinstance(text, str):
        return unicodedata.normalize("NFC", text).casefold()
    return _each_value(_text(text), lambda value: unicodedata.normalize("NFC", value).casefold())


def _unaccented(text: pd.Series | str):
    """Text as search's filters compare parts (``grid.unaccented``)."""
    return unaccented(text) if isinstance(text, str) else _each_value(_text(text), unaccented)


def _each_value(column: pd.Series, change: Callable[[str], str]) -> pd.Series:
    """``change`` of each cell, called once a distinct value: a column of a million rows holds a
    few dozen styles (a million calls took 6 s of a search)."""
    return column.map({value: change(value) for value in column.unique()})


def _text(column: pd.Series) -> pd.Series:
    """A column's cells as text; an empty cell (a frame put together in a notebook) as ''."""
    return column.astype(str).where(column.notna(), "")


def _equals(catalog: pd.DataFrame, column: str, value: str | int | float | bool) -> pd.Series:
    """Which rows hold exactly ``value`` (as a user types it, or as Python holds it) in ``column``."""
    value = str(value)  # a notebook passes True or 50; compared as the command line types them
    if column not in COLUMNS:
        raise SdAssetsError(f"no catalog column {column!r}; the columns are {', '.join(COLUMNS)}")
    kind = SCHEMA.field(column).type
    if pa.types.is_boolean(kind):
        if value.casefold() not in ("true", "false"):
            raise SdAssetsError(f"{column} is true or false, not {value!r}")
        return catalog[column].astype("boolean").fillna(False) == (value.casefold() == "true")  # empty: false
    if pa.types.is_integer(kind) or pa.types.is_floating(kind):
        try:
            if "_" in value:  # Python's digit separator: '4_0' would be 40
                raise ValueError(value)
            number = float(value)
        except ValueError:
            raise SdAssetsError(f"{column} is a number, not {value!r}") from None
        return catalog[column].astype(float) == number
    return _normal(catalog[column]) == _normal(value)
