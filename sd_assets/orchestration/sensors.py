"""Sensors: new or changed subject lists start a run of every style, once the sensor is started."""

from __future__ import annotations

from pathlib import Path

import dagster as dg

from sd_assets.domain.errors import SdAssetsError
from sd_assets.domain.gallery import count
from sd_assets.domain.prompts import grid_inputs_version
from sd_assets.domain.subject_lists import (
    change_key,
    decode_cursor,
    encode_cursor,
    removal_key,
    scan_subject_lists,
    store_tag,
    subject_source,
)
from sd_assets.orchestration.resources import ArtifactStoreResource, GridResource

NEW_SUBJECT_LISTS = "new_subject_lists"


def build_new_subject_lists_sensor(
    job: dg.UnresolvedAssetJobDefinition, styles: list[str], minimum_interval_seconds: int
) -> dg.SensorDefinition:
    """The sensor asking ``job`` for one run per style whenever a subject list is new or changed."""

    @dg.sensor(
        name=NEW_SUBJECT_LISTS,
        job=job,
        minimum_interval_seconds=minimum_interval_seconds,
        default_status=dg.DefaultSensorStatus.STOPPED,
        description=(
            "Watches the subject lists (the grid's subjects folder, or subjects/ in an S3 store) and runs "
            "every style when a list is new, its content changed or it was removed. Malformed lists are "
            "skipped and named in the tick's log. While the grid's styles differ from those the code "
            "location loaded, it asks for nothing until the code location is reloaded."
        ),
    )
    def new_subject_lists(
        context: dg.SensorEvaluationContext, grid: GridResource, store: ArtifactStoreResource
    ) -> dg.SensorResult:
        config = grid.load()
        if set(config.styles) != set(styles):
            # The job's partitions are the styles loaded with the code: a run of a renamed style would
            # fail, a new one gets none. The cursor stays, so the lists are still new after a reload.
            held = _styles_edited(config.source, styles, config.styles)
            context.log.warning(held)
            return dg.SensorResult(skip_reason=held)
        artifact_store = store.open()
        where = artifact_store.location()
        source = subject_source(config, artifact_store)
        try:
            remembered = decode_cursor(context.cursor)
        except SdAssetsError as exc:
            context.log.warning(str(exc))
            remembered = decode_cursor(None)
        previous = remembered.state
        if remembered.store not in (None, where):
            # Another store has none of the images the lists made so far.
            context.log.info(f"images now go to {where} (were {remembered.store}): every subject list counts as new")
            previous = {}
        scan = scan_subject_lists(source, previous, config.max_subjects_per_list)
        for problem in scan.problems:
            context.log.warning(problem)
        unchanged = (scan.state, where) == (remembered.state, remembered.store)
        cursor = None if unchanged else encode_cursor(scan.state, where)
        if not scan.changed and not scan.removed:
            skipped = f"; {' | '.join(scan.problems)}" if scan.problems else ""  # each says "skipped ..."
            return dg.SensorResult(
                skip_reason=f"no new or changed subject lists among {scan.listed} in {source.location}{skipped}",
                cursor=cursor,
            )
        found = []
        if scan.changed:
            found.append(f"{count(len(scan.changed), 'new or changed subject list')} ({_names(scan.changed)})")
        if scan.removed:
            # Its subjects leave the grid: the runs draw the pages without them (and make nothing).
            found.append(f"{count(len(scan.removed), 'subject list')} removed ({_names(scan.removed)})")
        context.log.info(f"{' and '.join(found)}: one run for each of {count(len(styles), 'style')}")
        key = ",".join(
            ([change_key(scan.changed)] if scan.changed else []) + ([removal_key(scan.removed)] if scan.removed else [])
        )
        # Dagster drops a run key it has seen: the same lists again after the grid's settings
        # changed (a list put back, or back to an earlier store) are new runs, new images.
        settings = grid_inputs_version(config, [])[:8]
        return dg.SensorResult(
            run_requests=[
                dg.RunRequest(partition_key=style, run_key=f"{key}:{style}@{store_tag(where)}~{settings}")
                for style in styles
            ],
            cursor=cursor,
        )

    return new_subject_lists


def _names(lists: list) -> str:
    """The first ten names of subject lists (or of (name, hash) pairs), '...' for the rest."""
    names = [item.name if hasattr(item, "name") else item[0] for item in lists]
    return ", ".join(names[:10]) + (" ..." if len(names) > 10 else "")


def _styles_edited(grid_file: Path | None, loaded: list[str], now: list[str]) -> str:
    """Why the sensor asks for nothing while the grid's styles differ from those loaded with the code."""
    changes = [
        f"{verb} {', '.join(repr(style) for style in names)}"
        for verb, names in (
            ("added", [style for style in now if style not in loaded]),
            ("removed", [style for style in loaded if style not in now]),
        )
        if names
    ]
    return (
        f"the grid {grid_file} has other styles than when the code location loaded ({'; '.join(changes)}): "
        "new or changed subject lists wait until you reload the code location "
        "(UI: Deployment > Reload; `dagster dev` also picks the grid up on a restart)"
    )
