"""Gallery pages: a static site under ``gallery/`` in the store, browsable from disk or a bucket.

Owns rendering (Jinja2, autoescaped) of one set of pages per style, N images a page with prompt,
seed and any DeepCache setting under each, and the index: every style with its counts and a
subject x style contact sheet, and the small utilisation-over-time chart a style page shows
under "Last generation".
Every link is relative, so the folder works wherever it is opened or served.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import jinja2

from sd_assets.domain.grid import slugify
from sd_assets.domain.pngmeta import image_key_path
from sd_assets.domain.prompts import PromptRow
from sd_assets.domain.store import ArtifactStore

INDEX_KEY = "gallery/index.html"
DEFAULT_PAGE_SIZE = 48

_ENVIRONMENT = jinja2.Environment(
    loader=jinja2.PackageLoader("sd_assets", "templates"),
    autoescape=jinja2.select_autoescape(default=True, default_for_string=True),
    undefined=jinja2.StrictUndefined,
    trim_blocks=True,
    lstrip_blocks=True,
)


def style_page_key(style: str, page: int) -> str:
    return f"gallery/{slugify(style)}/page-{page}.html"


@dataclass(frozen=True)
class StyleSummary:
    """One style's line in the index."""

    style: str
    total: int
    present: int
    # Whether the style's pages exist: a style whose first run has not reached style_gallery
    # yet (queued in a backfill, or stopped) is listed without a link.
    has_pages: bool

    @property
    def link(self) -> str | None:
        return f"{slugify(self.style)}/page-1.html" if self.has_pages else None


CHART_WIDTH = 320
CHART_HEIGHT = 80


def render_utilisation_chart(points: Sequence[tuple[float, float]], seconds: float) -> str:
    """An inline SVG line of ``(seconds, percent)`` points over ``[0, seconds]``, 0-100% high."""
    span = seconds if seconds > 0 else 1.0
    xy = [
        (CHART_WIDTH * min(max(t / span, 0.0), 1.0), CHART_HEIGHT * (1 - min(max(p, 0.0), 100.0) / 100))
        for t, p in points
    ]
    if len(xy) == 1:
        # One reading: draw it as a level line across the chart.
        xy = [(0.0, xy[0][1]), (float(CHART_WIDTH), xy[0][1])]
    return _ENVIRONMENT.get_template("utilisation_chart.svg.j2").render(
        width=CHART_WIDTH,
        height=CHART_HEIGHT,
        seconds=f"{seconds:.0f}",
        points=" ".join(f"{x:.1f},{y:.1f}" for x, y in xy),
    )


def _page_count(total: int, page_size: int) -> int:
    return max(1, math.ceil(total / page_size))


def render_style_pages(
    store: ArtifactStore,
    style: str,
    rows: Sequence[PromptRow],
    present: set[str],
    page_size: int = DEFAULT_PAGE_SIZE,
    profile: dict | None = None,
    deep_cache: dict[str, str] | None = None,
) -> list[str]:
    """Write the style's pages; returns their store keys. Missing images show as placeholders.

    ``deep_cache`` maps the keys of images made with DeepCache to its setting, shown under them.
    """
    template = _ENVIRONMENT.get_template("style_page.html.j2")
    pages = _page_count(len(rows), page_size)
    keys = []
    for page in range(1, pages + 1):
        chunk = rows[(page - 1) * page_size : page * page_size]
        items = [
            {"row": row, "src": "../../" + image_key_path(row.key), "present": row.key in present,
             "deep_cache": (deep_cache or {}).get(row.key)}  # fmt: skip
            for row in chunk
        ]
        html = template.render(
            style=style,
            items=items,
            page=page,
            pages=pages,
            total=len(rows),
            present=sum(1 for row in rows if row.key in present),
            profile=profile,
        )
        key = style_page_key(style, page)
        store.write_text(key, html)
        keys.append(key)
    # Pages beyond the new last one (the grid shrank) would be stale: remove them.
    for key in list(store.list_keys(f"gallery/{slugify(style)}/")):
        name = key.rsplit("/", 1)[-1]
        if name.startswith("page-") and key not in keys:
            store.delete(key)
    return keys


def render_index(
    store: ArtifactStore,
    summaries: Sequence[StyleSummary],
    rows_by_style: dict[str, Sequence[PromptRow]],
    present: set[str],
) -> str:
    """Write ``gallery/index.html``: counts per style and the subject x style contact sheet.

    The contact sheet shows image 0 of every subject in every style: one row of it compares the
    styles under the same starting noise.
    """
    styles = [summary.style for summary in summaries]
    subjects: dict[str, None] = {}
    cells: dict[tuple[str, str], dict] = {}
    for style in styles:
        for row in rows_by_style.get(style, ()):
            if row.image_index != 0:
                continue
            subjects.setdefault(row.subject, None)
            cells[(row.subject, style)] = {
                "src": "../" + image_key_path(row.key),
                "present": row.key in present,
                "row": row,
            }
    html = _ENVIRONMENT.get_template("index.html.j2").render(
        summaries=summaries,
        styles=styles,
        subjects=list(subjects),
        cells=cells,
        total=sum(s.total for s in summaries),
        present=sum(s.present for s in summaries),
    )
    store.write_text(INDEX_KEY, html)
    return INDEX_KEY
