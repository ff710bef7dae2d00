"""The image catalog: one Parquet file per style listing every image made, with full provenance.

Owns its columns, the pending record batches that generation leaves behind, merging them (and any
image that lost its record in a crash, recovered from the PNG's own provenance chunk) into the
catalog, and querying it. Rows are never dropped: images of an older model or grid stay findable.
"""

from __future__ import annotations

import io
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass

import pandas as pd

from sd_assets.domain.grid import slugify
from sd_assets.domain.pngmeta import Provenance, image_key_path, read_provenance
from sd_assets.domain.prompts import PromptRow
from sd_assets.domain.store import ArtifactStore

COLUMNS = [
    "key", "subject", "style", "image_index", "prompt", "negative_prompt", "seed", "model_id",
    "model_revision", "scheduler", "steps", "guidance_scale", "width", "height", "run_id",
    "partition", "path", "created", "device", "dtype", "deep_cache",
]  # fmt: skip
# Columns added after the first catalogs were written, with the value their older rows mean.
LATER_COLUMNS = {"deep_cache": ""}
SEARCH_FIELDS = ("subject", "style", "model_id", "run_id")


def catalog_key(style: str) -> str:
    return f"catalog/{slugify(style)}.parquet"


def pending_prefix(style: str) -> str:
    return f"catalog/pending/{slugify(style)}/"


def _to_parquet(frame: pd.DataFrame) -> bytes:
    buffer = io.BytesIO()
    frame.to_parquet(buffer, index=False)
    return buffer.getvalue()


def _from_parquet(data: bytes) -> pd.DataFrame:
    frame = pd.read_parquet(io.BytesIO(data))
    for column, value in LATER_COLUMNS.items():
        if column not in frame.columns:
            frame[column] = value
    return frame


def empty_catalog() -> pd.DataFrame:
    return pd.DataFrame({column: pd.Series(dtype="object") for column in COLUMNS})


def rows_frame(records: Iterable[dict]) -> pd.DataFrame:
    frame = pd.DataFrame(list(records), columns=COLUMNS)
    return frame if len(frame) else empty_catalog()


def catalog_record(provenance: Provenance, path: str) -> dict:
    return {**asdict(provenance), "path": path}


def write_pending(store: ArtifactStore, style: str, name: str, records: Sequence[dict]) -> None:
    """Save a batch of new images' rows until ``merge_catalog`` folds them in."""
    if records:
        store.write_bytes(f"{pending_prefix(style)}{name}.parquet", _to_parquet(rows_frame(records)))


def read_style_catalog(store: ArtifactStore, style: str) -> pd.DataFrame:
    key = catalog_key(style)
    return _from_parquet(store.read_bytes(key)) if store.exists(key) else empty_catalog()


def read_catalog(store: ArtifactStore) -> pd.DataFrame:
    """Every style's catalog together (pending batches not yet merged are not included)."""
    frames = [
        _from_parquet(store.read_bytes(key))
        for key in sorted(store.list_keys("catalog/"))
        if key.endswith(".parquet") and key.count("/") == 1
    ]
    frames = [frame for frame in frames if len(frame)]
    return pd.concat(frames, ignore_index=True) if frames else empty_catalog()


@dataclass(frozen=True)
class MergeReport:
    rows: int
    added_from_records: int
    recovered_from_png: int


def merge_catalog(store: ArtifactStore, style: str, grid_rows: Sequence[PromptRow]) -> tuple[pd.DataFrame, MergeReport]:
    """Fold pending records into the style's catalog, recovering rows for images without one.

    An image of the grid that exists in the store but has no row (its run died between writing
    the PNG and its record) gets its row back from the PNG's provenance chunk.
    """
    catalog = read_style_catalog(store, style)
    pending_keys = sorted(k for k in store.list_keys(pending_prefix(style)) if k.endswith(".parquet"))
    pending = [_from_parquet(store.read_bytes(key)) for key in pending_keys]
    known = set(catalog["key"])
    added = 0
    frames = [catalog]
    for frame in pending:
        fresh = frame[~frame["key"].isin(known)]
        known.update(fresh["key"])
        added += len(fresh)
        frames.append(fresh)
    recovered = []
    for row in grid_rows:
        if row.key in known:
            continue
        image_key = image_key_path(row.key)
        if store.exists(image_key):
            recovered.append(catalog_record(read_provenance(store.read_bytes(image_key)), store.location(image_key)))
            known.add(row.key)
    if recovered:
        frames.append(rows_frame(recovered))
    merged = pd.concat([f for f in frames if len(f)], ignore_index=True) if any(len(f) for f in frames) else empty_catalog()
    merged = merged[COLUMNS].sort_values(["subject", "image_index", "created"], kind="stable", ignore_index=True)
    if added or recovered or not store.exists(catalog_key(style)):
        store.write_bytes(catalog_key(style), _to_parquet(merged))
    for key in pending_keys:
        store.delete(key)
    return merged, MergeReport(rows=len(merged), added_from_records=added, recovered_from_png=len(recovered))


def search(catalog: pd.DataFrame, **filters: str | None) -> pd.DataFrame:
    """Rows matching every given filter: case-insensitive substring match on its column.

    Filters are named by ``SEARCH_FIELDS`` (subject, style, model_id, run_id).
    """
    mask = pd.Series(True, index=catalog.index)
    for name, value in filters.items():
        if name not in SEARCH_FIELDS:
            raise ValueError(f"cannot filter on {name!r}; use one of {SEARCH_FIELDS}")
        if value:
            mask &= catalog[name].astype(str).str.contains(value, case=False, regex=False)
    return catalog[mask].reset_index(drop=True)
