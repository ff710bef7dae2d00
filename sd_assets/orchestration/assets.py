"""The asset graph: grid inputs -> model weights -> prompt grid -> images -> catalog -> galleries.

Each asset takes resources, calls domain functions and reports what it did as metadata.
"""


import base64
import functools
import io
import json
import re
import shlex
import time
import warnings
from collections import Counter
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import dagster as dg
# Internal to Dagster (no public name): the tag an observation carries its data version in.
from dagster._core.definitions.data_version import DATA_VERSION_TAG

from sd_assets.domain import catalog as catalog_lib
from sd_assets.domain import engine, gallery
from sd_assets.domain import profile as gpu_profile
from sd_assets.domain.errors import GridError, ModelError, SdAssetsError, StoreUnavailable
from sd_assets.domain.generation import StyleRunReport, make_style_images
from sd_assets.domain.grid import GridConfig, slugify, unique_subjects
from sd_assets.domain.models import ModelRef, ensure_model, local_model_folder, read_model_ref
from sd_assets.domain.pngmeta import image_key_path
from sd_assets.domain.prompts import (
    GenerationSettings,
    PromptRow,
    build_prompt_rows,
    check_rows_match_settings,
    grid_inputs_version,
    keys_version,
    read_prompt_rows,
    read_refused,
    rows_of_other_settings,
    write_prompt_rows,
    write_refused,
)
from sd_assets.domain.store import ArtifactStore
from sd_assets.domain.subject_lists import read_subject_lists, subject_source
from sd_assets.orchestration.resources import ArtifactStoreResource, GeneratorResource, GridResource, HubResource

GROUP = "stable_diffusion"
OWNERS = ["team:sd-assets"]
COMMON = {"group_name": GROUP, "owners": OWNERS}
# The job that makes a style (the definitions build it); named here for the messages that send users to it.
GENERATE_JOB = "generate_images"
# The pool of the steps that hold a GPU (style_images), which an instance may limit.
GPU_POOL = "gpu"
# style_images' check: a prompt longer than the text encoder reads is not made, and the check fails naming it.
PROMPTS_FIT = "prompts_fit_text_encoder"
# Draws of the gallery index before it is left to the next run: each redraw means another run merged meanwhile.
INDEX_ATTEMPTS = 3
# A store that stops answering mid-step (S3 restarted, its network lost) gets the step run again
# after each of these waits: the next try makes, writes and merges only what is still missing.
OUTAGE_RETRY_SECONDS = (30, 60, 120)


# What a step's next try does after an outage, as its warning tells it.
MAKES_WHAT_IS_MISSING = "what was written is kept, and the next try makes only what is still missing"


def _retried_through_store_outages(compute=None, *, next_try: str = MAKES_WHAT_IS_MISSING):
    """Run an asset's step again, within its run, when its store stops answering (``StoreUnavailable``).

    A store that never answered this process is not waited for on the first try unless an earlier
    run of the instance materialized ``model_weights`` in it: else the setting is likely wrong. On
    a try after an outage it is the outage going on. ``next_try`` tells what the next try does.
    """
    if compute is None:
        return functools.partial(_retried_through_store_outages, next_try=next_try)

    @functools.wraps(compute)
    def retried(context: dg.AssetExecutionContext, *args, **kwargs):
        try:
            return compute(context, *args, **kwargs)
        except StoreUnavailable as exc:
            tries = context.retry_number
            if tries >= len(OUTAGE_RETRY_SECONDS):
                raise
            served = False  # a first try on a store this process never saw answer: does the instance know it?
            if tries == 0 and not exc.answered:
                served = _served_earlier_runs(context.instance, exc.store, exc.endpoint)
                if not served:
                    raise
            wait = OUTAGE_RETRY_SECONDS[tries]
            # Dagster frees a step's pool slot while it waits to be tried again: another run's step may take it,
            # and the try then waits for a slot, with no word in the log (seen with the daemon on Postgres).
            pool = context.op_def.pool
            then = f", or later if every slot of the pool {pool} is taken by then (it gives its slot up meanwhile)"
            before = " (it served this instance's runs before)" if served else ""
            context.log.warning(
                f"{exc.problem}{before}; trying again in {wait} s (retry {tries + 1} of {len(OUTAGE_RETRY_SECONDS)})"
                f"{then if pool else ''}: {next_try}"
            )
            raise dg.RetryRequested(max_retries=len(OUTAGE_RETRY_SECONDS), seconds_to_wait=wait) from exc

    return retried


def _served_earlier_runs(instance: dg.DagsterInstance, store_url: str, endpoint: str) -> bool:
    """Whether the latest ``model_weights`` of the instance was materialized in the store at
    ``store_url`` through ``endpoint``. The daemon starts each run in a process of its own, which
    has not seen the store answer: one started during an outage would otherwise take it for a
    wrong setting. The same URL on another endpoint is the setting that changed (a materialization
    from before the endpoint was recorded is taken at its location's word)."""
    if not store_url:
        return False
    try:
        event = instance.get_latest_materialization_event(dg.AssetKey("model_weights"))
    except Exception:  # the instance's storage out of reach too: the store's error is the one to report
        return False
    materialization = event.asset_materialization if event else None
    metadata = materialization.metadata if materialization else {}
    location, recorded = metadata.get("location"), metadata.get("s3_endpoint")
    if recorded is not None and str(recorded.value) != endpoint:
        return False
    return location is not None and str(location.value).startswith(f"{store_url}/")


def _stop_if_grid_inputs_failed(context: dg.AssetExecutionContext) -> None:
    """Fail before fetching a model (gigabytes from the hub) for a run whose subject lists failed
    already: it would make nothing with it, and its user would wait for the download to learn of a
    typo in the grid. generate_images runs its steps one at a time, grid_inputs first; where the two
    run at once, or grid_inputs waits to be tried again after a store outage, nothing has failed
    yet and model_weights goes on."""
    try:
        failures = context.instance.all_logs(context.run.run_id, of_type=dg.DagsterEventType.STEP_FAILURE)
    except Exception:  # the instance's storage out of reach: the step goes on, to fail on its own if need be
        return
    if any(entry.step_key == "grid_inputs" for entry in failures):
        raise SdAssetsError(
            "not run: grid_inputs failed in this run, and without the subject lists the run makes no image; "
            "fix what its error names and run again (the model is fetched then)"
        )


# The partitioned steps, in the order generate_images runs them.
_STYLE_STEPS = ("prompt_grid", "style_images", "image_catalog", "style_gallery")


def _style(context: dg.AssetExecutionContext, config: GridConfig) -> str:
    """The style a run makes: its partition key, one of the grid's styles."""
    partition = context.partition_key if context.has_partition_key else None
    return _checked_style(context, config, partition, context.asset_key.to_user_string())


def _check_the_runs_style_before_the_model(context: dg.AssetExecutionContext, config: GridConfig) -> None:
    """Refuse, from model_weights, a run whose style its partitioned steps would refuse (none, one
    mistyped, one the grid no longer has), before the model is fetched: gigabytes from the hub, for
    a run that makes nothing, and a user who would wait for them to learn of a typo."""
    step = next((step for step in _STYLE_STEPS if _runs_step(context, step)), None)
    tags = context.run.tags
    if step is None or "dagster/asset_partition_range_start" in tags:  # a range: its steps say what they make of it
        return
    _checked_style(context, config, tags.get("dagster/partition"), step)


def _checked_style(context: dg.AssetExecutionContext, config: GridConfig, style: str | None, step: str) -> str:
    """``style``, the partition of the run's step ``step``, when it is one of the grid's styles.

    Raises:
        GridError: no style, or one not in the grid, saying what to give instead.
    """
    if style is None:
        raise GridError(
            f"a run of {step} makes one style: give it a partition "
            f"(dagster job execute ... --tags {_partition_tags(config.styles[0])}, or pick a style in the UI); "
            f"the grid {config.source} has {config.styles}"
        )
    if style in config.styles:
        return style
    meant = config.likely_style(style)
    hint = f" (did you mean {meant!r}?)" if meant else ""
    if context.run.remote_job_origin is None:
        # Made in this process (dagster job execute, sd-assets demo), whose code read the grid just now:
        # the style was mistyped. `--tags` is not checked against the partitions, as the UI's launches are.
        raise GridError(
            f"this run's style {style!r} is not in the grid {config.source}{hint}; its styles are {config.styles}: "
            f"give one of them as it is written there (--tags {_partition_tags(meant or config.styles[0])})"
        )
    # Launched by the UI, a backfill, the sensor or `dagster job launch`, from a code location loaded earlier.
    raise GridError(
        f"this run's style {style!r} is not in the grid {config.source}{hint}, whose styles are {config.styles}: "
        "the grid's styles were edited after the code location loaded or after this run was queued (or, given "
        "with dagster job launch --tags, the style is misspelled); reload the code location (UI: Deployment > "
        f"Reload) and backfill the styles that are new (UI: Jobs > {GENERATE_JOB} > Partitions > Materialize, "
        "Missing, Launch backfill)"
    )


def _partition_tags(style: str) -> str:
    """The ``--tags`` argument of a run of ``style``, quoted for a shell."""
    return shlex.quote(json.dumps({"dagster/partition": style}, ensure_ascii=False))


def _settings_now(config: GridConfig, artifact_store):
    """The model in the store and the generation settings the grid gives with it now."""
    ref = read_model_ref(artifact_store, config.model)
    return ref, GenerationSettings.from_grid(config, ref.revision, config.inference.scheduler or ref.scheduler)


def _grid_rows(config: GridConfig, artifact_store, styles: list[str]):
    """The rows of ``styles`` as the grid and its subject lists stand now, the lists' read and the settings."""
    read = read_subject_lists(subject_source(config, artifact_store), config.max_subjects_per_list)
    subjects = unique_subjects(read.lists)
    _ref, settings = _settings_now(config, artifact_store)
    return {style: build_prompt_rows(config, style, subjects, settings) for style in styles}, read, settings


def _grid_inputs_now(config: GridConfig, artifact_store: ArtifactStore, read=None) -> tuple[dg.DataVersion, dict]:
    """grid_inputs' data version as the grid file and its subject lists stand now (or as ``read``,
    a ``read_subject_lists`` just made, found them), and what it was taken from."""
    source = subject_source(config, artifact_store)
    read = read if read is not None else read_subject_lists(source, config.max_subjects_per_list)
    subjects = unique_subjects(read.lists)
    # What the version was taken from: "Observe sources" otherwise shows a hash and nothing
    # that says which file and lists it read.
    return dg.DataVersion(grid_inputs_version(config, subjects)), {
        "grid_file": dg.MetadataValue.path(str(config.source)),
        "styles": ", ".join(config.styles),
        "subjects_location": source.location,
        "subject_lists": ", ".join(sl.name for sl in read.lists),
        "subjects": len(subjects),
        "skipped_subject_lists": "\n".join(read.problems) or "-",
    }


def _runs_step(context: dg.AssetExecutionContext, step_key: str) -> bool:
    """Whether this run executes the step ``step_key`` (an asset's step is named by its key)."""
    steps = context.run.step_keys_to_execute
    return context.job_def.has_node_named(step_key) and (steps is None or step_key in steps)


def _observe_grid_inputs_unless_the_run_does(
    context: dg.AssetExecutionContext, config: GridConfig, artifact_store: ArtifactStore
) -> None:
    """Observe grid_inputs from model_weights in a run that has no grid_inputs step of its own.

    The UI's Materialize dialogs launch generate_images with the job's assets and not its source
    (a re-execution from failure that runs both skips the observation that succeeded). prompt_grid records the
    version of grid_inputs that was latest when its step started: without this observation that
    would be whatever the files were at the last one, and the next "Observe sources" would mark a
    grid built from the files as they are now stale (or the grid of a changed file fresh).
    model_weights comes before prompt_grid in every run that holds both, and reads the lists before
    it fetches the model (a mistyped folder fails first); a run of model_weights alone (the model
    fetched ahead) reads no subject list. prompt_grid observes in a run without either step."""
    if _runs_step(context, "grid_inputs") or not _runs_step(context, "prompt_grid"):
        return
    _observe_grid_inputs(context, config, artifact_store, "model_weights (this run has no grid_inputs step)")


def _observe_grid_inputs_from_prompt_grid(
    context: dg.AssetExecutionContext, config: GridConfig, artifact_store: ArtifactStore, read
) -> None:
    """Observe grid_inputs from prompt_grid in a run with neither a grid_inputs nor a model_weights
    step (prompt_grid materialized alone in the UI; the runs an asset backfill splits the style
    partitions into), so that the grid records the version of the files it was built from: those of
    ``read``, the lists' reading its rows came from."""
    if _runs_step(context, "grid_inputs") or _runs_step(context, "model_weights"):
        return
    _observe_grid_inputs(context, config, artifact_store, "prompt_grid (this run has no grid_inputs step)", read)
    # Dagster read grid_inputs' version as this step started, to record it with the grid; it reads
    # it again, now with the observation above (logged before the grid's output is handled), once
    # its cached copy is gone. Dagster-internal: a test sees it work with the pinned version.
    context._step_execution_context.wipe_input_asset_version_info(dg.AssetKey("grid_inputs"))


def _observe_grid_inputs(
    context: dg.AssetExecutionContext, config: GridConfig, artifact_store: ArtifactStore, observed_by: str, read=None
) -> None:
    version, metadata = _grid_inputs_now(config, artifact_store, read)
    context.log_event(
        dg.AssetObservation(
            "grid_inputs", tags={DATA_VERSION_TAG: version.value}, metadata={**metadata, "observed_by": observed_by}
        )
    )


def _grid_inputs_asset():
    """The observable source asset of the grid file and its subject lists."""
    # An AssetSpec, unlike observable_source_asset, carries owners and kinds, so that the source shows
    # them beside the assets; multi_observable_source_asset is marked beta, and the project relies on it knowingly.
    spec = dg.AssetSpec(
        "grid_inputs",
        group_name=GROUP,
        owners=OWNERS,
        kinds={"yaml"},
        description="The grid file and its subject lists; what changes a style's rows (settings its images' keys "
        "hash, the subjects or their order) marks the prompt grids stale; a comment, a style added or a batch size "
        "does not.",
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", dg.BetaWarning)

        @dg.multi_observable_source_asset(specs=[spec], name="grid_inputs")
        @_retried_through_store_outages(next_try="it writes nothing: the next try reads the subject lists again")
        def grid_inputs(
            context: dg.AssetExecutionContext, grid: GridResource, store: ArtifactStoreResource
        ) -> dg.ObserveResult:
            version, metadata = _grid_inputs_now(grid.load(), store.open())
            return dg.ObserveResult(data_version=version, metadata=metadata)

    return grid_inputs


def _prompts_fit_spec(styles: dg.StaticPartitionsDefinition) -> dg.AssetCheckSpec:
    """style_images' check, one result per style."""
    # A partitioned check is marked preview; the project pins Dagster's version and relies on it knowingly.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", dg.PreviewWarning)
        return dg.AssetCheckSpec(
            PROMPTS_FIT,
            asset="style_images",
            partitions_def=styles,
            description="No image the style lacked was refused for a prompt longer than the text encoder reads "
            "(77 tokens for CLIP); a refused one is named here, and made once shortened.",
        )


def build_assets(styles: dg.StaticPartitionsDefinition) -> list:
    """The assets, partitioned by the grid's styles."""

    grid_inputs = _grid_inputs_asset()

    @dg.asset(
        **COMMON,
        code_version="1",
        kinds={"pytorch", "diffusers"},
        description="The Stable Diffusion pipeline the workers load, cached and verified in the store.",
    )
    @_retried_through_store_outages(next_try="the next try keeps the store's copy of the model if it is whole, "
                                    "else uploads the model again")
    def model_weights(
        context: dg.AssetExecutionContext,
        grid: GridResource,
        store: ArtifactStoreResource,
        hub: HubResource,
        generator: GeneratorResource,
    ) -> dg.MaterializeResult:
        _stop_if_grid_inputs_failed(context)
        config = grid.load()
        _check_the_runs_style_before_the_model(context, config)
        artifact_store = store.open()
        _observe_grid_inputs_unless_the_run_does(context, config, artifact_store)
        # The runs of a backfill start together: one fills the cache, the others wait and find it filled.
        model = config.model
        where = artifact_store.location()
        with generator.exclusive("model", where, model.id, model.revision, on_wait=context.log.info):
            report = ensure_model(artifact_store, config.model, hub.settings(), config.inference.safety_checker)
        ref = report.ref
        return dg.MaterializeResult(
            metadata={
                "model_id": ref.model_id,
                "revision": ref.revision,
                "scheduler": ref.scheduler,
                "variant": ref.variant or "-",
                "cache": report.action,
                "bytes_downloaded": report.bytes_downloaded,
                "bytes_uploaded": report.bytes_uploaded,
                "bytes_hashed": report.bytes_hashed,
                "files": ref.file_count,
                "model_bytes": ref.total_bytes,
                "seconds": round(report.seconds, 3),
                "rebuilt_because": "; ".join(report.problems) or "-",
                "location": dg.MetadataValue.path(artifact_store.location(ref.prefix)),
                # A run whose process finds the store down waits for it on this endpoint only (_served_earlier_runs).
                **({"s3_endpoint": artifact_store.endpoint()} if artifact_store.endpoint() else {}),
            },
            data_version=dg.DataVersion(ref.revision),
        )

    @dg.asset(
        partitions_def=styles,
        deps=[grid_inputs, model_weights],
        **COMMON,
        code_version="1",
        kinds={"python"},
        description="One row per (subject, image) of a style: prompt, per-image seed and content key.",
    )
    @_retried_through_store_outages
    def prompt_grid(
        context: dg.AssetExecutionContext, grid: GridResource, store: ArtifactStoreResource
    ) -> dg.MaterializeResult:
        config = grid.load()
        style = _style(context, config)
        artifact_store = store.open()
        rows_by_style, read, settings = _grid_rows(config, artifact_store, [style])
        _observe_grid_inputs_from_prompt_grid(context, config, artifact_store, read)
        for problem in read.problems:
            context.log.warning(problem)
        lists = read.lists
        rows = rows_by_style[style]
        write_prompt_rows(artifact_store, style, rows)
        return dg.MaterializeResult(
            metadata={
                "rows": len(rows),
                "subjects": len(unique_subjects(lists)),
                "subject_lists": ", ".join(sl.name for sl in lists),
                "skipped_subject_lists": "\n".join(read.problems) or "-",
                "model_revision": settings.model_revision,
                "preview": dg.MetadataValue.md(_rows_markdown(rows[:10])),
            },
            data_version=dg.DataVersion(keys_version([r.key for r in rows])),
        )

    @dg.asset(
        partitions_def=styles,
        deps=[prompt_grid, model_weights],
        **COMMON,
        code_version="1",
        kinds={"pytorch", "diffusers", "png"},
        pool=GPU_POOL,
        description="The PNGs of a style, named by content key; images that exist are never made again.",
        check_specs=[_prompts_fit_spec(styles)],
    )
    @_retried_through_store_outages
    def style_images(
        context: dg.AssetExecutionContext,
        grid: GridResource,
        store: ArtifactStoreResource,
        generator: GeneratorResource,
    ) -> dg.MaterializeResult:
        config = grid.load()
        style = _style(context, config)
        artifact_store = store.open()
        rows = read_prompt_rows(artifact_store, style)
        # A second run of this style on this node (a sensor run beside a backfill run, two
        # `dagster job execute`) waits here, then skips what the first one made.
        with _style_lock(context, generator, artifact_store, style):
            metadata, refusal = _make_missing_images(context, config, style, rows, artifact_store, generator)
        fits = dg.AssetCheckResult(
            check_name=PROMPTS_FIT,
            passed=refusal is None,
            description=refusal or "no image of the style was refused for a prompt longer than the text encoder reads",
            metadata={"refused_images": metadata["refused_images"]},
        )
        return dg.MaterializeResult(
            metadata=metadata, data_version=dg.DataVersion(keys_version([r.key for r in rows])), check_results=[fits]
        )

    @dg.asset(
        partitions_def=styles,
        deps=[style_images],
        **COMMON,
        code_version="1",
        kinds={"parquet"},
        description="Parquet catalog of every image of a style ever made, with full provenance.",
    )
    @_retried_through_store_outages
    def image_catalog(
        context: dg.AssetExecutionContext,
        grid: GridResource,
        store: ArtifactStoreResource,
        generator: GeneratorResource,
    ) -> dg.MaterializeResult:
        style = _style(context, grid.load())
        artifact_store = store.open()
        rows = read_prompt_rows(artifact_store, style)
        # A merge reads the catalog, writes it whole and deletes the batches it folded in: two at
        # once would each write what they read, and the rows of the batches the other deleted
        # would be lost. The style's lock keeps them apart (and away from a run making its images).
        with _style_lock(context, generator, artifact_store, style):
            merged, report = catalog_lib.merge_catalog(artifact_store, style, rows)
        for problem, aside in report.set_aside:
            context.log.warning(f"{problem}; set aside as {aside}, and the next run of {style} makes it again")
        keys = merged["key"].to_pylist()
        metadata = {
            "rows": report.rows,
            "rows_of_current_grid": len(set(keys) & {r.key for r in rows}),
            "added": report.added_from_records,
            "replaced": report.replaced_from_records,
            "recovered_from_png": report.recovered_from_png,
            "runs": len(set(merged["run_id"].to_pylist())),
            "path": dg.MetadataValue.path(artifact_store.location(catalog_lib.catalog_key(style))),
        }
        if report.set_aside:
            metadata["images_set_aside"] = [aside for _problem, aside in report.set_aside]
        return dg.MaterializeResult(metadata=metadata, data_version=dg.DataVersion(keys_version(keys)))

    @dg.asset(
        partitions_def=styles,
        deps=[image_catalog],
        **COMMON,
        code_version="4",
        kinds={"html"},
        description=f"Gallery pages of a style: the grid's images, {gallery.DEFAULT_PAGE_SIZE} a page, then its "
        "images of earlier grids.",
    )
    @_retried_through_store_outages
    def style_gallery(
        context: dg.AssetExecutionContext,
        grid: GridResource,
        store: ArtifactStoreResource,
        generator: GeneratorResource,
    ) -> dg.MaterializeResult:
        config = grid.load()
        style = _style(context, config)
        artifact_store = store.open()
        rows = read_prompt_rows(artifact_store, style)
        # Under the style's lock, so that pages written from an older catalog never land last.
        with _style_lock(context, generator, artifact_store, style):
            catalog = catalog_lib.read_style_catalog(artifact_store, style).to_pylist()
            profile = gpu_profile.load_profile(artifact_store, style)
            as_of = f"run {context.run.run_id[:8]}, {datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC"
            written = gallery.render_style_pages(
                artifact_store, style, rows, catalog, profile=profile.page_view() if profile else None, as_of=as_of,
                refused=read_refused(artifact_store, style),
            )  # fmt: skip
        present = {row["key"] for row in catalog}
        return dg.MaterializeResult(
            metadata={
                "pages": len(written.pages),
                "images_shown": sum(1 for r in rows if r.key in present),
                "earlier_images": written.earlier_images,
                "pages_written": written.written,
                "first_page": dg.MetadataValue.path(artifact_store.location(written.pages[0])),
            }
        )

    @dg.asset(
        deps=[style_gallery],
        **COMMON,
        code_version="3",
        kinds={"html"},
        description="The gallery's entry point: every style of the grid with its counts, and a contact sheet.",
    )
    @_retried_through_store_outages
    def gallery_index(
        context: dg.AssetExecutionContext, grid: GridResource, store: ArtifactStoreResource
    ) -> dg.MaterializeResult:
        config = grid.load()
        artifact_store = store.open()
        # The grid as it stands, not each style's last run: counts of every style compare, and
        # a style not run since a list arrived shows what it lacks.
        rows_by_style, _read, _settings = _grid_rows(config, artifact_store, config.styles)
        # Runs of other styles merge their catalogs and write this page too, on this node or
        # another: a page drawn from catalogs that changed while it was written is drawn again,
        # so the last one written counts every merge (a merge after the check below is its own
        # run's, whose index is written after it).
        for attempt in range(1, INDEX_ATTEMPTS + 1):
            drawn_from = _index_sources(artifact_store)
            index = _write_index(config, artifact_store, rows_by_style)
            if _index_sources(artifact_store) == drawn_from:
                break
            message = "a catalog changed while the gallery index was written"
            if attempt == INDEX_ATTEMPTS:
                context.log.warning(f"{message} {attempt} times; the next run's index will count it")
            else:
                context.log.info(f"{message}; writing it again")
        summaries, unreadable, key = index.summaries, index.unreadable, index.key
        for entry in unreadable:
            context.log.warning(f"{entry.message}; the index shows its style's count as unknown")
        metadata = {
            "styles": len(summaries),
            # Both counts, as the page's "<images> of <grid_images> images of the grid made": a bare
            # count of the grid's images read as all the store holds, earlier grids' included.
            "images": sum(s.present for s in summaries),
            "grid_images": sum(s.total for s in summaries),
            "index": dg.MetadataValue.path(artifact_store.location(key)),
        }
        if unreadable:
            metadata["unreadable_catalogs"] = [artifact_store.location(entry.key) for entry in unreadable]
        return dg.MaterializeResult(metadata=metadata)

    return [grid_inputs, model_weights, prompt_grid, style_images, image_catalog, style_gallery, gallery_index]


# `dagster job execute` without DAGSTER_HOME keeps its run in a folder of this name, deleted at exit.
_TEMPORARY_DAGSTER_HOME = ".tmp_dagster_home_"


def _index_sources(artifact_store) -> tuple[dict, set[str]]:
    """What the gallery index is drawn from that other runs change: the catalogs (their versions)
    and which styles have pages."""
    catalogs = catalog_lib.catalog_versions(artifact_store)
    return catalogs, artifact_store.existing([gallery.style_page_key(slug, 1) for slug in catalogs])


@dataclass(frozen=True)
class _WrittenIndex:
    """The gallery index as written: the grid's styles' counts, the catalogs it could not read, its key."""

    summaries: list[gallery.StyleSummary]
    unreadable: list[catalog_lib.UnreadableCatalog]
    key: str


def _write_index(
    config: GridConfig, artifact_store: ArtifactStore, rows_by_style: dict[str, list[PromptRow]]
) -> _WrittenIndex:
    """Draw and write the gallery index from the catalogs as they are now."""
    # A damaged catalog leaves its style's count unknown, not every style's index out of date.
    unreadable: list[catalog_lib.UnreadableCatalog] = []
    made_in: dict[str, tuple] = {}
    made = catalog_lib.catalog_styles(artifact_store, unreadable, made_in)
    broken = {entry.slug for entry in unreadable}
    present = {key for keys in made.values() for key in keys}

    def summary(style: str, total: int, present_count: int) -> gallery.StyleSummary:
        has_pages = artifact_store.exists(gallery.style_page_key(style, 1))
        unknown = slugify(style) in broken
        return gallery.StyleSummary(style, total, 0 if unknown else present_count, has_pages, unknown)

    summaries = [
        summary(style, len(rows), sum(1 for r in rows if r.key in present)) for style, rows in rows_by_style.items()
    ]
    in_grid = {slugify(style) for style in config.styles}
    others = [summary(style, len(keys), len(keys)) for style, keys in made.items() if slugify(style) not in in_grid]
    others += [summary(slug, 0, 0) for slug in sorted(broken - in_grid)]
    # Why a style's last run left an image of the grid unmade (a prompt too long): a later run would not make it.
    refused = {key: why for style in rows_by_style for key, why in read_refused(artifact_store, style).items()}
    # The settings of the grid's first made image: those of every image it made (its content key
    # hashes them), but for the dtype and device, the pages of its style say which made each.
    first_made = next(((style, r.key) for style, rows in rows_by_style.items() for r in rows if r.key in present), None)
    made_with = catalog_lib.catalog_row(artifact_store, *first_made) if first_made else None
    # Counted by (dtype, device), worded once each: a grid holds millions of images, of a few such.
    made_ins: Counter = Counter()
    for (dtype, device), n in Counter(made_in[r.key] for rows in rows_by_style.values() for r in rows
                                      if r.key in present).items():  # fmt: skip
        made_ins[gallery.made_in({"dtype": dtype, "device": device})] += n
    key = gallery.render_index(
        artifact_store, summaries, rows_by_style, present, other_styles=others, model_id=config.model.id,
        refused=refused, grid_settings=gallery.grid_settings_text(made_with, made_ins) if made_with else None,
    )
    return _WrittenIndex(summaries, unreadable, key)


def _style_lock(context: dg.AssetExecutionContext, generator: GeneratorResource, artifact_store, style: str):
    """The node lock of ``style`` in this store, held while a run makes its images, merges its
    catalog or writes its pages: the one identity all three must share."""
    return generator.exclusive("style", artifact_store.location(), style, on_wait=context.log.info)


def _run_record_is_lost(instance: dg.DagsterInstance) -> bool:
    """Whether the run's record goes with its process: an in-memory instance, or the CLI's temporary one."""
    return instance.is_ephemeral or Path(instance.root_directory).name.startswith(_TEMPORARY_DAGSTER_HOME)


def _make_missing_images(
    context: dg.AssetExecutionContext,
    config,
    style: str,
    rows: list[PromptRow],
    artifact_store,
    generator: GeneratorResource,
) -> tuple[dict, str | None]:
    """Make the images of ``rows`` that the store lacks; returns the materialization metadata and
    the message naming the images whose prompts were too long to make, if any."""
    present = artifact_store.existing([image_key_path(r.key) for r in rows])
    missing = [r for r in rows if image_key_path(r.key) not in present]
    metadata: dict = {"images": len(rows), "skipped": len(rows) - len(missing), "generated": 0, "refused_images": 0}
    if not missing:
        made = "its one image exists" if len(rows) == 1 else f"all {len(rows)} images exist"
        context.log.info(f"{style}: {made}; nothing to generate, no model loaded")
        _warn_if_grid_changed(context, config, style, rows, artifact_store)
        write_refused(artifact_store, style, {})
        return metadata, None
    if _run_record_is_lost(context.instance):
        context.log.warning(
            f"{style}: this run's Dagster instance is not kept (DAGSTER_HOME is not set): the run id "
            f"{context.run.run_id}, which every image made now records, will be found in no instance later; "
            "set DAGSTER_HOME to keep the run"
        )
    # Held while this run generates; the next run on this node gets another device, and a
    # crashed run's process exit frees it.
    with generator.claim_device() as (device, device_index):
        if device_index is not None:
            context.log.info(f"{style}: claimed device index {device_index} ({device})")
            metadata["device_index"] = device_index
        made, refusal = _generate(context, config, style, missing, artifact_store, generator, device)
    return {**metadata, **made}, refusal


def _warn_if_grid_changed(context: dg.AssetExecutionContext, config, style: str, rows: list[PromptRow],
                          artifact_store) -> None:  # fmt: skip
    """Say so when the images just found are the prompt grid's, and the grid file or the model now
    give other settings: nothing was made with them, though the step succeeded."""
    try:
        _ref, settings = _settings_now(config, artifact_store)
    except ModelError:  # no model in this store: its images were copied here; nothing to compare with
        return
    stale = rows_of_other_settings(rows, settings)
    if stale:
        context.log.warning(
            f"{style}: these images are the prompt grid's, built with other settings than {config.source} and "
            f"model {settings.model_id}@{settings.model_revision[:10]} give now ({len(stale)} of {len(rows)}); "
            "nothing was made with the new settings: materialize prompt_grid, then style_images (the "
            f"{GENERATE_JOB} job runs both)"
        )


def _generate(
    context: dg.AssetExecutionContext,
    config,
    style: str,
    missing: list[PromptRow],
    artifact_store,
    generator: GeneratorResource,
    device: str,
) -> tuple[dict, str | None]:
    """Make the missing images of one style on ``device``; returns the materialization metadata
    and, when some of them have prompts too long to make, the message that names those."""
    ref, settings = _settings_now(config, artifact_store)
    inference = config.inference
    check_rows_match_settings(artifact_store, style, missing, settings, config.source)
    if inference.scheduler:
        engine.scheduler_class(inference.scheduler)  # a misspelt one fails before the model is copied here
    copy = local_model_folder(artifact_store, ref, generator.model_cache_dir, on_wait=context.log.info)
    dtype = engine.pick_dtype(device, inference.dtype)
    loading = time.perf_counter()
    loaded = engine.load_pipeline(
        copy.folder, device, dtype, inference.scheduler, inference.compile, inference.safety_checker,
        variant=ref.variant, tuning=engine.Tuning(compile_vae=inference.compile_vae), deep_cache=settings.deep_cache,
    )
    # Nothing when this process loaded it before (the demo runs every style in one process).
    load_seconds = time.perf_counter() - loading
    metadata = {
        "device": device,
        "dtype": dtype,
        "model_revision": ref.revision,
        "model_bytes_copied": copy.bytes_copied,
        "model_load_seconds": round(load_seconds, 3),
    }
    # Refused, not cut short. The rest of the style is made, catalogued and shown as usual: one
    # long subject must not hold back every style's catalog and pages, run after run.
    overlong = engine.overlong_prompts(loaded, missing)
    refused = [row for row in missing if overlong.refuses(row)]
    missing = [row for row in missing if not overlong.refuses(row)]
    write_refused(artifact_store, style, {row.key: overlong.reason(row) for row in refused})
    if missing:
        made = _render_style(
            context, config, style, missing, artifact_store, generator, loaded=loaded, ref=ref, settings=settings
        )
        metadata.update(made)
    metadata["refused_images"] = len(refused)
    if not refused:
        return metadata, None
    refusal = overlong.message(style, refused, made=metadata.get("generated", 0))
    context.log.warning(refusal)
    return metadata, refusal


def _render_style(
    context: dg.AssetExecutionContext,
    config: GridConfig,
    style: str,
    missing: list[PromptRow],
    artifact_store,
    generator: GeneratorResource,
    *,
    loaded: engine.LoadedPipeline,
    ref: ModelRef,
    settings: GenerationSettings,
) -> dict:
    """Make the images of ``missing`` with the loaded pipeline; returns their metadata."""
    inference = config.inference
    device, dtype = loaded.device, loaded.dtype
    if inference.batch_size == "auto":
        batch_size = engine.auto_batch_size(loaded, settings, generator.batch_memory_file, len(missing))
    else:
        batch_size = inference.batch_size
    context.log.info(
        f"{style}: {gallery.count(len(missing), 'image')} to make on {device} ({dtype}), batch size {batch_size}, "
        f"model {ref.model_id}@{ref.revision[:10]}"
    )

    with gpu_profile.GpuProfiler(device) as profiler:
        report = make_style_images(
            artifact_store, loaded, ref, settings, missing,
            style=style, partition=context.partition_key, run_id=context.run.run_id, batch_size=batch_size,
            writer_threads=generator.writer_threads, max_pending=generator.max_pending_images, log=context.log.info,
            attempt=context.retry_number,
        )  # fmt: skip
    if report.batch_size < batch_size:  # the GPU ran out of memory: the rest went in smaller batches
        remembered = ""
        if inference.batch_size == "auto":
            kept = engine.remember_after_running_out_of_memory(
                loaded, settings, generator.batch_memory_file, report.out_of_memory_rows, report.batch_size
            )
            remembered = (
                ", which batch_size auto now remembers" if kept else "; batch_size auto keeps its answer, larger "
                "than the batch that did not fit (the GPU was short of memory for other work), for the next run"
            )
        context.log.warning(
            f"{style}: out of memory on {device} at a batch of {gallery.count(report.out_of_memory_rows, 'image')}; "
            f"the images from there on were made at batch size {report.batch_size}{remembered}"
        )
    profile = profiler.profile()
    gpu_profile.save_profile(artifact_store, style, profile, context.run.run_id)
    if settings.safety_checker and report.safety_flagged:
        context.log.warning(
            f"{style}: the safety checker flagged {gallery.count(report.safety_flagged, 'image')} and blacked "
            "them out; they are kept, marked safety_flagged in the catalog and the gallery, and not made again"
        )
    return _made_metadata(report, profile, settings, loaded)


def _made_metadata(report: StyleRunReport, profile: gpu_profile.GpuProfile, settings: GenerationSettings,
                   loaded: engine.LoadedPipeline) -> dict:  # fmt: skip
    """The materialization metadata of the images one run made: how many, how fast, on what."""
    metadata = {
        # As the gallery shows them: with the dtype and device, which draw other pixels too.
        "settings": gallery.settings_text({**settings.as_record(), "dtype": loaded.dtype, "device": loaded.device}),
        "generated": report.generated,
        "images_per_minute": round(report.images_per_minute, 1),
        "batch_size": report.batch_size,
        "first_batch_seconds": round(report.first_batch_seconds, 3),
        "writer_peak_pending": report.writer_peak_pending,
        "previews": dg.MetadataValue.md("\n\n".join(_thumbnail_markdown(image, row) for row, image in report.previews)),
        **profile.metadata(),
    }
    if settings.deep_cache:
        metadata["deep_cache"] = settings.deep_cache.describe()
    if settings.safety_checker:
        metadata["safety_flagged"] = report.safety_flagged
    if profile.chart_svg:
        metadata["gpu_util_chart"] = dg.MetadataValue.md(profile.chart_markdown())
    if loaded.compiled:
        metadata["compiled"] = "unet, vae decoder" if loaded.tuning.compile_vae else "unet"
        metadata["compile_seconds"] = round(report.compile_seconds, 3)
        metadata["padded_images"] = report.padded_images
    return metadata


def _markdown_text(text: str) -> str:
    """``text`` as Markdown shows it: a subject is any text, and Markdown's own characters in it
    would make bold, links, HTML or table cells of it."""
    return re.sub(r"([\\`*_\[\]<>!#|~&])", r"\\\1", text)


def _rows_markdown(rows: list[PromptRow]) -> str:
    lines = [f"| {_markdown_text(r.subject)} | {r.image_index} | {r.seed} | `{r.key[:12]}` |" for r in rows]
    return "\n".join(["| subject | image | seed | key |", "|---|---|---|---|", *lines])


def _thumbnail_markdown(image, row: PromptRow) -> str:
    thumbnail = image.copy()
    thumbnail.thumbnail((96, 96))
    buffer = io.BytesIO()
    # JPEG: the instance keeps every run's metadata (twice), and a 96-pixel PNG is 4-5 times larger.
    thumbnail.save(buffer, format="JPEG", quality=85)
    data = base64.b64encode(buffer.getvalue()).decode()
    caption = _markdown_text(f"{row.subject}, image_index {row.image_index}")
    return f"**{caption}**  \n![{caption}](data:image/jpeg;base64,{data})"
