"""The images a catalog search found, shown: thumbnails from the store, on one self-contained page.

Owns reading the found images' PNGs from the store (a folder or S3) and making their thumbnails,
which the page holds inline: the file opens anywhere, and a notebook shows the same HTML for
``show_images(search(...), store)``. ``sd-assets search --html FILE`` writes the page.
"""

from __future__ import annotations

import base64
import io
import math
from collections.abc import Iterable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from sd_assets.domain.errors import StoreError, StoreUnavailable, unknown_home
from sd_assets.domain.gallery import FoundItem, render_found_images
from sd_assets.domain.pngmeta import image_key_path
from sd_assets.domain.store import ArtifactStore, atomic_write

if TYPE_CHECKING:
    import pandas as pd

THUMBNAIL_SIZE = 256  # pixels, the longer side
# A PNG within the thumbnail's size and this many bytes goes on the page as it is (its
# provenance with it); any other image as a JPEG thumbnail (about 18 kB for a picture at 256 px,
# 50 kB for noise).
INLINE_PNG_BYTES = 40_000
DEFAULT_LIMIT = 100
# The largest image a grid makes (4096 a side): a file in the store that says it is larger is not
# decoded for its thumbnail.
MAX_PIXELS_SHOWN = 4096 * 4096
# The text columns a caption shows: an empty cell (a row put together in a notebook) reads as '';
# any other empty cell as None.
_TEXT_FIELDS = ("key", "subject", "style", "prompt", "run_id", "created", "path", "model_id")


@dataclass(frozen=True)
class FoundImages:
    """The found images as HTML: a notebook cell shows them; ``save`` writes them as a page."""

    html: str = field(repr=False)  # a fragment, its styles scoped to it
    page: str = field(repr=False)  # a whole HTML document
    shown: int
    total: int
    unreadable: int  # shown without a thumbnail: the PNG is gone from the store, or is not an image

    def _repr_html_(self) -> str:
        return self.html

    def save(self, path: str | Path) -> Path:
        """Write the page to ``path`` (atomically, its folder made if need be) and return its
        absolute path.

        Raises:
            StoreError: the path is not one to write the page to (``page_path_problem``), or the
                file system refused it, with the path.
        """
        problem = page_path_problem(str(path))
        if problem:
            raise StoreError(f"not written: {problem}")
        target = Path(path).expanduser().absolute()
        atomic_write(target, self.page.encode("utf-8"))
        return target


# How the page says it is one: another file at its path is not replaced.
PAGE_MARK = b'<meta name="generator" content="sd-assets search">'


def page_path_problem(path: str) -> str | None:
    """Why ``path`` is not a place to write a found-images page, or None: a page is an .html file,
    and replaces only a page written before (an image of the store, a grid file or a gallery page
    given by a slip of the hand stays as it was)."""
    home = unknown_home(path)
    if home:
        return f"{path}: {home}"
    target = Path(path).expanduser()
    if target.suffix.lower() not in (".html", ".htm"):
        return f"{path} does not end in .html: give the page a name that does, such as found.html"
    try:
        with target.open("rb") as existing:
            head = existing.read(1024)
    except OSError:  # none there yet; a folder, or unreadable: said by the write, in the file system's words
        return None
    if PAGE_MARK not in head:
        return f"{path} is there and is not a page sd-assets search wrote: give another name, or remove it first"
    return None


def show_images(
    found: pd.DataFrame | Iterable[Mapping],
    store: ArtifactStore,
    *,
    limit: int = DEFAULT_LIMIT,
    size: int = THUMBNAIL_SIZE,
    query: str = "",
    more: str = "narrow the search, or give show_images a larger limit",
    threads: int = 8,
) -> FoundImages:
    """The first ``limit`` of the ``found`` catalog rows (a ``catalog.search`` result, or its
    records), each with a thumbnail of its PNG at most ``size`` pixels on a side, its prompt,
    style, seed, run, time and settings. ``query`` (the search that found them) heads the page;
    ``more`` says how to see the rows past ``limit``, where there are some.

    A row whose PNG is gone from the store, or is not an image, is shown with the reason in place
    of its thumbnail, and counted in ``unreadable``.

    Raises:
        StoreUnavailable: the store stopped answering (then no thumbnail could be read).
        ValueError: ``limit`` or ``size`` is not a positive number.
    """
    if limit < 1 or size < 1:
        raise ValueError(f"limit and size must be at least 1, not {limit} and {size}")
    # Only the rows shown become dicts: a search of a million rows shows 500 (all of them took 3 GB).
    if hasattr(found, "to_dict"):
        records, total = found.head(limit).to_dict("records"), len(found)
    else:
        found = list(found)
        records, total = found[:limit], len(found)
    rows = [_caption_row(record) for record in records]
    with ThreadPoolExecutor(max_workers=max(1, min(threads, len(rows)))) as pool:
        thumbnails = list(pool.map(lambda row: _thumbnail(store, row["key"], size), rows))
    items = [FoundItem(row, src, problem) for row, (src, problem) in zip(rows, thumbnails)]
    rendered = render_found_images(items, total, size=size, query=query, location=store.location(), more=more)
    return FoundImages(
        html=rendered.fragment, page=rendered.page, shown=len(items), total=total,
        unreadable=sum(1 for item in items if not item.src),
    )  # fmt: skip


def _caption_row(record: Mapping) -> dict:
    row = {name: None if _empty(value) else value for name, value in record.items()}
    for name in _TEXT_FIELDS:
        row[name] = "" if row.get(name) is None else str(row[name])
    for name in ("seed", "safety_flagged"):  # what a caption asks for beyond the text
        row.setdefault(name, None)
    return row


def _empty(value) -> bool:
    return value is None or (isinstance(value, float) and math.isnan(value))


def _thumbnail(store: ArtifactStore, key: str, size: int) -> tuple[str, str]:
    """The image's thumbnail as a data URL, and '', or '' and why there is none."""
    from PIL import Image, UnidentifiedImageError

    if not key:
        return "", "no content key in this row"
    try:
        data = store.read_bytes(image_key_path(key))
    except StoreUnavailable:
        raise
    except StoreError as exc:
        return "", f"not in the store: {exc}"
    where = store.location(image_key_path(key))
    if not data:
        return "", f"{where} is empty (0 bytes)"
    try:
        with Image.open(io.BytesIO(data)) as image:
            if image.width * image.height > MAX_PIXELS_SHOWN:  # decoded, it would take gigabytes
                return "", f"{where} is {image.width}x{image.height}, larger than any image of a grid"
            image.load()  # the whole file: one cut short (a copy broken off) opens, and fails here
            if image.format == "PNG" and max(image.size) <= size and len(data) <= INLINE_PNG_BYTES:
                return _data_url("image/png", data), ""
            image.thumbnail((size, size))
            encoded = io.BytesIO()
            image.convert("RGB").save(encoded, "JPEG", quality=85)
    except UnidentifiedImageError:
        return "", f"{where} is not an image"
    except (OSError, ValueError, Image.DecompressionBombError) as exc:  # "image file is truncated", ...
        return "", f"{where} is damaged: {exc}"
    return _data_url("image/jpeg", encoded.getvalue()), ""


def _data_url(media_type: str, data: bytes) -> str:
    return f"data:{media_type};base64,{base64.b64encode(data).decode('ascii')}"
