"""Gallery pages: a static site under ``gallery/`` in the store, browsable from disk or a bucket.

Owns rendering (Jinja2, autoescaped) of the pages of each style: the current grid's images, N a
page, with prompt, seed, run and any DeepCache setting under each and the grid's settings above;
then the style's earlier images (from its catalog, those not in its grid now: other subjects,
settings or models), each with its own settings. And the index: every style of the grid with its
counts, the other styles the store holds, and a subject x style contact sheet; and the small
utilisation-over-time chart a style page shows under "Last generation". And the images a catalog
search found (``render_found_images``), for ``sd_assets.domain.found_images``. Pages that show images made
by the offline ``tiny-random`` model say that its images are noise.
Every link is relative, so the folder works wherever it is opened or served.
"""

from __future__ import annotations

import hashlib
import json
import math
import posixpath
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import jinja2
import markupsafe

from sd_assets.domain.grid import TINY_MODEL_ID, slugify
from sd_assets.domain.pngmeta import image_key_path
from sd_assets.domain.prompts import PromptRow
from sd_assets.domain.store import ArtifactStore

INDEX_KEY = "gallery/index.html"
DEFAULT_PAGE_SIZE = 48
# Subjects a contact-sheet page shows: the index holds the first ones, CONTACT_FOLDER the rest.
CONTACT_PAGE_SUBJECTS = 100
# No style's folder: a style starts with a letter or digit, and so does its slug.
CONTACT_FOLDER = "gallery/_contact/"

def count(number: int, noun: str) -> str:
    """``1 image``, ``2 images``."""
    return f"{number} {noun}" if number == 1 else f"{number} {noun}s"


_ENVIRONMENT = jinja2.Environment(
    loader=jinja2.PackageLoader("sd_assets", "templates"),
    autoescape=jinja2.select_autoescape(default=True, default_for_string=True),
    undefined=jinja2.StrictUndefined,
    trim_blocks=True,
    lstrip_blocks=True,
)
_ENVIRONMENT.filters["count"] = count


def style_page_key(style: str, page: int) -> str:
    return f"gallery/{slugify(style)}/page-{page}.html"


def earlier_page_key(style: str, page: int) -> str:
    return f"gallery/{slugify(style)}/earlier-{page}.html"


def settings_text(row: Mapping) -> str:
    """What besides prompt and seed made a catalog row's image, in one line: steps, size, guidance,
    scheduler, model, and the negative prompt, DeepCache setting, safety checker and the dtype and
    device it was made in (float16 on a GPU draws other pixels than float32 on a CPU) when it has them."""
    parts = [
        count(row["steps"], "step"), f"{row['width']}x{row['height']}", f"guidance {row['guidance_scale']:g}",
        row["scheduler"], f"{row['model_id']}@{row['model_revision'][:7]}",
    ]  # fmt: skip
    if row.get("negative_prompt"):
        parts.append(f"negative prompt: {row['negative_prompt']}")
    if row.get("deep_cache"):
        parts.append(f"DeepCache {row['deep_cache']}")
    if row.get("safety_checker"):
        parts.append("safety checker on")
    if row.get("dtype"):
        parts.append(made_in(row))
    return " · ".join(parts)


def made_in(row: Mapping) -> str:
    """The dtype and device a catalog row's image was made in ('float16 on cuda'), as ``settings_text`` says it."""
    if not row.get("dtype"):
        return ""
    return f"{row['dtype']} on {row['device']}" if row.get("device") else row["dtype"]


def grid_settings_text(first_made: Mapping, made_ins: Mapping[str, int]) -> str:
    """The grid's settings line: ``settings_text`` of its first made image, which every made image
    shares (its content key hashes them) but for the dtype and device. ``made_ins`` counts the
    made images by those (``made_in``): where they differ (a style run on a GPU after a CPU), the
    line says how many were made in each, not the first image's alone."""
    if len(made_ins) <= 1:
        return settings_text(first_made)
    ways = ", ".join(f"{way or 'unrecorded'} ({count(n, 'image')})" for way, n in
                     sorted(made_ins.items(), key=lambda item: (-item[1], item[0])))  # fmt: skip
    return f"{settings_text({**first_made, 'dtype': ''})} · made in {ways}"


def _prompt_parts(prompt: str, subject: str) -> tuple[str, str, str]:
    """The prompt around its subject, and the subject: a caption isolates the subject in its own
    ``<bdi>``, so that a text-direction mark in it stops there, not at the prompt's end. Where the
    subject's text is not in the prompt exactly once (the template or style holds it too), which
    occurrence is the subject is unknown: nothing is isolated rather than the wrong text."""
    if not subject or prompt.count(subject) != 1:
        return (prompt, "", "")
    return prompt.partition(subject)


PAGER_WINDOW = 2


def pager_numbers(page: int, pages: int) -> list[int | None]:
    """The page numbers a pager links: the first, the last and ``PAGER_WINDOW`` either side of
    ``page``; None where numbers are left out (a single page left out is linked instead: an
    ellipsis there would take as much room). Bounded, however many pages there are."""
    shown = sorted({1, pages, *range(max(1, page - PAGER_WINDOW), min(pages, page + PAGER_WINDOW) + 1)})
    numbers: list[int | None] = []
    for number in shown:
        if numbers and number - numbers[-1] == 2:
            numbers.append(number - 1)
        elif numbers and number - numbers[-1] > 2:
            numbers.append(None)
        numbers.append(number)
    return numbers


@dataclass(frozen=True)
class StyleSummary:
    """One style's line in the index."""

    style: str
    total: int
    present: int
    # Whether the style's pages exist: a style whose first run has not reached style_gallery
    # yet (queued in a backfill, or stopped) is listed without a link.
    has_pages: bool
    # The style's catalog could not be read: what it holds, ``present`` included, is unknown.
    unreadable: bool = False

    @property
    def link(self) -> str | None:
        return _relative(INDEX_KEY, style_page_key(self.style, 1)) if self.has_pages else None


@dataclass(frozen=True)
class StylePages:
    """The pages of a style ``render_style_pages`` made, and how many it had to write."""

    pages: list[str]
    earlier_pages: list[str] = field(default_factory=list)
    earlier_images: int = 0
    written: int = 0  # pages whose content changed (or that were missing); the others were left alone


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


def contact_page_key(page: int) -> str:
    """Page ``page`` of the contact sheet: the index is page 1."""
    return INDEX_KEY if page == 1 else f"{CONTACT_FOLDER}page-{page}.html"


def _write_changed_pages(store: ArtifactStore, folder: str, html_by_key: Mapping[str, str]) -> int:
    """Write the pages of ``folder`` whose content differs from what ``<folder>pages.json`` says
    was written last time (or that went missing), record them, and remove the folder's pages that
    are gone (the run before had more); returns how many pages were written."""
    manifest_key = f"{folder}pages.json"
    existing = set(store.list_keys(folder))
    try:
        written_before = json.loads(store.read_text(manifest_key)) if manifest_key in existing else {}
    except ValueError:  # unreadable: every page is written again
        written_before = {}
    if not isinstance(written_before, dict):
        written_before = {}
    manifest, written = {}, 0
    for key, html in html_by_key.items():
        manifest[key] = hashlib.sha256(html.encode()).hexdigest()
        if key not in existing or written_before.get(key) != manifest[key]:
            store.write_text(key, html)
            written += 1
    if manifest != written_before:
        store.write_text(manifest_key, json.dumps(manifest, indent=0, sort_keys=True))
    for key in existing:
        if key.endswith(".html") and key not in html_by_key:
            store.delete(key)
    return written


def _newest_runs_first(rows: list[Mapping]) -> list[Mapping]:
    """Catalog rows by run, the newest run first, and in subject and image order within a run
    (a row's time has one-second steps, so sorting by it alone scrambles a run's images)."""
    latest: dict[str, str] = {}
    for row in rows:
        latest[row["run_id"]] = max(latest.get(row["run_id"], ""), row["created"])
    in_grid_order = sorted(rows, key=lambda r: (r["subject"], r["image_index"]))
    return sorted(in_grid_order, key=lambda r: (latest[r["run_id"]], r["run_id"]), reverse=True)


def render_style_pages(
    store: ArtifactStore,
    style: str,
    rows: Sequence[PromptRow],
    catalog_rows: Sequence[Mapping],
    page_size: int = DEFAULT_PAGE_SIZE,
    profile: dict | None = None,
    as_of: str = "",
    refused: Mapping[str, str] | None = None,
) -> StylePages:
    """Write the style's pages: the grid's ``rows`` (missing images as placeholders), then the
    images of its catalog that are not in them, newest first, each with its settings.

    ``catalog_rows`` are the style's catalog rows (dicts of its columns); ``as_of`` (the run and
    time writing the pages) is shown on page 1 beside the counts; ``refused`` (content key -> why)
    says why a missing image was not made, in its place. The grid's settings,
    shown above its images, are those its made images have. A page whose content is what
    ``gallery/<slug>/pages.json`` says was written last time is not written again (a style with
    thousands of earlier images costs two writes when nothing changed: page 1, whose ``as_of``
    changes, and the record); pages left from a longer run are removed.
    """
    template = _ENVIRONMENT.get_template("style_page.html.j2")
    made = {row["key"]: row for row in catalog_rows}
    grid_keys = {row.key for row in rows}
    earlier = _newest_runs_first([r for r in catalog_rows if r["key"] not in grid_keys])
    first_made = next((made[row.key] for row in rows if row.key in made), None)
    made_ins = Counter(made_in(made[row.key]) for row in rows if row.key in made)
    common = {
        "style": style, "profile": profile, "earlier_images": len(earlier), "as_of": as_of,
        "grid_settings": grid_settings_text(first_made, made_ins) if first_made else None,
        "total": len(rows), "present": sum(1 for row in rows if row.key in made),
    }  # fmt: skip

    def items(chunk: Sequence[Mapping]) -> list[dict]:
        return [
            {"row": row, "src": "../../" + image_key_path(row["key"]), "made": made.get(row["key"]),
             "prompt_parts": _prompt_parts(row["prompt"], row["subject"]), "refused": (refused or {}).get(row["key"]),
             "settings": settings_text(row) if "steps" in row else None,
             # Where the grid's images were made in several ways, each says which (an earlier
             # image's settings say it already).
             "made_in": made_in(made[row["key"]]) if len(made_ins) > 1 and "steps" not in row and row["key"] in made
             else None}  # fmt: skip
            for row in chunk
        ]

    grid_rows = [
        {"key": r.key, "prompt": r.prompt, "subject": r.subject, "seed": r.seed, "image_index": r.image_index}
        for r in rows
    ]  # fmt: skip
    html_by_key: dict[str, str] = {}
    keys: dict[str, list[str]] = {"grid": [], "earlier": []}
    for kind, entries, name in (("grid", grid_rows, style_page_key), ("earlier", earlier, earlier_page_key)):
        pages = _page_count(len(entries), page_size) if (entries or kind == "grid") else 0
        for page in range(1, pages + 1):
            chunk = entries[(page - 1) * page_size : page * page_size]
            if kind == "grid":  # the grid's images are made with one model
                random_weights = first_made is not None and first_made["model_id"] == TINY_MODEL_ID
            else:
                random_weights = any(row["model_id"] == TINY_MODEL_ID for row in chunk)
            html_by_key[name(style, page)] = template.render(
                **common, kind=kind, items=items(chunk), page=page, pages=pages, random_weights=random_weights,
                pager_links=pager_numbers(page, pages),
                href=lambda number, here=name(style, page), name=name: _relative(here, name(style, number)),
            )  # fmt: skip
            keys[kind].append(name(style, page))
    written = _write_changed_pages(store, f"gallery/{slugify(style)}/", html_by_key)
    return StylePages(keys["grid"], keys["earlier"], earlier_images=len(earlier), written=written)


def render_index(
    store: ArtifactStore,
    summaries: Sequence[StyleSummary],
    rows_by_style: dict[str, Sequence[PromptRow]],
    present: set[str],
    other_styles: Sequence[StyleSummary] = (),
    model_id: str = "",
    refused: Mapping[str, str] | None = None,
    grid_settings: str | None = None,
) -> str:
    """Write ``gallery/index.html``: counts per style of the grid, the settings that made its images
    (``grid_settings``, a ``settings_text``), the other styles whose images the store holds
    (``other_styles``: made by earlier grids), and the subject x style contact sheet.
    With the grid's ``model_id`` the offline ``tiny-random``, every page says its images are noise.
    ``refused`` (content key -> why, as the styles' last runs left it) says in a cell not made why
    it was not, where a later run would not fill it either.

    The contact sheet shows image 0 of every subject in every style: one row of it compares the
    styles under the same starting noise. The index holds its first ``CONTACT_PAGE_SUBJECTS``
    subjects, ``gallery/_contact/page-<n>.html`` the rest; those pages are written only when
    their content changed (the index, with its counts, every time).
    """
    styles = [summary.style for summary in summaries]
    unknown = {summary.style for summary in summaries if summary.unreadable}
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
                "unknown": style in unknown,
                "refused": (refused or {}).get(row.key),
                "row": row,
            }
    template = _ENVIRONMENT.get_template("index.html.j2")
    subject_list = list(subjects)
    pages = _page_count(len(subject_list), CONTACT_PAGE_SUBJECTS)
    contact_pages: dict[str, str] = {}
    for page in range(1, pages + 1):
        html = template.render(
            summaries=summaries, other_styles=other_styles, styles=styles, cells=cells,
            subjects=subject_list[(page - 1) * CONTACT_PAGE_SUBJECTS : page * CONTACT_PAGE_SUBJECTS],
            total=sum(s.total for s in summaries), present=sum(s.present for s in summaries),
            unreadable=[s for s in [*summaries, *other_styles] if s.unreadable], grid_settings=grid_settings,
            random_weights=model_id == TINY_MODEL_ID,
            page=page, pages=pages, pager_links=pager_numbers(page, pages), subjects_per_page=CONTACT_PAGE_SUBJECTS,
            # Page 1 is gallery/index.html, the others are one folder down.
            root="" if page == 1 else "../",
            href=lambda number, here=page: _relative(contact_page_key(here), contact_page_key(number))
            + ("#contact-sheet" if number == 1 else ""),
        )  # fmt: skip
        if page == 1:
            store.write_text(INDEX_KEY, html)
        else:
            contact_pages[contact_page_key(page)] = html
    _write_changed_pages(store, CONTACT_FOLDER, contact_pages)
    return INDEX_KEY


@dataclass(frozen=True)
class FoundItem:
    """One found image: its catalog row, and its thumbnail as a data URL, or why there is none."""

    row: Mapping
    src: str = ""
    problem: str = ""


@dataclass(frozen=True)
class FoundPage:
    """The found images as an HTML fragment (what a notebook shows) and as a whole page (a file)."""

    fragment: str
    page: str


def render_found_images(
    items: Sequence[FoundItem], total: int, *, size: int, query: str = "", location: str = "", more: str = ""
) -> FoundPage:
    """Render the images a catalog search found, each with its prompt, style, seed, run, time and
    settings; ``total`` is how many were found, of which ``items`` are the first (``more`` says
    how to see the others). ``query`` (the command that found them) and ``location`` (the
    store) head the page when given. Where any of them was made by the offline ``tiny-random``
    model, the page says its images are noise."""
    fragment = _ENVIRONMENT.get_template("found_images.html.j2").render(
        items=[
            {"row": item.row, "src": item.src, "problem": item.problem,
             "prompt_parts": _prompt_parts(item.row["prompt"], item.row["subject"]),
             "settings": settings_text(item.row) if _has_settings(item.row) else None}  # fmt: skip
            for item in items
        ],
        shown=len(items), total=total, size=size, query=query, location=location, more=more,
        unreadable=sum(1 for item in items if not item.src),
        random_weights=any(item.row.get("model_id") == TINY_MODEL_ID for item in items),
    )  # fmt: skip
    page = _ENVIRONMENT.get_template("found_page.html.j2").render(fragment=markupsafe.Markup(fragment), total=total)
    return FoundPage(fragment, page)


_SETTINGS_FIELDS = ("steps", "width", "height", "guidance_scale", "scheduler", "model_id", "model_revision")


def _has_settings(row: Mapping) -> bool:
    # A row put together in a notebook may lack a setting (found_images reads an empty cell as None).
    return all(row.get(name) is not None for name in _SETTINGS_FIELDS)


def _relative(source: str, target: str) -> str:
    """The link from the page ``source`` to the page ``target`` (both store keys under gallery/)."""
    return posixpath.relpath(target, posixpath.dirname(source))
