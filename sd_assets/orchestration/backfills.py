"""A backfill of generate_images over styles, filed with the instance for its daemon to run.

``dagster job backfill`` launches the runs itself and marks the backfill complete once they are
queued; Dagster then retries none of them when one dies (it retries no run of a complete
backfill). A backfill filed as requested, as the UI files one, is the daemon's: it launches a
run per style, keeps the backfill open until every run has ended, and launches a dead run again
(``run_retries``). Dagster has no public call that files one, so this uses the records its UI
and command line build (``PartitionBackfill``), as ``dagster job backfill`` does.
"""

from __future__ import annotations

from collections.abc import Sequence

import dagster as dg
from dagster._cli.workspace.cli_target import WorkspaceOpts, get_workspace_from_cli_opts
from dagster._core.execution.backfill import BulkActionStatus, PartitionBackfill
from dagster._core.utils import make_new_backfill_id
from dagster._time import get_current_timestamp

from sd_assets.domain.errors import SdAssetsError
from sd_assets.orchestration.assets import GENERATE_JOB


def request_backfill(
    instance: dg.DagsterInstance, workspace_file: str, styles: Sequence[str] | None
) -> tuple[str, list[str]]:
    """File a backfill of ``styles`` (None: every style the code location has) for the daemon;
    returns its id and the styles it holds.

    Raises:
        SdAssetsError: the instance is not kept (the daemon would never see the backfill), the
            workspace holds no generate_images, or a style is not one of its partitions.
    """
    if not instance.is_persistent:
        raise SdAssetsError(
            "a backfill is the daemon's to run, and it reads the instance in DAGSTER_HOME: set DAGSTER_HOME to the "
            "folder its dagster.yaml is in"
        )
    opts = WorkspaceOpts(workspace=[workspace_file])
    # The code server it starts says nothing past warnings: its start and stop are not news here.
    with get_workspace_from_cli_opts(
        instance, version=dg.__version__, workspace_opts=opts, log_level="WARNING"
    ) as workspace:
        partition_sets = [
            partition_set
            for location in workspace.get_code_location_entries().values()
            if location.code_location is not None
            for repository in location.code_location.get_repositories().values()
            for partition_set in repository.get_partition_sets()
            if partition_set.job_name == GENERATE_JOB
        ]
        errors = [entry.load_error for entry in workspace.get_code_location_entries().values() if entry.load_error]
        if len(partition_sets) != 1:
            why = f": {errors[0].message.strip().splitlines()[-1]}" if errors else ""
            raise SdAssetsError(
                f"{workspace_file} holds {len(partition_sets)} code locations with the {GENERATE_JOB} job, "
                f"not one{why}"
            )
        [partition_set] = partition_sets
        known = list(partition_set.get_partitions_definition().get_partition_keys())  # type: ignore[union-attr]
    chosen = list(dict.fromkeys(styles)) if styles else known
    unknown = [style for style in chosen if style not in known]
    if unknown:
        raise SdAssetsError(
            f"no style {', '.join(map(repr, unknown))} in the loaded grid, whose styles are {', '.join(known)}"
        )
    backfill = PartitionBackfill(
        backfill_id=make_new_backfill_id(),
        partition_set_origin=partition_set.get_remote_origin(),
        status=BulkActionStatus.REQUESTED,
        partition_names=chosen,
        from_failure=False,
        reexecution_steps=None,
        tags={},
        backfill_timestamp=get_current_timestamp(),
    )
    instance.add_backfill(backfill)
    return backfill.backfill_id, chosen
