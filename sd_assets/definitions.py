"""The one Definitions entry point, and the one place where the environment picks resources.

The project's own ``SD_ASSETS_*`` variables, and the AWS region and endpoint, are read in
``sd_assets.environment``. Read here: the Hugging Face variables ``HF_TOKEN`` (gated repos),
``HF_HUB_OFFLINE``, ``HF_HUB_CACHE``, ``HF_HOME`` and ``HF_ENDPOINT``, for the ``hub`` resource.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Mapping
from pathlib import Path

import click
import dagster as dg

from sd_assets.domain.errors import SdAssetsError
from sd_assets.environment import (
    generator_settings,
    grid_from_environment,
    path_setting,
    s3_client_settings,
    sensor_interval,
)
from sd_assets.orchestration.assets import GENERATE_JOB, build_assets
from sd_assets.orchestration.loggers import BRIEF_CONSOLE, brief_console_logger
from sd_assets.orchestration.resources import ArtifactStoreResource, GeneratorResource, GridResource, HubResource
from sd_assets.orchestration.sensors import build_new_subject_lists_sensor


def store_from_environment(storage: str, environ: Mapping[str, str]) -> ArtifactStoreResource:
    """The ``store`` resource for ``storage``; an s3:// URL gets its S3 client from dagster-aws."""
    if not storage.startswith("s3://"):
        return ArtifactStoreResource(url=storage)
    from sd_assets.orchestration.s3_resources import S3ArtifactStoreResource, S3ClientResource

    return S3ArtifactStoreResource(
        url=storage,
        s3=S3ClientResource(**s3_client_settings(environ)),
    )


def hub_from_environment(environ: Mapping[str, str]) -> HubResource:
    """The hub resource for the HF_* variables in ``environ``.

    The token stays a ``dg.EnvVar``: Dagster reads it from the process environment when the
    resource starts, and it never shows in the run's config.
    """
    hf_home = path_setting(environ, "HF_HOME")
    cache_dir = path_setting(environ, "HF_HUB_CACHE") or (str(Path(hf_home).expanduser() / "hub") if hf_home else None)
    return HubResource(
        token=dg.EnvVar("HF_TOKEN") if environ.get("HF_TOKEN") else None,
        offline=environ.get("HF_HUB_OFFLINE", "").strip().upper() in ("1", "ON", "YES", "TRUE"),
        cache_dir=cache_dir,
        endpoint=environ.get("HF_ENDPOINT") or None,
    )


class DefinitionsError(SdAssetsError, click.ClickException):
    """Definitions that could not be built, for a reason the user can fix (a bad grid file).

    Also a click error, so that Dagster's command line (``dagster job execute``) prints it as one
    line, ``Error: <message>``, where any other exception gets Dagster's whole traceback.
    """


def load_definitions() -> dg.Definitions:
    """``build_definitions`` for the ``defs`` that Dagster's tools load from ``sd_assets``."""
    try:
        return build_definitions()
    except SdAssetsError as exc:
        raise DefinitionsError(str(exc)) from None


def build_definitions(environ: Mapping[str, str] | None = None) -> dg.Definitions:
    """Definitions for the grid named by ``environ`` (default: this process's environment)."""
    environ = os.environ if environ is None else environ
    grid, storage = grid_from_environment(environ)
    grid_path = grid.source
    styles = dg.StaticPartitionsDefinition(grid.styles)
    assets = build_assets(styles)
    # include_sources is marked beta; the project relies on it knowingly (as on observable sources).
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", dg.BetaWarning)
        every_asset = dg.AssetSelection.all(include_sources=True)
    generate_job = dg.define_asset_job(
        GENERATE_JOB,
        # With the sources: each run observes grid_inputs first, so the versions its assets record
        # are the grid's and lists' own, and a later "Observe sources" with nothing changed finds
        # every style fresh (not stale against a never-observed source).
        selection=every_asset,
        # One process per run: the model loads once and steps pay no process start-up.
        executor_def=dg.in_process_executor,
        description="Make a style's missing images, its gallery pages and catalog rows, and refresh the index.",
    )
    new_subject_lists = build_new_subject_lists_sensor(generate_job, grid.styles, sensor_interval(environ))
    return dg.Definitions(
        assets=assets,
        jobs=[generate_job],
        sensors=[new_subject_lists],
        # Dagster's console logger stays the default of every run that names none; the demo names its own.
        loggers={"console": dg.colored_console_logger, BRIEF_CONSOLE: brief_console_logger},
        resources={
            "grid": GridResource(path=str(grid_path)),
            "store": store_from_environment(storage, environ),
            "generator": GeneratorResource(**generator_settings(environ)),
            "hub": hub_from_environment(environ),
        },
    )
