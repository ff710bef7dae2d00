"""The page of found images: thumbnails read from the store, captions, what could not be read."""

import base64
import io
import random
import re
from html.parser import HTMLParser
from pathlib import Path

import pytest
from PIL import Image

from sd_assets.cli import main
from sd_assets.domain import catalog
from sd_assets.domain.errors import StoreError
from sd_assets.domain.found_images import show_images
from sd_assets.domain.pngmeta import Provenance, encode_png, image_key_path
from sd_assets.domain.prompts import PromptRow
from sd_assets.domain.store import LocalStore
from sd_assets_tests.helpers import claiming_size


class _Page(HTMLParser):
    """The page's figures: each one's image source (or text in its place) and caption text."""

    def __init__(self):
        super().__init__()
        self.figures: list[dict] = []
        self._in = None
        self.scripts = 0

    def handle_starttag(self, tag, attrs):
        attributes = dict(attrs)
        if tag == "figure":
            self.figures.append({"src": None, "missing": "", "caption": "", "title": attributes.get("title")})
        elif tag == "img" and self.figures:
            self.figures[-1]["src"] = attributes["src"]
        elif tag == "div" and "missing" in (attributes.get("class") or "").split():
            self._in = "missing"
        elif tag == "figcaption":
            self._in = "caption"
        elif tag == "script":
            self.scripts += 1

    def handle_endtag(self, tag):
        if tag in ("div", "figcaption"):
            self._in = None

    def handle_data(self, data):
        if self._in and self.figures:
            self.figures[-1][self._in] += data


def _figures(html: str) -> _Page:
    page = _Page()
    page.feed(html)
    return page


def _pixels(data_url: str) -> Image.Image:
    header, encoded = data_url.split(",", 1)
    assert header in ("data:image/png;base64", "data:image/jpeg;base64")
    image = Image.open(io.BytesIO(base64.b64decode(encoded)))
    image.load()
    return image


def _png_bytes(image: Image.Image) -> bytes:
    encoded = io.BytesIO()
    image.save(encoded, "PNG")
    return encoded.getvalue()


def _store_with(data: Path, images: list[tuple[str, tuple[int, int, int], int]], style: str = "Banksy") -> LocalStore:
    """A store whose ``style`` catalog holds one image per (subject, colour, size): a plain square
    of that colour, so a thumbnail shows which image it is."""
    store = LocalStore(data)
    rows, records = [], []
    for number, (subject, colour, size) in enumerate(images):
        key = f"{number + 1:064x}"
        prompt = f"{subject} by {style}"
        made = Provenance(
            key=key, subject=subject, style=style, image_index=0, prompt=prompt, negative_prompt="",
            seed=1000 + number, model_id="org/real-model", model_revision="ab" * 20, scheduler="PNDMScheduler",
            steps=50, guidance_scale=7.5, width=size, height=size, run_id=f"{number:08d}-run",
            partition=style, created="2026-12-07T10:20:30+00:00", device="cpu", dtype="float32",
        )  # fmt: skip
        store.write_bytes(image_key_path(key), encode_png(Image.new("RGB", (size, size), colour), made))
        rows.append(PromptRow(subject, style, 0, prompt, "", 1000 + number, key))
        records.append(catalog.catalog_record(made, store.location(image_key_path(key))))
    catalog.write_pending(store, style, "run-1-000001", records)
    catalog.merge_catalog(store, style, rows)
    return store


def test_found_images_show_each_image_with_its_caption_and_settings(tmp_path):
    red, blue = (200, 10, 10), (10, 10, 200)
    store = _store_with(tmp_path / "data", [("alan turing", red, 64), ("ada <b>lovelace</b>", blue, 512)])

    found = catalog.search(catalog.read_catalog(store), style="banksy")
    shown = show_images(found, store)

    assert (shown.shown, shown.total, shown.unreadable) == (2, 2, 0)
    assert repr(shown) == "FoundImages(shown=2, total=2, unreadable=0)", "a terminal prints no page of base64"
    figures = {f["caption"].split(" by ")[0]: f for f in _figures(shown.html).figures}
    assert set(figures) == {"alan turing", "ada <b>lovelace</b>"}, "a subject is text, not markup"
    small, large = _pixels(figures["alan turing"]["src"]), _pixels(figures["ada <b>lovelace</b>"]["src"])
    # A small image is shown as it is; a large one as a thumbnail of at most 256 pixels.
    assert (small.format, small.size, small.getpixel((5, 5))) == ("PNG", (64, 64), red)
    assert large.format == "JPEG" and large.size == (256, 256)
    assert all(abs(a - b) <= 3 for a, b in zip(large.getpixel((100, 100)), blue))
    caption = figures["alan turing"]["caption"]
    assert "Banksy · seed 1000 · run 00000000 · 2026-12-07 10:20 UTC" in caption
    assert "50 steps · 64x64 · guidance 7.5 · PNDMScheduler · org/real-model@abababa" in caption
    assert figures["alan turing"]["title"] == store.location(image_key_path(f"{1:064x}"))
    assert "2 found images." in shown.html and "noise" not in shown.html
    # The notebook shows the fragment; its styles do not reach outside it.
    assert shown._repr_html_() == shown.html and "<html" not in shown.html
    assert all(line.strip().startswith((".sd-assets-found", "<", "{")) or not line.strip()
               for line in shown.html.split("<style>")[1].split("</style>")[0].splitlines())  # fmt: skip

    page = shown.save(tmp_path / "out" / "found.html")
    assert page == (tmp_path / "out" / "found.html").absolute()
    text = page.read_text()
    assert text.startswith("<!doctype html>") and shown.html in text and "<title>2 found images · sd-assets" in text


def test_found_images_beyond_the_limit_are_counted_and_unreadable_ones_say_why(tmp_path):
    colours = [(i * 20, 0, 0) for i in range(7)]
    store = _store_with(tmp_path / "data", [(f"subject {i}", colour, 32) for i, colour in enumerate(colours)])

    def png(number: int) -> Path:
        return tmp_path / "data" / image_key_path(f"{number:064x}")

    png(1).unlink()  # gone from the store
    png(2).write_bytes(b"not a png")
    png(3).write_bytes(b"")
    png(4).write_bytes(png(4).read_bytes()[:-40])  # a copy broken off inside its pixels

    shown = show_images(catalog.read_catalog(store), store, limit=5)

    assert (shown.shown, shown.total, shown.unreadable) == (5, 7, 4)
    assert "The first 5 of 7 found images: narrow the search, or give show_images a larger limit." in shown.html
    assert "4 of them could not be read from the store" in shown.html
    gone, garbage, empty, cut_short, fine = _figures(shown.html).figures
    assert gone["src"] is None and gone["missing"].startswith("not in the store: ")
    assert gone["missing"].endswith(f"{1:064x}.png does not exist")
    assert (garbage["src"], garbage["missing"]) == (None, f"{png(2)} is not an image")
    assert (empty["src"], empty["missing"]) == (None, f"{png(3)} is empty (0 bytes)")
    assert cut_short["src"] is None and cut_short["missing"].startswith(f"{png(4)} is damaged: ")
    assert _pixels(fine["src"]).getpixel((0, 0)) == colours[4]
    with pytest.raises(ValueError, match="limit and size must be at least 1"):
        show_images(catalog.read_catalog(store), store, limit=0)


@pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")
def test_a_file_claiming_more_pixels_than_a_grid_makes_is_not_decoded_for_its_thumbnail(tmp_path):
    store = _store_with(tmp_path / "data", [(f"subject {i}", (i, 0, 0), 32) for i in range(1, 4)])

    def png(number: int) -> Path:
        return tmp_path / "data" / image_key_path(f"{number:064x}")

    # A few hundred bytes each: decoded, 676 MB and 1.6 GB.
    png(1).write_bytes(claiming_size(png(1).read_bytes(), 13000, 13000))
    png(2).write_bytes(claiming_size(png(2).read_bytes(), 20000, 20000))  # past what Pillow opens

    shown = show_images(catalog.read_catalog(store), store)

    assert (shown.shown, shown.unreadable) == (3, 2)
    huge, bomb, fine = _figures(shown.html).figures
    assert (huge["src"], huge["missing"]) == (None, f"{png(1)} is 13000x13000, larger than any image of a grid")
    assert bomb["src"] is None and bomb["missing"].startswith(f"{png(2)} is damaged: Image size (400000000 pixels)")
    assert _pixels(fine["src"]).getpixel((0, 0)) == (3, 0, 0)


def test_rows_put_together_in_a_notebook_are_shown_with_what_they_have(tmp_path):
    """Records with empty cells (NaN, None) or without settings still make a page."""
    store = _store_with(tmp_path / "data", [("alan turing", (0, 200, 0), 16)])
    record = catalog.read_catalog(store).to_dict("records")[0]
    rows = [
        {**record, "steps": float("nan"), "created": None, "run_id": float("nan")},
        {"key": None, "subject": "someone", "prompt": "someone by nobody", "style": "nobody", "seed": None},
    ]

    shown = show_images(rows, store)

    first, second = _figures(shown.html).figures
    assert _pixels(first["src"]).getpixel((0, 0)) == (0, 200, 0)
    assert "steps" not in first["caption"] and "UTC" not in first["caption"] and "run" not in first["caption"]
    assert second["missing"] == "no content key in this row"
    assert second["caption"] == "someone by nobodynobody", "no 'seed None', no empty run"
    assert (shown.shown, shown.unreadable) == (2, 1)


def test_tiny_random_images_are_said_to_be_noise(grid_path, instance):
    from sd_assets_tests.helpers import materialize_style

    materialize_style(grid_path, "Andy Warhol", instance)
    store = LocalStore(grid_path.parent / "data")

    shown = show_images(catalog.search(catalog.read_catalog(store), subject="turing"), store)

    assert shown.shown == 2 and shown.unreadable == 0
    assert "are noise by design, not pictures" in shown.html
    made = sorted(grid_path.parent.joinpath("data", "images").rglob("*.png"))
    sources = {figure["src"] for figure in _figures(shown.html).figures}
    # The thumbnails are the PNGs themselves (64x64), provenance chunks included.
    assert sources <= {"data:image/png;base64," + base64.b64encode(png.read_bytes()).decode() for png in made}


def test_search_html_writes_the_page_and_prints_its_path(tmp_path, monkeypatch, capsys):
    store = _store_with(tmp_path / "data", [("alan turing", (1, 2, 3), 8), ("ada lovelace", (4, 5, 6), 8)])
    monkeypatch.setenv("SD_ASSETS_STORAGE", str(tmp_path / "data"))
    monkeypatch.chdir(tmp_path)

    assert main(["search", "--subject", "turing", "--where", "steps=50", "--html", "found/turing.html"]) == 0

    out = capsys.readouterr()
    page = tmp_path / "found" / "turing.html"
    assert out.out == f"{page}\n" and out.err == "1 image on the page\n"
    html = page.read_text()
    assert "Found by <code>sd-assets search --subject turing --where steps=50</code> in " in html
    (figure,) = _figures(html).figures
    assert _pixels(figure["src"]).getpixel((0, 0)) == (1, 2, 3)

    store.delete(image_key_path(f"{2:064x}"))
    assert main(["search", "--subject", "ada", "--html", str(page)]) == 2
    err = capsys.readouterr().err
    assert err.endswith("1 image could not be read from the store; the page says why in each one's place\n")
    assert "not in the store: " in page.read_text()

    # No match: the page says so, rather than an earlier search's page staying there.
    assert main(["search", "--subject", "nobody", "--html", str(page)]) == 0
    out = capsys.readouterr()
    assert (out.out, out.err) == (f"{page}\n", "no images match\n")
    assert "No images match." in page.read_text() and not _figures(page.read_text()).figures
    with pytest.raises(SystemExit):
        main(["search", "--json", "--html", "x.html"])
    assert "not allowed with argument" in capsys.readouterr().err
    with pytest.raises(SystemExit):  # "$OUT" unset in a script
        main(["search", "--html", ""])
    assert "argument --html: is empty: give the path of the page to write" in capsys.readouterr().err
    # A folder given for the page, or a file where its folder should be: said in those words.
    with pytest.raises(SystemExit):
        main(["search", "--subject", "turing", "--html", str(tmp_path)])
    folder_given = f"{tmp_path} is a folder: give the page a file name in it, such as {tmp_path}/found.html"
    assert folder_given in capsys.readouterr().err
    assert main(["search", "--subject", "turing", "--html", str(page / "turing.html")]) == 2
    file_in_the_way = f"sd-assets: cannot write {page}/turing.html: {page} is a file, not a folder\n"
    assert capsys.readouterr().err == file_in_the_way


def test_search_html_replaces_only_a_page_it_wrote(tmp_path, monkeypatch, capsys):
    store = _store_with(tmp_path / "data", [("alan turing", (1, 2, 3), 8)])
    monkeypatch.setenv("SD_ASSETS_STORAGE", str(tmp_path / "data"))
    [png] = (tmp_path / "data" / "images").rglob("*.png")
    grid = tmp_path / "grid.yaml"
    grid.write_text("styles: [Banksy]\n")
    gallery_page = tmp_path / "data" / "gallery" / "index.html"
    gallery_page.parent.mkdir(parents=True)
    gallery_page.write_text("<!doctype html><title>Gallery · sd-assets</title>")
    kept = {path: path.read_bytes() for path in (png, grid, gallery_page)}

    # A slip of the hand (an image's path pasted, the grid's name, a gallery page) writes nothing.
    for path, why in [
        (png, f"{png} does not end in .html: give the page a name that does, such as found.html"),
        (grid, f"{grid} does not end in .html: give the page a name that does, such as found.html"),
        (gallery_page, f"{gallery_page} is there and is not a page sd-assets search wrote: give another name, "
                       "or remove it first"),
    ]:  # fmt: skip
        with pytest.raises(SystemExit):
            main(["search", "--subject", "turing", "--html", str(path)])
        assert f"argument --html: {why}" in capsys.readouterr().err
    assert {path: path.read_bytes() for path in kept} == kept

    # Its own page, written before, it replaces; in a notebook too, where the same slips are refused.
    page = tmp_path / "found.HTML"
    assert main(["search", "--subject", "turing", "--html", str(page)]) == 0
    assert main(["search", "--subject", "nobody", "--html", str(page)]) == 0
    assert "No images match." in page.read_text()
    found = show_images(catalog.search(catalog.read_catalog(store), subject="turing"), store)
    assert found.save(page) == page and found.shown == 1
    with pytest.raises(StoreError, match=f"not written: {re.escape(str(png))} does not end in .html"):
        found.save(png)
    assert {path: path.read_bytes() for path in kept} == kept


def test_search_html_says_how_to_see_the_images_past_its_limit(tmp_path, monkeypatch, capsys):
    from sd_assets import cli

    _store_with(tmp_path / "data", [(f"subject {i}", (i, i, i), 8) for i in range(3)])
    monkeypatch.setenv("SD_ASSETS_STORAGE", str(tmp_path / "data"))
    monkeypatch.setattr(cli, "HTML_LIMIT", 2)

    assert main(["search", "--html", str(tmp_path / "found.html")]) == 0

    assert capsys.readouterr().err == "the first 2 of 3 found images are on the page; narrow the search to see the others\n"
    assert "The first 2 of 3 found images: narrow the search to see the others." in (tmp_path / "found.html").read_text()


def test_a_large_png_within_the_thumbnail_size_goes_on_the_page_as_a_jpeg(tmp_path):
    """A 256x256 PNG of noise is about 200 kB: inlined whole, 500 of them would make a page of 130 MB."""
    store = _store_with(tmp_path / "data", [("alan turing", (0, 0, 0), 256)])
    noisy = Image.frombytes("RGB", (256, 256), random.Random(0).randbytes(256 * 256 * 3))
    key = f"{1:064x}"
    store.write_bytes(image_key_path(key), _png_bytes(noisy))
    assert len(store.read_bytes(image_key_path(key))) > 40_000

    (figure,) = _figures(show_images(catalog.read_catalog(store), store).html).figures

    thumbnail = _pixels(figure["src"])
    assert thumbnail.format == "JPEG" and thumbnail.size == (256, 256) and len(figure["src"]) < 150_000
