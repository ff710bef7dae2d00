"""The project's environment variables, read here and nowhere else, into plain values.

Dagster's own (``DAGSTER_HOME``) and CUDA's are read where they are used; the Hugging Face ones
in ``sd_assets.definitions``, where they configure the ``hub`` resource. No Dagster here:
``sd-assets search`` and ``rebuild-catalog`` need only the store, and importing Dagster would
more than double their start.

- ``SD_ASSETS_GRID``: the grid file (default: ``grid.yaml`` in the current directory).
- ``SD_ASSETS_STORAGE``: overrides the grid's ``storage`` (a folder or s3://bucket/prefix).
- ``SD_ASSETS_DEVICE``: 'auto' (default), 'cpu', 'cuda' or 'cuda:<i>'.
- ``SD_ASSETS_MODEL_CACHE``: node-local folder for model copies (default ~/.cache/sd-assets/models).
- ``SD_ASSETS_DEVICE_COUNT``: devices runs on this node share, one run each (default: the visible
  CUDA GPUs; none on CPU).
- ``SD_ASSETS_DEVICE_LOCKS``: node-local folder of the device claims and of the locks that keep two
  runs from making one style or filling one model cache at once (default: <tmp>/sd-assets-device-locks).
- ``SD_ASSETS_SENSOR_INTERVAL``: seconds between looks of the ``new_subject_lists`` sensor (default 30).

For an s3:// store, ``AWS_REGION`` (else ``AWS_DEFAULT_REGION``) and ``AWS_ENDPOINT_URL`` make the
S3 client, the runs' and the command line's alike (boto3 alone reads ``AWS_DEFAULT_REGION`` only);
boto3 reads the credentials (``AWS_ACCESS_KEY_ID``, ``AWS_SECRET_ACCESS_KEY``, profiles, roles) itself.

Set but empty counts as unset, for each of them.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

from sd_assets.domain import engine
from sd_assets.domain.errors import GridError, SdAssetsError, unknown_home
from sd_assets.domain.grid import GridConfig, load_grid
from sd_assets.domain.store import ArtifactStore, open_store

DEFAULT_SENSOR_INTERVAL_SECONDS = 30


def _positive_int(environ: Mapping[str, str], name: str) -> int | None:
    """The integer in ``environ[name]`` (None when unset); it must be 1 or more."""
    value = environ.get(name)
    if value is None or value == "":
        return None
    if not value.strip().isdecimal() or int(value) < 1:  # isdigit() also passes '²', which int() refuses
        raise SdAssetsError(f"environment variable {name}={value!r}: expected a whole number of 1 or more")
    return int(value)


def path_setting(environ: Mapping[str, str], name: str) -> str | None:
    """The path in ``environ[name]`` (None when unset), checked for a '~user' this machine does not
    know: pathlib's bare "Could not determine home directory." would come from wherever it is used."""
    return _checked_path(name, environ.get(name) or None)


def _checked_path(name: str, value: str | None) -> str | None:
    problem = unknown_home(value) if value else None
    if problem:
        raise SdAssetsError(f"environment variable {name}={value!r}: {problem}")
    return value


def _storage(environ: Mapping[str, str]) -> str | None:
    """``SD_ASSETS_STORAGE``, a folder's path checked as ``path_setting`` checks it."""
    value = (environ.get("SD_ASSETS_STORAGE") or "").strip() or None  # as the grid's field is read
    return value if value is None or "://" in value else _checked_path("SD_ASSETS_STORAGE", value)


def _device(environ: Mapping[str, str]) -> str:
    """The device in ``SD_ASSETS_DEVICE`` (default 'auto'), checked now rather than when a run's
    ``style_images`` step looks for it, after the steps before it."""
    value = environ.get("SD_ASSETS_DEVICE") or "auto"
    if not engine.is_device_name(value):
        raise SdAssetsError(f"environment variable SD_ASSETS_DEVICE={value!r}: expected {engine.DEVICE_NAMES}")
    return value


def grid_from_environment(environ: Mapping[str, str] | None = None) -> tuple[GridConfig, str]:
    """The grid named by ``SD_ASSETS_GRID`` and the storage URL in force (``SD_ASSETS_STORAGE`` first)."""
    environ = os.environ if environ is None else environ
    grid = load_grid(Path(path_setting(environ, "SD_ASSETS_GRID") or "grid.yaml"))
    return grid, _storage(environ) or grid.storage


def storage_from_environment(environ: Mapping[str, str] | None = None) -> str:
    """The storage URL in force: ``SD_ASSETS_STORAGE`` (no grid file needed), else the grid's."""
    environ = os.environ if environ is None else environ
    storage = _storage(environ)
    if storage:
        return storage
    try:
        return grid_from_environment(environ)[1]
    except GridError as exc:
        raise GridError(f"{exc}; or set SD_ASSETS_STORAGE to the store") from None


def generator_settings(environ: Mapping[str, str]) -> dict:
    """The ``generator`` resource's fields that the environment sets (the others keep their defaults)."""
    settings: dict = {"device": _device(environ), "device_count": _positive_int(environ, "SD_ASSETS_DEVICE_COUNT")}
    if path_setting(environ, "SD_ASSETS_MODEL_CACHE"):
        settings["model_cache_dir"] = environ["SD_ASSETS_MODEL_CACHE"]
    if path_setting(environ, "SD_ASSETS_DEVICE_LOCKS"):
        settings["device_lock_dir"] = environ["SD_ASSETS_DEVICE_LOCKS"]
    return settings


def sensor_interval(environ: Mapping[str, str]) -> int:
    """Seconds between the ``new_subject_lists`` sensor's looks."""
    return _positive_int(environ, "SD_ASSETS_SENSOR_INTERVAL") or DEFAULT_SENSOR_INTERVAL_SECONDS


def s3_client_settings(environ: Mapping[str, str]) -> dict[str, str | None]:
    """The region and endpoint of the S3 client, as boto3's ``client("s3", ...)`` and dagster-aws's
    ``S3Resource`` both take them."""
    return {
        "region_name": environ.get("AWS_REGION") or environ.get("AWS_DEFAULT_REGION") or None,
        "endpoint_url": environ.get("AWS_ENDPOINT_URL") or None,
    }


def open_store_from_environment(storage: str, environ: Mapping[str, str] | None = None) -> ArtifactStore:
    """The store at ``storage``, an s3:// one with the client the runs have (without Dagster)."""
    environ = os.environ if environ is None else environ
    if not storage.startswith("s3://"):
        return open_store(storage)

    def client():
        import boto3

        from sd_assets.domain.s3_store import client_config

        return boto3.session.Session().client("s3", config=client_config(), **s3_client_settings(environ))

    return open_store(storage, client)
