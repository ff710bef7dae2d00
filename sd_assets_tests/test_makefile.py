"""The Makefile as a user runs it: `make demo` and `make dev` keep their instance in .dagster_home/."""

import os
import shutil
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


@pytest.mark.skipif(shutil.which("make") is None, reason="make is not installed")
def test_make_demo_uses_the_repositorys_instance_whatever_dagster_home_the_shell_exports(tmp_path):
    # A copy of the Makefile's world, with a stand-in sd-assets that says which instance it got.
    for name in ("Makefile", "dagster.yaml", "setup.py"):
        shutil.copy(REPO / name, tmp_path / name)
    venv_bin = tmp_path / ".venv" / "bin"
    venv_bin.mkdir(parents=True)
    (venv_bin / "python").write_text("")
    sd_assets = venv_bin / "sd-assets"
    sd_assets.write_text('#!/bin/sh\necho "DAGSTER_HOME=$DAGSTER_HOME"\n')
    sd_assets.chmod(0o755)
    installed = tmp_path / ".venv" / ".installed"
    installed.write_text("")
    later = (tmp_path / "setup.py").stat().st_mtime + 10
    for path in (venv_bin / "python", installed):
        os.utime(path, (later, later))
    # The user's own instance, exported for other projects (an older file, as it usually is).
    theirs = tmp_path / "their_dagster_home"
    theirs.mkdir()
    (theirs / "dagster.yaml").write_text("# their own settings\n")
    os.utime(theirs / "dagster.yaml", (0, 0))

    result = subprocess.run(
        ["make", "demo"], cwd=tmp_path, env={**os.environ, "DAGSTER_HOME": str(theirs)},
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip

    assert result.returncode == 0, result.stdout + result.stderr
    assert f"DAGSTER_HOME={tmp_path / '.dagster_home'}" in result.stdout.splitlines()
    assert (tmp_path / ".dagster_home" / "dagster.yaml").read_text() == (REPO / "dagster.yaml").read_text()
    assert (theirs / "dagster.yaml").read_text() == "# their own settings\n"


@pytest.mark.skipif(shutil.which("make") is None, reason="make is not installed")
def test_make_dev_serves_on_the_port_given_and_on_3000_whatever_port_the_shell_exports():
    def dev_command(*args: str) -> str:
        env = {**os.environ, "PORT": "8080"}  # what a platform may export for its own use
        result = subprocess.run(["make", "-n", "dev", *args], cwd=REPO, env=env, capture_output=True, text=True)
        assert result.returncode == 0, result.stderr
        # Under `make test` the outer make's variables reach this one, which then names its directory too.
        return [line for line in result.stdout.splitlines() if "dagster dev -w" in line][-1]

    assert dev_command().endswith("dagster dev -w workspace.yaml -h 127.0.0.1 -p 3000")
    assert dev_command("PORT=3001").endswith("dagster dev -w workspace.yaml -h 127.0.0.1 -p 3001")
