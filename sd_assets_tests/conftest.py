"""Shared fixtures: small grids on disk, and a tiny model built once per test session."""

from __future__ import annotations

import shutil
from pathlib import Path

import dagster as dg
import pytest

from sd_assets.domain.grid import load_grid
from sd_assets.domain.models import ensure_model
from sd_assets.domain.store import LocalStore
from sd_assets_tests.helpers import write_grid


@pytest.fixture(scope="session")
def tiny_model_store(tmp_path_factory) -> LocalStore:
    """A store holding the tiny model, built once for the whole session."""
    root = tmp_path_factory.mktemp("tiny-model-store")
    grid = load_grid(write_grid(root))
    store = LocalStore(root / "data")
    ensure_model(store, grid.model)
    return store


@pytest.fixture
def grid_path(tmp_path, tiny_model_store) -> Path:
    """A two-style, two-subject grid whose store already holds the tiny model."""
    path = write_grid(tmp_path)
    shutil.copytree(tiny_model_store.root / "models", tmp_path / "data" / "models")
    return path


@pytest.fixture
def instance():
    with dg.instance_for_test() as test_instance:
        yield test_instance
