"""Shared fixtures: small grids on disk, a tiny model built once per test session, and a fresh
database on the machine's Postgres."""

from __future__ import annotations

import os
import shutil
import uuid
from pathlib import Path

import dagster as dg
import psycopg2
import pytest

from sd_assets.domain.grid import load_grid
from sd_assets.domain.models import ensure_model
from sd_assets.domain.store import LocalStore
from sd_assets_tests.helpers import LOCAL_POSTGRES, write_grid


def pytest_configure(config):
    # Under pytest-xdist, each worker (and every process its tests start) gets its share of the
    # cores: torch's default of one thread a core in every worker makes them all wait on each other.
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    if workers > 1:
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
        threads = str(max(1, cores // workers))
        os.environ["OMP_NUM_THREADS"] = os.environ["MKL_NUM_THREADS"] = threads
        import torch

        torch.set_num_threads(int(threads))


def _admin_connection():
    try:
        connection = psycopg2.connect(dbname="postgres", connect_timeout=3, **LOCAL_POSTGRES)
    except psycopg2.OperationalError as exc:
        pg = LOCAL_POSTGRES
        pytest.skip(f"no PostgreSQL at {pg['host']}:{pg['port']} for user {pg['user']}: {exc}")
    connection.autocommit = True
    return connection


@pytest.fixture
def postgres_database():
    name = f"sd_assets_test_{uuid.uuid4().hex[:10]}"
    admin = _admin_connection()
    with admin.cursor() as cursor:
        cursor.execute(f'CREATE DATABASE "{name}"')
    try:
        yield name
    finally:
        with admin.cursor() as cursor:
            cursor.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        admin.close()


@pytest.fixture(autouse=True)
def s3_endpoints_answered_in_this_test_only(monkeypatch):
    """Whether an S3 endpoint answered before is remembered per process; a port that an earlier
    test's server answered on and this test finds closed would read as an outage, not a wrong setting."""
    from sd_assets.domain import s3_store

    monkeypatch.setattr(s3_store, "_ANSWERED_ENDPOINTS", set())


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
