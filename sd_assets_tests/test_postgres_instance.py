"""The production instance (deploy/dagster-prod.yaml) against this machine's PostgreSQL.

The test creates its own database on 127.0.0.1:5432 (user postgres), runs a style through an
instance built from the production dagster.yaml, reads the records back from Postgres, and
drops the database.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import dagster as dg
import psycopg2

from sd_assets_tests.helpers import LOCAL_POSTGRES, materialize_style

PROD_YAML = Path(__file__).resolve().parents[1] / "deploy" / "dagster-prod.yaml"


def test_a_style_run_is_recorded_in_postgres(grid_path, tmp_path, monkeypatch, postgres_database):
    home = tmp_path / "dagster_home"
    home.mkdir()
    shutil.copy(PROD_YAML, home / "dagster.yaml")
    monkeypatch.setenv("DAGSTER_HOME", str(home))
    for name, value in {
        "DAGSTER_PG_HOST": LOCAL_POSTGRES["host"], "DAGSTER_PG_PORT": str(LOCAL_POSTGRES["port"]),
        "DAGSTER_PG_USER": LOCAL_POSTGRES["user"],
        "DAGSTER_PG_PASSWORD": "", "DAGSTER_PG_DB": postgres_database,
    }.items():  # fmt: skip
        monkeypatch.setenv(name, value)

    instance = dg.DagsterInstance.get()
    try:
        assert type(instance.run_storage).__name__ == "PostgresRunStorage"
        # Like the local instance, one queued run per style at a time.
        queue = instance.get_concurrency_config().run_queue_config
        assert queue.tag_concurrency_limits == [
            {"key": "dagster/partition", "value": {"applyLimitPerUniqueValue": True}, "limit": 1}
        ]
        result = materialize_style(grid_path, "Banksy", instance)
        record = instance.get_latest_materialization_event(dg.AssetKey("style_images"))
        assert record.run_id == result.run_id
        assert record.asset_materialization.partition == "Banksy"
        assert record.asset_materialization.metadata["generated"].value == 4
    finally:
        instance.dispose()

    with psycopg2.connect(dbname=postgres_database, **LOCAL_POSTGRES) as connection, connection.cursor() as cursor:
        cursor.execute("SELECT run_id, status FROM runs")
        assert cursor.fetchall() == [(result.run_id, "SUCCESS")]
        cursor.execute(
            "SELECT asset_key FROM event_logs WHERE dagster_event_type = 'ASSET_MATERIALIZATION' ORDER BY id"
        )
        assert [row[0] for row in cursor.fetchall()] == [
            '["model_weights"]', '["prompt_grid"]', '["style_images"]', '["image_catalog"]',
            '["style_gallery"]', '["gallery_index"]',
        ]  # fmt: skip
    connection.close()


def test_a_postgres_that_does_not_answer_is_named_with_why_in_the_demos_one_line(
    grid_path, tmp_path, monkeypatch, capsys
):
    import socket

    from sd_assets.cli import main

    with socket.socket() as probe:  # a port nothing listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    home = tmp_path / "dagster_home"
    home.mkdir()
    shutil.copy(PROD_YAML, home / "dagster.yaml")
    for name, value in {
        "DAGSTER_HOME": str(home), "SD_ASSETS_GRID": str(grid_path), "DAGSTER_PG_HOST": "127.0.0.1",
        "DAGSTER_PG_PORT": str(port), "DAGSTER_PG_USER": "postgres", "DAGSTER_PG_PASSWORD": "", "DAGSTER_PG_DB": "x",
    }.items():  # fmt: skip
        monkeypatch.setenv(name, value)

    assert main(["demo", "--style", "Banksy"]) == 2
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert last.startswith(
        f"sd-assets: Dagster cannot load the instance in DAGSTER_HOME={home}: too many retries for DB connection: "
        f'(psycopg2.OperationalError) connection to server at "127.0.0.1", port {port} failed: Connection refused'
    )
