"""The ``sd-assets`` command: run the demo grid, file a backfill for the daemon, search the image catalog across runs,
rebuild it."""

from __future__ import annotations

import argparse
import json
import os
import shlex
import sys

from sd_assets.domain.errors import SdAssetsError, StoreError

TABLE_COLUMNS = ("subject", "style", "image_index", "seed", "model_id", "run_id", "path")


# Settings that tell apart images of one subject, image and seed: a column each, shown when the
# found rows differ in it (DeepCache whenever any image has it).
VARYING_COLUMNS = (
    "steps", "guidance_scale", "width", "height", "scheduler", "negative_prompt", "model_revision", "model_variant",
    "dtype", "software", "cpu_threads", "safety_checker",
)  # fmt: skip


def display_width(text: str) -> int:
    """Columns ``text`` takes in a terminal: wide (CJK) characters two, combining marks none."""
    if text.isascii():  # no ASCII character is wide or combining; a table's cells mostly are ASCII
        return len(text)
    import unicodedata

    return sum(
        0 if unicodedata.combining(c) else 2 if unicodedata.east_asian_width(c) in "WF" else 1 for c in text
    )


# Marks that reorder the text after them (right-to-left overrides, embeddings, isolates).
_BIDI_CONTROLS = frozenset("\u061c\u200e\u200f\u202a\u202b\u202c\u202d\u202e\u2066\u2067\u2068\u2069")


def visible(text: str) -> str:
    """``text`` with what would act on the terminal instead of showing (control characters such as
    ESC, and the bidirectional marks that reorder the rest of a line) written as ``<U+XXXX>``."""
    if text.isascii() and text.isprintable():  # in ASCII only the control characters are not printable
        return text
    import unicodedata

    return "".join(
        f"<U+{ord(c):04X}>" if c in _BIDI_CONTROLS or unicodedata.category(c) == "Cc" else c for c in text
    )


# Free-text columns cut to this many terminal columns in the table (--json has them whole).
CELL_WIDTH = 40
# The most images `search --html` puts on its page: their thumbnails are inline, a PNG of up to 40 kB
# or a JPEG (about 18 kB for a picture, 50 kB for noise), under 35 MB in all as base64.
HTML_LIMIT = 500
JSON_CHUNK_ROWS = 10_000


def shorten(text: str, width: int = CELL_WIDTH) -> str:
    """``text`` cut to at most ``width`` terminal columns, ending in '…' where it was cut."""
    if display_width(text) <= width:
        return text
    kept, used = [], 0
    for char in text:  # one pass: measuring the whole string again per character took seconds
        used += display_width(char)
        if used > width - 1:
            break
        kept.append(char)
    return "".join(kept) + "…"


def text_table(rows: list[list[str]]) -> list[str]:
    """``rows`` (the first the header) as lines of aligned columns, two spaces apart; the last column unpadded."""
    widths = [max(display_width(row[i]) for row in rows) for i in range(len(rows[0]) - 1)]
    return [
        "  ".join(cell + " " * (width - display_width(cell)) for cell, width in zip(row, widths)) + "  " + row[-1]
        for row in rows
    ]


def _page_path(text: str) -> str:
    if not text.strip():  # "$OUT" unset in a script: not the table in place of the page
        raise argparse.ArgumentTypeError("is empty: give the path of the page to write")
    if os.path.isdir(os.path.expanduser(text)):
        raise argparse.ArgumentTypeError(
            f"{text} is a folder: give the page a file name in it, such as {os.path.join(text, 'found.html')}"
        )
    from sd_assets.domain.found_images import page_path_problem

    problem = page_path_problem(text)
    if problem:
        raise argparse.ArgumentTypeError(problem)
    return text


def _setting(text: str) -> tuple[str, str]:
    column, equals, value = text.partition("=")
    if not (equals and column.strip()):
        raise argparse.ArgumentTypeError(f"{text!r} is not COLUMN=VALUE (steps=50, for one)")
    return column.strip(), value.strip()


def _open_existing_store(storage: str):
    """The store at ``storage`` to read from: a folder that is not there is a mistyped store, not a new one."""
    from sd_assets.domain.store import LocalStore
    from sd_assets.environment import open_store_from_environment

    store = open_store_from_environment(storage)
    if isinstance(store, LocalStore) and not store.root.is_dir():
        raise StoreError(
            f"no store at {storage}: there is no such folder; set SD_ASSETS_STORAGE (or storage in the grid file) "
            "to the store's folder"
        )
    return store


def _search(args: argparse.Namespace) -> int:
    from sd_assets.domain.catalog import (
        COLUMNS,
        UnreadableCatalog,
        catalog_key,
        galleries_without_catalog,
        read_catalog,
        search,
        search_may_reach,
    )
    from sd_assets.domain.gallery import count
    from sd_assets.environment import storage_from_environment

    storage = storage_from_environment()
    # A damaged catalog hides its own style's images, not every style's: the search goes on
    # without it, says so, and exits 2.
    unreadable: list[UnreadableCatalog] = []
    store = _open_existing_store(storage)
    catalog = read_catalog(store, unreadable)

    def reached(slug: str) -> bool:  # a catalog the filters leave out has no rows to miss
        return search_may_reach(slug, style=args.style, where=args.where)

    missed = [entry for entry in unreadable if reached(entry.slug)]
    for entry in missed:
        print(f"sd-assets: {entry.message}; the rows in it are left out of this search", file=sys.stderr)
    if catalog.empty and not unreadable and any(key.endswith(".png") for key in store.list_keys("images/")):
        raise StoreError(  # the catalog was deleted, or not copied with the images: nothing to make again
            f"no catalog in {storage}, but it holds images; `sd-assets rebuild-catalog` gives each its row "
            "from the PNG's own provenance"
        )
    # After the line above, which says it once for the whole store, not once a style.
    lost = [slug for slug in galleries_without_catalog(store) if reached(slug)]
    for slug in lost:
        print(
            f"sd-assets: {store.location(catalog_key(slug))} is gone, though {slug}'s gallery is there: its images "
            "are left out of this search; `sd-assets rebuild-catalog` gives each its row from its PNG", file=sys.stderr,
        )  # fmt: skip
    failed = 2 if missed or lost else 0
    if catalog.empty and not unreadable:  # not "no images match": the store is new, or the wrong one
        raise StoreError(
            f"no catalog in {storage}: no style has been made there yet (make demo, or dagster job execute)"
        )
    found = search(
        catalog,
        subject=args.subject,
        style=args.style,
        prompt=args.prompt,
        model_id=args.model,
        run_id=args.run,
        key=args.key,
        where=args.where,
    )
    if args.json:
        _print_json_records(found[COLUMNS])
        return failed
    if args.html is not None:  # a page even of no images: one left from an earlier search would mislead
        return max(failed, _write_found_page(found, store, args))
    if found.empty:
        print("no images match", file=sys.stderr)
        return failed
    varying = [c for c in VARYING_COLUMNS if found[c].nunique() > 1]
    # The prompt whenever one subject in one style has several (the grid's template changed):
    # without it those images' rows read alike but for their run and path.
    if found.groupby(["subject", "style"])["prompt"].nunique().gt(1).any():
        varying.insert(0, "prompt")
    columns = list(TABLE_COLUMNS[:-1]) + varying + (["deep_cache"] if (found["deep_cache"] != "").any() else [])
    columns += ["safety_flagged"] if found["safety_flagged"].any() else []
    table = found[[*columns, "path"]].astype(str).map(visible)
    table["run_id"] = table["run_id"].str[:8]
    for free_text in {"subject", "prompt", "negative_prompt"} & set(columns):
        table[free_text] = table[free_text].map(shorten)
    if "model_revision" in table:
        table["model_revision"] = table["model_revision"].str[:7]
    for line in text_table([[*columns, "path"], *table[[*columns, "path"]].values.tolist()]):
        print(line)
    print(count(len(found), "image"), file=sys.stderr)
    return failed


def _print_json_records(found) -> None:
    """The rows as a JSON list (``json.dumps(rows, indent=1)``), printed JSON_CHUNK_ROWS at a time:
    all at once, a million rows took 8.6 GB."""
    if found.empty:
        print("[]")
        return
    print("[")
    for start in range(0, len(found), JSON_CHUNK_ROWS):
        records = json.loads(found.iloc[start : start + JSON_CHUNK_ROWS].to_json(orient="records"))
        text = ",\n".join(json.dumps(record, indent=1, ensure_ascii=False) for record in records)
        separator = ",\n" if start + JSON_CHUNK_ROWS < len(found) else "\n"
        print(" " + text.replace("\n", "\n "), end=separator)
    print("]")


def _rebuild_catalog(args: argparse.Namespace) -> int:
    from sd_assets.domain.catalog import rebuild_catalogs
    from sd_assets.domain.gallery import count
    from sd_assets.environment import storage_from_environment

    storage = storage_from_environment()
    store = _open_existing_store(storage)
    rebuild = rebuild_catalogs(store)
    if not rebuild.images and not rebuild.catalogs:
        raise StoreError(f"no images and no catalog in {storage}: nothing to rebuild there (is it the right store?)")
    for report in rebuild.reports:
        print(
            f"{store.location(report.catalog)}: {count(report.rows, 'row')} "
            f"({report.kept} kept, {report.recovered_from_png} from PNGs)"
        )
        if report.set_aside:
            print(f"  it was unreadable; the old file is now {report.set_aside}")
    if not rebuild.reports and not rebuild.errors:
        print(f"every image in {storage} has its catalog row; nothing to rebuild")
    for error in rebuild.errors:
        print(f"sd-assets: skipped {error}", file=sys.stderr)
    if rebuild.errors:
        print(f"sd-assets: {count(len(rebuild.errors), 'image')} skipped, without a catalog row", file=sys.stderr)
    return 1 if rebuild.errors else 0


def _instance(home: str | None):
    """The Dagster instance in ``home`` (DAGSTER_HOME), or a temporary one without it.

    Raises:
        SdAssetsError: ``home`` is not an absolute path to a folder, or Dagster cannot load the
            instance there (its dagster.yaml), with Dagster's reason in one line.
    """
    import os

    import dagster as dg

    if not home:
        return dg.DagsterInstance.ephemeral()
    if not os.path.isabs(home):
        raise SdAssetsError(f"DAGSTER_HOME={home} is not an absolute path; set it to {os.path.abspath(home)}")
    if not os.path.isdir(home):
        raise SdAssetsError(
            f"DAGSTER_HOME={home} is not a folder; create it (mkdir -p {home}), or unset DAGSTER_HOME for a run "
            "that is not kept"
        )
    try:
        return dg.DagsterInstance.get()
    except Exception as exc:  # a dagster.yaml that is not YAML, names a missing module, fails its schema
        reason = _instance_error(exc)
        raise SdAssetsError(f"Dagster cannot load the instance in DAGSTER_HOME={home}: {reason}") from None


def _instance_error(exc: Exception) -> str:
    """Why Dagster cannot load the instance, in one line: each reason cut to 300 columns.

    A config error's text starts with the whole schema it was checked against; its ``errors``
    say what is wrong, one each. An ``{env: NAME}`` setting whose variable is unset is named in
    the error Dagster caught (``error_data``), not in the message around it, which carries a
    stack trace.
    """
    import dagster as dg

    messages = [str(exc)]
    if exc.__cause__ is not None and str(exc.__cause__).strip():
        # "too many retries for DB connection" says nothing of why: the last try's error does.
        messages = [f"{exc}: {str(exc.__cause__).strip().splitlines()[0]}"]
    if isinstance(exc, dg.DagsterInvalidConfigError) and exc.errors:
        messages = []
        for error in exc.errors:
            caught = getattr(error.error_data, "cls_name", None)
            messages.append(error.error_data.message.split(f"{caught}: ", 1)[-1] if caught else error.message)
    # Cut: an unexpected entry's message lists the whole expected schema.
    return "; ".join(
        shorten(" ".join(message.split()).rstrip(".") or type(exc).__name__, 300) for message in messages
    )


def _backfill(args: argparse.Namespace) -> int:
    import os

    from sd_assets.domain.gallery import count
    from sd_assets.environment import grid_from_environment
    from sd_assets.orchestration.backfills import request_backfill

    instance = _instance(os.environ.get("DAGSTER_HOME"))
    # As the grid writes them, with a hint for one misspelt, as the demo takes them (request_backfill drops repeats).
    grid, _storage = grid_from_environment()
    asked = [grid.require_style(style) for style in args.style] if args.style else None
    backfill_id, styles = request_backfill(instance, args.workspace, asked)
    print(
        f"backfill {backfill_id} of {count(len(styles), 'style')} ({', '.join(styles)}) filed in DAGSTER_HOME; the "
        "daemon launches one run a style and launches a run that dies again (dagster-daemon run, or make dev, "
        "must be running)",
        file=sys.stderr,
    )
    print(backfill_id)
    return 0


def _demo(args: argparse.Namespace) -> int:
    import os

    from sd_assets.definitions import GENERATE_JOB, build_definitions
    from sd_assets.domain.gallery import INDEX_KEY
    from sd_assets.environment import grid_from_environment, open_store_from_environment
    from sd_assets.orchestration.loggers import BRIEF_CONSOLE

    grid, storage = grid_from_environment()
    job = build_definitions().resolve_job_def(GENERATE_JOB)
    # As the grid writes them (an accent typed as a separate mark too); one given twice is made once.
    styles = list(dict.fromkeys(grid.require_style(style) for style in args.style)) if args.style else grid.styles
    instance = _instance(os.environ.get("DAGSTER_HOME"))
    not_made = False  # a run's check failed: images it could not make (each said as its run ends)
    for number, style in enumerate(styles):
        print(f"materializing {style} ...", flush=True)
        _wait_for_a_gpu_pool_slot(instance)
        result = job.execute_in_process(
            partition_key=style, instance=instance, raise_on_error=False,
            # The steps' own messages, a line each; Dagster's DEBUG events (step starts, outputs) and
            # a failed step's stack trace stay in the run's log (the summary below says the error).
            run_config={"loggers": {BRIEF_CONSOLE: {"config": {"log_level": "INFO"}}}},
        )  # fmt: skip
        if not result.success:
            rest = styles[number + 1 :]
            # The styles asked for, not every style of the grid (which the plain command makes).
            again = "".join(f" --style {shlex.quote(s)}" for s in styles) if args.style else ""
            if _interrupted(result):
                # Ctrl-C: nothing to mend, and DagsterExecutionInterruptedError, its name, tells a user nothing.
                not_run = f"; not run: {', '.join(rest)}" if rest else ""
                print(
                    f"sd-assets: interrupted while making {style}{not_run}; the images made are kept, and "
                    f"`sd-assets demo{again}` makes only what is missing", file=sys.stderr,
                )  # fmt: skip
                return 130
            where = "is in the Dagster UI" if instance.is_persistent else "was not kept: DAGSTER_HOME is not set"
            print(f"sd-assets: run {result.run_id} for {style} failed (its whole log {where}):", file=sys.stderr)
            step_failures = result.get_step_failure_events()
            for event in step_failures:
                error = event.step_failure_data.error
                # The step's own exception, under Dagster's "error occurred while executing" wrapper.
                print(f"  {event.step_key}: {_error_text((error.cause or error) if error else None)}", file=sys.stderr)
            if not step_failures:
                # The run failed outside its steps, in Dagster's engine: its error is the run's.
                print(f"  {_error_text(_run_error(result))}", file=sys.stderr)
                held = _pool_slot_holders(instance, result.run_id)
                if held:
                    print(
                        f"  still holding a pool slot in this instance: {', '.join(held)}; a run killed while "
                        "dagster.yaml set pool limits keeps its slot, and once they are removed Dagster fails every "
                        "run on it: for one no longer running, `dagster run delete -f <run id>` frees the slot (the "
                        "run's record goes)",
                        file=sys.stderr,
                    )
            if rest:
                print(
                    f"sd-assets: not run: {', '.join(rest)}; once the error is mended, `sd-assets demo{again}` "
                    "again makes only what is missing", file=sys.stderr,
                )  # fmt: skip
            return 1
        for check in result.get_asset_check_evaluations():
            if not check.passed:
                print(f"sd-assets: {check.description}", file=sys.stderr)
                not_made = True
    print("gallery index:")
    print(open_store_from_environment(storage).location(INDEX_KEY))
    return 1 if not_made else 0


def _error_text(error) -> str:
    """A failed run's or step's error (Dagster's ``SerializableErrorInfo``) as the demo shows it: the
    project's own errors without their module path (their text says it all), any other with where
    it came from, for a bug report."""
    if error is None:
        return "failed"
    message = error.message.strip()
    if message.startswith("sd_assets."):
        return message.split(": ", 1)[-1]
    return message + "\n" + "".join(error.stack).rstrip()


def _run_error(result):
    """The error a run failed with outside its steps; None when it names none."""
    import dagster as dg

    return next(
        (e.job_failure_data.error for e in result.all_events if e.event_type == dg.DagsterEventType.RUN_FAILURE),
        None,
    )


def _wait_for_a_gpu_pool_slot(instance, poll_seconds: float = 2.0) -> None:
    """Wait, here, until the instance's ``gpu`` pool (style_images') has a slot free; at once where
    it sets no limit. Dagster's own wait for one, inside the run, takes no Ctrl-C nor SIGTERM (its
    loop looks for them only between steps), and a slot a killed run kept is never freed: this one
    says which runs hold the slots, and stops at Ctrl-C."""
    import time

    from sd_assets.orchestration.assets import GPU_POOL

    said = False
    while True:
        try:
            info = instance.event_log_storage.get_concurrency_info(GPU_POOL)
        except Exception:  # a storage that cannot say: the run waits as Dagster has it wait
            return
        # A limit recorded from the instance's default (pools: default_limit) holds only while that
        # default is set: once it is gone, Dagster does not wait for the pool (it fails the run, and
        # the demo then names the runs holding a slot).
        limit = instance.global_op_concurrency_default_limit if info.using_default_limit else info.limit
        if limit is None or len(info.claimed_slots) < limit:
            return
        if not said:
            holders = ", ".join(sorted(info.active_run_ids)) or "none"
            print(
                f"sd-assets: waiting for a slot of the {GPU_POOL} pool (its limit: {limit}), held by the runs "
                f"{holders}; a run killed while it held one keeps it until it is ended (the UI: Terminate, then "
                "force; or `dagster run delete -f <run id>`). Ctrl-C stops waiting",
                file=sys.stderr, flush=True,
            )  # fmt: skip
            said = True
        time.sleep(poll_seconds)


def _pool_slot_holders(instance, run_id: str) -> list[str]:
    """The runs other than ``run_id`` that hold or wait for a pool slot in ``instance``; none when
    its storage cannot say (the error already shown is the one to act on)."""
    try:
        return sorted(instance.event_log_storage.get_concurrency_run_ids() - {run_id})
    except Exception:  # the storage's own failure, which may be the one the run met
        return []


def _interrupted(result) -> bool:
    """Whether a run failed because it was interrupted (Ctrl-C, SIGINT), not for an error of its own."""
    import dagster as dg

    interrupts = {dg.DagsterExecutionInterruptedError.__name__, KeyboardInterrupt.__name__}
    error = _run_error(result)
    return error is not None and error.cls_name in interrupts


def _write_found_page(found, store, args: argparse.Namespace) -> int:
    """Write the found images' page (``--html``), print its path and say how many it shows; 2
    where some PNG could not be read."""
    from sd_assets.domain.found_images import show_images
    from sd_assets.domain.gallery import count

    query = ["sd-assets", "search"]
    for option in ("subject", "style", "prompt", "model", "run", "key"):
        if getattr(args, option):
            query += [f"--{option}", getattr(args, option)]
    for column, value in args.where or ():
        query += ["--where", f"{column}={value}"]
    more = "narrow the search to see the others"
    shown = show_images(found, store, limit=HTML_LIMIT, query=shlex.join(query), more=more)
    written = shown.save(args.html)
    print(written)
    if not shown.total:
        print("no images match", file=sys.stderr)
    elif shown.shown < shown.total:
        print(f"the first {shown.shown} of {shown.total} found images are on the page; {more}", file=sys.stderr)
    else:
        print(f"{count(shown.shown, 'image')} on the page", file=sys.stderr)
    if shown.unreadable:
        print(
            f"sd-assets: {count(shown.unreadable, 'image')} could not be read from the store; the page says why in "
            "each one's place", file=sys.stderr,
        )  # fmt: skip
        return 2
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="sd-assets", description="Run the demo grid, search the image catalog across runs, rebuild the catalog."
    )
    commands = parser.add_subparsers(dest="command", required=True)

    search = commands.add_parser(
        "search",
        help="find images in the catalog across runs",
        description="Find images in the catalog of the store (SD_ASSETS_STORAGE, else the grid's). Each filter "
        "matches a part of its field, in any case and with or without accents, and --where a whole value; given "
        "filters must all match. "
        "The table adds a column for each setting in which the found images differ; --json prints every field; "
        "--html writes the images themselves to a page.",
    )
    search.add_argument("--subject", help="part of the subject")
    search.add_argument("--style", help="part of the style's name or of its slug (van-gogh)")
    search.add_argument("--prompt", help="part of the prompt")
    search.add_argument("--model", help="part of the model id")
    search.add_argument("--run", help="part of the run id (the table shows its first 8 characters)")
    search.add_argument("--key", help="part of the content key, or the image's file name or path")
    search.add_argument(
        "--where", action="append", type=_setting, metavar="COLUMN=VALUE",
        help="a whole value of a catalog column (steps=50, scheduler=PNDMScheduler, safety_flagged=true; "
        "--json shows the columns); repeatable",
    )  # fmt: skip
    output = search.add_mutually_exclusive_group()
    output.add_argument("--json", action="store_true", help="print one JSON array of catalog rows")
    output.add_argument(
        "--html", metavar="FILE", type=_page_path,
        help=f"write the found images (up to {HTML_LIMIT}), thumbnails and captions, to one page that opens "
        "anywhere; prints its path",
    )  # fmt: skip
    search.set_defaults(handler=_search)

    rebuild = commands.add_parser(
        "rebuild-catalog",
        help="give every image in the store a catalog row from its PNG's provenance, whichever grid made it; "
        "an unreadable catalog is set aside and replaced (run it while no run is writing)",
    )
    rebuild.set_defaults(handler=_rebuild_catalog)

    backfill = commands.add_parser(
        "backfill",
        help="file a backfill of generate_images for the daemon, one run a style (every style, or each --style): "
        "unlike dagster job backfill, a run of it that dies is launched again; prints the backfill's id",
    )
    backfill.add_argument("--style", action="append", help="only this style (repeatable)")
    backfill.add_argument("-w", "--workspace", default="workspace.yaml", help="the workspace file (workspace.yaml)")
    backfill.set_defaults(handler=_backfill)

    demo = commands.add_parser("demo", help="materialize the grid's styles and print the gallery index path")
    demo.add_argument("--style", action="append", help="only this style (repeatable)")
    demo.set_defaults(handler=_demo)

    args = parser.parse_args(argv)
    try:
        return args.handler(args)
    except SdAssetsError as exc:
        print(f"sd-assets: {exc}", file=sys.stderr)
        return 2
    except BrokenPipeError:
        # The reader (head, less) stopped early: not an error of ours.
        sys.stderr.close()
        return 0
    except KeyboardInterrupt:  # Ctrl-C outside a run (one inside a run ends it, and the demo says so)
        print(
            "sd-assets: interrupted; every file it wrote is whole, and the command run again goes on", file=sys.stderr
        )
        return 130


if __name__ == "__main__":
    sys.exit(main())
