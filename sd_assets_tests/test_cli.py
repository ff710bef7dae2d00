"""The command line as a user runs it: dagster job execute, definitions validate, sd-assets."""

import ast
import contextlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from sd_assets import cli
from sd_assets.cli import display_width, main, shorten, text_table, visible
from sd_assets.definitions import build_definitions
from sd_assets.domain.errors import SdAssetsError
from sd_assets_tests.helpers import materialize_style, write_grid

REPO = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent


def _run(args, env_extra, cwd=REPO, check=True, timeout=300):
    env = {**os.environ, **env_extra}
    result = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    if check:
        assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result


@pytest.fixture
def cli_env(grid_path, tmp_path):
    home = tmp_path / "dagster_home"
    home.mkdir()
    (home / "dagster.yaml").write_text((REPO / "dagster.yaml").read_text())
    return {"SD_ASSETS_GRID": str(grid_path), "DAGSTER_HOME": str(home), "SD_ASSETS_DEVICE": "cpu"}


def test_dagster_job_execute_makes_a_style_and_search_finds_it(cli_env, grid_path):
    data = grid_path.parent / "data"
    _run(
        [BIN / "dagster", "job", "execute", "-m", "sd_assets", "-j", "generate_images",
         "--tags", json.dumps({"dagster/partition": "Andy Warhol"})],
        cli_env,
    )  # fmt: skip
    assert len(list((data / "images").rglob("*.png"))) == 4
    assert (data / "gallery" / "index.html").is_file()

    found = json.loads(_run([BIN / "sd-assets", "search", "--subject", "TURING", "--json"], cli_env).stdout)
    assert len(found) == 2 and {r["style"] for r in found} == {"Andy Warhol"}
    assert {"key", "prompt", "negative_prompt", "seed", "model_id", "model_revision", "steps",
            "guidance_scale", "width", "height", "run_id", "partition", "path", "created"} <= set(found[0])  # fmt: skip
    assert all(Path(r["path"]).is_file() for r in found)

    table = _run([BIN / "sd-assets", "search", "--style", "warhol", "--model", "tiny"], cli_env)
    assert table.stdout.splitlines()[0].split()[:3] == ["subject", "style", "image_index"]
    assert len(table.stdout.splitlines()) == 1 + 4 and "4 images" in table.stderr
    none = _run([BIN / "sd-assets", "search", "--style", "warhol", "--run", "no-such-run", "--json"], cli_env)
    assert json.loads(none.stdout) == []

    # A search needs the store and its catalog alone: it starts without Dagster or torch (a second saved).
    probe = (
        "import atexit, sys\n"
        "atexit.register(lambda: print('loaded:', [m for m in ('dagster', 'torch') if m in sys.modules]))\n"
        "from sd_assets.cli import main\n"
        "main(['search', '--style', 'warhol'])\n"
    )
    assert _run([sys.executable, "-c", probe], cli_env).stdout.strip().splitlines()[-1] == "loaded: []"


def test_a_run_on_a_local_store_loads_no_aws_client_nor_pandas_and_a_rerun_no_model_library(cli_env):
    """Every run is a new process: whatever it imports, every run pays for (docs/PERFORMANCE.md)."""
    heavy = ("torch", "diffusers", "transformers", "huggingface_hub", "dagster_aws", "boto3", "pandas")
    # `python -m dagster` is the `dagster` command; the atexit hook reports what the run imported.
    probe = (
        "import atexit, runpy, sys\n"
        f"atexit.register(lambda: print('loaded:', [m for m in {heavy!r} if m in sys.modules]))\n"
        "runpy.run_module('dagster', run_name='__main__', alter_sys=True)\n"
    )
    command = ["job", "execute", "-m", "sd_assets", "-j", "generate_images",
               "--tags", json.dumps({"dagster/partition": "Banksy"})]  # fmt: skip

    def loaded() -> list[str]:
        last = _run([sys.executable, "-c", probe, *command], cli_env).stdout.strip().splitlines()[-1]
        assert last.startswith("loaded: "), last
        return ast.literal_eval(last.removeprefix("loaded: "))

    first = loaded()
    assert "torch" in first and "diffusers" in first, first  # it made the style's images
    assert not {"dagster_aws", "pandas"} & set(first), first  # (transformers imports boto3 itself)
    assert loaded() == []  # nothing left to make


def test_demo_ends_with_the_gallery_path(cli_env, grid_path):
    result = _run([BIN / "sd-assets", "demo", "--style", "Banksy"], cli_env)
    # The steps' messages, not Dagster's DEBUG events (about 45 a style).
    assert "Banksy: 4 images to make on cpu" in result.stderr and " - DEBUG - " not in result.stderr
    assert "Warning" not in result.stderr and "Loading pipeline components" not in result.stderr
    assert "torchvision" not in result.stderr, "a library's advice to install what the pipelines do not need"
    last = result.stdout.strip().splitlines()[-1]
    assert last == str(grid_path.parent / "data" / "gallery" / "index.html")
    index = Path(last).read_text()
    assert '<a href="banksy/page-1.html">Banksy</a>: 4 of 4 images' in index
    assert "<li>Andy Warhol (no gallery pages yet): 0 of 4 images</li>" in index, "a style of the grid not run"


def test_a_demo_waiting_for_a_gpu_pool_slot_names_its_holders_stops_at_ctrl_c_and_goes_on_when_one_frees(
    cli_env, grid_path
):
    # The production instance limits the gpu pool; a slot another run holds (a daemon run, a killed
    # `dagster job execute`) holds the demo back. Dagster's wait for it, inside a run, takes no
    # Ctrl-C: the demo waits before the run starts, saying for whom.
    import dagster as dg

    home = Path(cli_env["DAGSTER_HOME"])
    (home / "dagster.yaml").write_text("concurrency:\n  pools:\n    default_limit: 1\ntelemetry:\n  enabled: false\n")
    with dg.DagsterInstance.from_config(str(home)) as instance:
        instance.event_log_storage.set_concurrency_slots("gpu", 1)
        assert instance.event_log_storage.claim_concurrency_slot("gpu", "another-run", "style_images").is_claimed

    def demo_waiting(log: Path) -> subprocess.Popen:
        demo = subprocess.Popen(
            [str(BIN / "sd-assets"), "demo", "--style", "Banksy"], cwd=REPO, env={**os.environ, **cli_env},
            stdout=subprocess.PIPE, stderr=log.open("wb"), text=True, start_new_session=True,
        )  # fmt: skip
        deadline = time.monotonic() + 120
        while "sd-assets: waiting for a slot" not in log.read_text():
            assert demo.poll() is None, log.read_text()
            assert time.monotonic() < deadline, "the demo said nothing of the pool it waits for\n" + log.read_text()
            time.sleep(0.5)
        return demo

    interrupted = demo_waiting(home / "interrupted.err")
    try:
        os.killpg(interrupted.pid, signal.SIGINT)
        assert interrupted.wait(timeout=30) == 130
    finally:
        with contextlib.suppress(ProcessLookupError):  # gone already, as it should be
            os.killpg(interrupted.pid, signal.SIGKILL)
        interrupted.wait()
    shown = (home / "interrupted.err").read_text()
    assert (
        "sd-assets: waiting for a slot of the gpu pool (its limit: 1), held by the runs another-run; a run killed "
        "while it held one keeps it until it is ended (the UI: Terminate, then force; or `dagster run delete -f "
        "<run id>`). Ctrl-C stops waiting\n"
    ) in shown
    assert "sd-assets: interrupted" in shown

    going_on = demo_waiting(home / "going-on.err")
    try:
        with dg.DagsterInstance.from_config(str(home)) as instance:
            instance.event_log_storage.free_concurrency_slots_for_run("another-run")
        out, _ = going_on.communicate(timeout=240)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(going_on.pid, signal.SIGKILL)
        going_on.wait()
    assert going_on.returncode == 0, (home / "going-on.err").read_text()
    assert out.splitlines()[-1] == str(grid_path.parent / "data" / "gallery" / "index.html")
    assert len(list((grid_path.parent / "data" / "images").rglob("*.png"))) == 4


def test_a_demo_that_refuses_a_prompt_names_it_shows_the_rest_and_exits_1(cli_env, grid_path):
    (grid_path.parent / "subjects" / "long.txt").write_text(" ".join(["alan"] * 90) + "\n")
    result = _run([BIN / "sd-assets", "demo", "--style", "Banksy"], cli_env, check=False)
    assert result.returncode == 1
    [line] = [line for line in result.stderr.splitlines() if line.startswith("sd-assets: ")]
    assert line.startswith("sd-assets: Banksy: the text encoder reads 77 tokens of a prompt (this model's tokenizer "
                           "reads a token a letter, as the demo's tiny-random does: ")  # fmt: skip
    assert ", and these are longer: the prompt of 'alan alan" in line
    # Counting the prompt's tokens is no mistake to warn of: transformers' "will result in indexing errors" is not shown.
    assert "Token indices sequence length" not in result.stderr
    assert line.endswith("Not made: 2 images of the prompts above; made: 4 other images of the style")
    # The gallery path is still the last line, and its pages show what was made.
    index = Path(result.stdout.strip().splitlines()[-1]).read_text()
    assert '<a href="banksy/page-1.html">Banksy</a>: 4 of 6 images' in index


def test_a_failed_demo_names_the_step_its_error_and_the_styles_it_did_not_run(cli_env, grid_path, tmp_path):
    grid_path.write_text(grid_path.read_text().replace("id: tiny-random", "id: example-org/not-cached"))
    offline = {**cli_env, "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "empty-hf-home")}
    # A style given twice is made once.
    styles = ["--style", "Banksy", "--style", "Andy Warhol", "--style", "Banksy"]
    result = _run([BIN / "sd-assets", "demo", *styles], offline, check=False)
    assert result.returncode == 1
    *_, headline, reason, not_run = result.stderr.strip().splitlines()
    assert not_run == (
        "sd-assets: not run: Andy Warhol; once the error is mended, `sd-assets demo --style Banksy --style "
        "'Andy Warhol'` again makes only what is missing"
    )
    assert headline.startswith("sd-assets: run ")
    assert headline.endswith(" for Banksy failed (its whole log is in the Dagster UI):")
    assert reason.startswith(
        "  model_weights: model example-org/not-cached@main is not "
        "(completely) in the Hugging Face cache"
    )
    assert not (grid_path.parent / "data" / "images").exists()


@pytest.mark.parametrize("case", ["relative", "missing", "broken dagster.yaml"])
def test_a_demo_with_an_unusable_dagster_home_says_so_in_one_line(grid_path, tmp_path, monkeypatch, capsys, case):
    home = {"relative": "relative-home", "missing": str(tmp_path / "missing")}.get(case, str(tmp_path))
    (tmp_path / "dagster.yaml").write_text("storage:\n  bogus: 1\n")
    monkeypatch.setenv("SD_ASSETS_GRID", str(grid_path))
    monkeypatch.setenv("DAGSTER_HOME", home)
    assert main(["demo", "--style", "Banksy"]) == 2
    captured = capsys.readouterr()
    assert captured.err == {
        "relative": f"sd-assets: DAGSTER_HOME=relative-home is not an absolute path; set it to "
        f"{os.path.abspath('relative-home')}\n",
        "missing": f"sd-assets: DAGSTER_HOME={home} is not a folder; create it (mkdir -p {home}), or unset "
        "DAGSTER_HOME for a run that is not kept\n",
    }.get(case, captured.err)
    assert len(captured.err.splitlines()) == 1 and captured.out == ""
    if case == "broken dagster.yaml":
        assert captured.err.startswith(f"sd-assets: Dagster cannot load the instance in DAGSTER_HOME={home}: ")
        assert 'unexpected config entry "bogus" at path root:storage' in captured.err
        reason = captured.err.split(f"DAGSTER_HOME={home}: ", 1)[1].rstrip("\n")
        assert len(reason) == 300 and reason.endswith("…"), "Dagster's expected schema, cut"
    assert not (grid_path.parent / "data" / "images").exists()


def test_a_prod_dagster_yaml_with_an_unset_postgres_variable_names_it(grid_path, tmp_path, monkeypatch, capsys):
    # Dagster reads the {env: ...} settings before it connects: no database is needed.
    (tmp_path / "dagster.yaml").write_text((REPO / "deploy" / "dagster-prod.yaml").read_text())
    for name, value in {"SD_ASSETS_GRID": str(grid_path), "DAGSTER_HOME": str(tmp_path),
                        "DAGSTER_PG_HOST": "127.0.0.1", "DAGSTER_PG_PORT": "5432", "DAGSTER_PG_USER": "dagster",
                        "DAGSTER_PG_DB": "dagster"}.items():  # fmt: skip
        monkeypatch.setenv(name, value)
    monkeypatch.delenv("DAGSTER_PG_PASSWORD", raising=False)
    assert main(["demo", "--style", "Banksy"]) == 2
    assert capsys.readouterr().err == (
        f"sd-assets: Dagster cannot load the instance in DAGSTER_HOME={tmp_path}: You have attempted to fetch the "
        'environment variable "DAGSTER_PG_PASSWORD" which is not set. In order for this execution to succeed it must '
        "be set in this environment\n"
    )


def test_definitions_validate_on_the_repo_and_a_clear_error_for_a_bad_grid(tmp_path):
    home = tmp_path / "dagster_home"
    home.mkdir()
    _run([BIN / "dagster", "definitions", "validate", "-m", "sd_assets"], {"DAGSTER_HOME": str(home)})
    bad = tmp_path / "grid.yaml"
    bad.write_text("styles: []\nsubjects_dir: s\nmodel: {id: tiny-random}\n")
    result = _run([BIN / "dagster", "definitions", "validate", "-m", "sd_assets"],
                  {"SD_ASSETS_GRID": str(bad), "DAGSTER_HOME": str(home)}, check=False)  # fmt: skip
    assert result.returncode != 0
    assert f"{bad}: field 'styles' = []: needs at least one style" in result.stdout + result.stderr


def test_dagster_job_execute_with_a_bad_grid_prints_one_line_not_a_traceback(cli_env, grid_path):
    grid_path.write_text(grid_path.read_text().replace("steps: 2", "steps: -1"))
    result = _run([BIN / "dagster", "job", "execute", "-m", "sd_assets", "-j", "generate_images",
                   "--tags", json.dumps({"dagster/partition": "Banksy"})], cli_env, check=False)  # fmt: skip
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines()[-1] == (
        f"Error: {grid_path}: field 'inference.steps' = -1: Input should be greater than or equal to 1"
    )


def test_a_misspelt_device_stops_the_run_before_its_first_step_in_one_line(cli_env, grid_path):
    result = _run([BIN / "dagster", "job", "execute", "-m", "sd_assets", "-j", "generate_images",
                   "--tags", json.dumps({"dagster/partition": "Banksy"})], {**cli_env, "SD_ASSETS_DEVICE": "gpu"},
                  check=False)  # fmt: skip
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines()[-1] == (
        "Error: environment variable SD_ASSETS_DEVICE='gpu': expected 'auto', 'cpu', 'cuda' or 'cuda:<index>'"
    )
    assert not (grid_path.parent / "data" / "images").exists()
    # A GPU by index is a device name: checking it looks for no GPU.
    build_definitions({"SD_ASSETS_GRID": str(grid_path), "SD_ASSETS_DEVICE": "cuda:1"})


@pytest.mark.parametrize(
    "name", ["SD_ASSETS_GRID", "SD_ASSETS_STORAGE", "SD_ASSETS_MODEL_CACHE", "SD_ASSETS_DEVICE_LOCKS", "HF_HOME"]
)
def test_a_path_setting_of_a_user_this_machine_does_not_know_is_one_line(
    grid_path, tmp_path, monkeypatch, capsys, name
):
    # Run elsewhere than the checkout: a path taken as it is written is a folder named '~nosuchuser' here.
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("SD_ASSETS_GRID", str(grid_path))
    monkeypatch.setenv(name, "~nosuchuser/sd-assets")
    why = f"environment variable {name}='~nosuchuser/sd-assets': no home folder for '~nosuchuser' on this machine"
    assert main(["demo", "--style", "Banksy"]) == 2
    assert capsys.readouterr().err == f"sd-assets: {why}\n"
    with pytest.raises(SdAssetsError, match=re.escape(why)):
        build_definitions()
    if name in ("SD_ASSETS_GRID", "SD_ASSETS_STORAGE"):  # what search reads
        assert main(["search"]) == 2
        assert capsys.readouterr().err == f"sd-assets: {why}\n"
    assert not (grid_path.parent / "data" / "images").exists() and not (tmp_path / "~nosuchuser").exists()
    with pytest.raises(SystemExit):
        main(["search", "--html", "~nosuchuser/found.html"])
    assert "argument --html: ~nosuchuser/found.html: no home folder for '~nosuchuser' on this machine" in (
        capsys.readouterr().err
    )


def test_a_storage_setting_is_read_without_the_spaces_around_it_as_the_grids_field_is(grid_path):
    from sd_assets.environment import storage_from_environment

    grid_storage = str(grid_path.parent / "data")
    assert storage_from_environment({"SD_ASSETS_GRID": str(grid_path), "SD_ASSETS_STORAGE": " "}) == grid_storage
    assert storage_from_environment({"SD_ASSETS_STORAGE": f" {grid_storage}\n"}) == grid_storage


def test_backfill_files_the_styles_for_the_daemon_and_refuses_what_it_could_not_run(cli_env, grid_path):
    import dagster as dg
    from dagster._core.execution.backfill import BulkActionStatus

    filed = _run([BIN / "sd-assets", "backfill", "--style", "Banksy"], cli_env)
    backfill_id = filed.stdout.strip()
    assert filed.stdout == f"{backfill_id}\n", "the id alone, for a script"
    with dg.DagsterInstance.from_config(cli_env["DAGSTER_HOME"]) as instance:
        [backfill] = instance.get_backfills()
        assert (backfill.backfill_id, backfill.status, list(backfill.partition_names)) == (
            backfill_id, BulkActionStatus.REQUESTED, ["Banksy"]
        )  # fmt: skip
        assert instance.get_runs() == [], "the daemon launches the runs, not the command"
    every = _run([BIN / "sd-assets", "backfill"], cli_env)
    assert "of 2 styles (Banksy, Andy Warhol) filed in DAGSTER_HOME" in every.stderr

    typo = _run([BIN / "sd-assets", "backfill", "--style", "Banksie"], cli_env, check=False)
    assert (typo.returncode, typo.stdout) == (2, "")
    assert typo.stderr == (
        f"sd-assets: unknown style 'Banksie' (did you mean 'Banksy'?); the grid {grid_path} has "
        "['Banksy', 'Andy Warhol']\n"
    )
    unkept = _run([BIN / "sd-assets", "backfill"], {**cli_env, "DAGSTER_HOME": ""}, check=False)
    assert unkept.returncode == 2 and unkept.stderr == (
        "sd-assets: a backfill is the daemon's to run, and it reads the instance in DAGSTER_HOME: set DAGSTER_HOME "
        "to the folder its dagster.yaml is in\n"
    )
    with dg.DagsterInstance.from_config(cli_env["DAGSTER_HOME"]) as instance:
        assert len(instance.get_backfills()) == 2


def test_search_reports_a_bad_grid_without_a_traceback(tmp_path):
    result = _run([BIN / "sd-assets", "search"], {"SD_ASSETS_GRID": str(tmp_path / "missing.yaml")}, check=False)
    assert result.returncode == 2
    assert "grid file" in result.stderr and "Traceback" not in result.stderr
    assert result.stderr.strip().endswith("; or set SD_ASSETS_STORAGE to the store")


def test_an_s3_endpoint_without_a_scheme_is_one_line_in_search_and_in_a_run(grid_path, monkeypatch, capsys):
    for name, value in {"SD_ASSETS_GRID": str(grid_path), "SD_ASSETS_STORAGE": "s3://some-bucket/sd",
                        "AWS_ENDPOINT_URL": "127.0.0.1:5917", "AWS_REGION": "us-east-1"}.items():  # fmt: skip
        monkeypatch.setenv(name, value)
    monkeypatch.delenv("DAGSTER_HOME", raising=False)
    reason = (
        "cannot open the bucket at s3://some-bucket/sd: AWS_ENDPOINT_URL='127.0.0.1:5917' is not a URL; "
        "write it as http://host[:port] or https://host[:port]"
    )
    assert main(["search"]) == 2
    assert capsys.readouterr().err == f"sd-assets: {reason}\n"
    assert main(["demo", "--style", "Banksy"]) == 1
    # The summary after Dagster's own log of the failed steps: each of them, with the reason.
    err = capsys.readouterr().err
    summary = err.split("sd-assets: run ", 1)[1].splitlines()[1:]
    not_run = (
        "  model_weights: not run: grid_inputs failed in this run, and without the subject lists the run makes no "
        "image; fix what its error names and run again (the model is fetched then)"
    )
    assert summary == [f"  grid_inputs: {reason}", not_run]
    # Dagster's log of the run, a line an event: the failed steps' stack traces stay in the run's log.
    log = err.split("sd-assets: run ", 1)[0].splitlines()
    assert "Stack Trace:" not in err and all(re.match(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d ", line) for line in log)
    assert [line.split(" - ")[-1] for line in log if "STEP_FAILURE" in line] == [
        'Execution of step "grid_inputs" failed.', 'Execution of step "model_weights" failed.'
    ]  # fmt: skip


def test_a_demo_step_failing_with_an_error_not_the_projects_shows_where_it_came_from(grid_path, monkeypatch, capsys):
    from sd_assets.orchestration import assets

    def broken_settings(config, artifact_store):
        raise ZeroDivisionError("a bug")

    monkeypatch.setattr(assets, "_settings_now", broken_settings)
    monkeypatch.setenv("SD_ASSETS_GRID", str(grid_path))
    monkeypatch.setenv("SD_ASSETS_DEVICE", "cpu")
    monkeypatch.delenv("DAGSTER_HOME", raising=False)

    assert main(["demo", "--style", "Banksy"]) == 1
    err = capsys.readouterr().err
    step, *stack = err.split("sd-assets: run ", 1)[1].splitlines()[1:]
    assert step == "  prompt_grid: ZeroDivisionError: a bug"
    assert any(line.strip().startswith("File ") for line in stack) and "in broken_settings" in "\n".join(stack)
    assert "Stack Trace:" not in err, "the stack once, in the summary"


def _instance_with_a_slot_held_since_pool_limits_went(home: Path) -> None:
    """An instance a version before 348426e used: its dagster.yaml set pool limits, and a run killed in
    style_images kept its gpu slot. Then the upgrade: the current dagster.yaml, which sets none."""
    import dagster as dg

    home.mkdir()
    (home / "dagster.yaml").write_text("concurrency:\n  pools:\n    default_limit: 1\ntelemetry:\n  enabled: false\n")
    with dg.DagsterInstance.from_config(str(home)) as instance:
        instance.event_log_storage.initialize_concurrency_limit_to_default("gpu")
        instance.event_log_storage.claim_concurrency_slot("gpu", "killed-run", "style_images")
    (home / "dagster.yaml").write_text((REPO / "dagster.yaml").read_text())


def test_a_demo_run_failing_outside_its_steps_shows_the_runs_error_and_any_run_holding_a_pool_slot(
    grid_path, tmp_path, monkeypatch, capsys
):
    # Dagster (1.13) then fails every run before its pooled step, outside any step, on its own tables.
    _instance_with_a_slot_held_since_pool_limits_went(tmp_path / "dagster_home")
    monkeypatch.setenv("SD_ASSETS_GRID", str(grid_path))
    monkeypatch.setenv("SD_ASSETS_DEVICE", "cpu")
    monkeypatch.setenv("DAGSTER_HOME", str(tmp_path / "dagster_home"))

    assert main(["demo", "--style", "Banksy"]) == 1
    err = capsys.readouterr().err
    headline, error, *stack = err.split("sd-assets: run ", 1)[1].splitlines()
    assert headline.endswith(" for Banksy failed (its whole log is in the Dagster UI):")
    assert error.startswith("  sqlalchemy.exc.IntegrityError: ") and "concurrency_limits" in error
    assert any(line.strip().startswith("File ") for line in stack), "where it came from, for a bug report"
    assert stack[-1] == (
        "  still holding a pool slot in this instance: killed-run; a run killed while dagster.yaml set pool "
        "limits keeps its slot, and once they are removed Dagster fails every run on it: for one no longer "
        "running, `dagster run delete -f <run id>` frees the slot (the run's record goes)"
    )
    assert not (grid_path.parent / "data" / "images").exists()


def test_search_in_a_store_without_a_catalog_says_so(grid_path, tmp_path):
    empty = tmp_path / "new-store"
    empty.mkdir()
    result = _run([BIN / "sd-assets", "search", "--subject", "turing"],
                  {"SD_ASSETS_GRID": str(grid_path), "SD_ASSETS_STORAGE": str(empty)}, check=False)  # fmt: skip
    assert result.returncode == 2 and result.stdout == ""
    assert result.stderr.strip() == (
        f"sd-assets: no catalog in {empty}: no style has been made there yet (make demo, or dagster job execute)"
    )
    # A folder that is not there is a mistyped store, not a new one.
    result = _run([BIN / "sd-assets", "search"], {"SD_ASSETS_STORAGE": str(empty) + "-typo"}, check=False)
    assert result.returncode == 2 and result.stdout == ""
    assert result.stderr.strip() == (
        f"sd-assets: no store at {empty}-typo: there is no such folder; set SD_ASSETS_STORAGE (or storage in the "
        "grid file) to the store's folder"
    )
    assert not Path(f"{empty}-typo").exists()


def test_search_in_a_store_whose_catalog_is_lost_points_to_rebuild_catalog(tmp_path, monkeypatch, capsys):
    data = tmp_path / "data"
    _catalog_of(data, [("alan turing", "")])
    (data / "gallery" / "banksy").mkdir(parents=True)
    (data / "gallery" / "banksy" / "page-1.html").write_text("<html></html>")
    shutil.rmtree(data / "catalog")  # deleted, or the images copied without it: one line, not one a style too
    monkeypatch.setenv("SD_ASSETS_STORAGE", str(data))
    assert main(["search", "--subject", "turing"]) == 2
    out, err = capsys.readouterr()
    assert out == "" and err == (
        f"sd-assets: no catalog in {data}, but it holds images; `sd-assets rebuild-catalog` gives each its row "
        "from the PNG's own provenance\n"
    )
    assert main(["rebuild-catalog"]) == 0
    assert capsys.readouterr().out == f"{data / 'catalog' / 'banksy.parquet'}: 1 row (0 kept, 1 from PNGs)\n"
    assert main(["search", "--subject", "turing"]) == 0
    assert capsys.readouterr().out.count("alan turing") == 1


def test_rebuild_catalog_reads_the_images_and_passes_over_a_named_pipe_or_broken_link_named_like_one(tmp_path):
    data = tmp_path / "data"
    _catalog_of(data, [("alan turing", "")])
    shutil.rmtree(data / "catalog")
    os.mkfifo(data / "images" / f"{'ff' * 32}.png")  # reading it would wait for a writer, forever
    (data / "images" / f"{'ee' * 32}.png").symlink_to(tmp_path / "not-mounted.png")
    # A subprocess, so that a rebuild stuck on the pipe fails the test after a minute, not CI after 90.
    rebuilt = _run([BIN / "sd-assets", "rebuild-catalog"], {"SD_ASSETS_STORAGE": str(data)}, cwd=tmp_path, timeout=60)
    assert rebuilt.stdout == f"{data / 'catalog' / 'banksy.parquet'}: 1 row (0 kept, 1 from PNGs)\n"


def test_a_pending_record_without_a_column_is_named_and_left_out_of_the_search(tmp_path, monkeypatch, capsys):
    from sd_assets.domain import catalog

    data = tmp_path / "data"
    _catalog_of(data, [("alan turing", "")])
    # Left by a version that calls the subject something else.
    batch = data / catalog.pending_prefix("Banksy") / "run-9-000001.jsonl"
    batch.parent.mkdir(parents=True, exist_ok=True)
    batch.write_text(json.dumps({"key": "9" * 64, "topic": "ada lovelace", "style": "Banksy", "seed": 1}) + "\n")
    monkeypatch.setenv("SD_ASSETS_STORAGE", str(data))
    assert main(["search"]) == 2
    out, err = capsys.readouterr()
    assert [line.split("  ")[0] for line in out.splitlines()[1:]] == ["alan turing"]
    assert err.splitlines() == [
        f"sd-assets: {batch} is not a readable batch of catalog records (a record has no 'subject'); delete it: "
        "the next run of the style recovers its images' rows from the PNGs (`sd-assets rebuild-catalog` those of "
        "older grids); the rows in it are left out of this search",
        "1 image",
    ]


def test_a_broken_catalog_hides_only_its_own_style_from_the_index_and_the_search(cli_env, grid_path, instance):
    data = grid_path.parent / "data"
    for style in ("Banksy", "Andy Warhol"):
        materialize_style(grid_path, style, instance)
    catalog = data / "catalog" / "banksy.parquet"
    catalog.write_bytes(catalog.read_bytes()[:300])

    # The next run of another style still brings the index up to date, with Banksy's count unknown.
    result = materialize_style(grid_path, "Andy Warhol", instance)
    index_event = result.asset_materializations_for_node("gallery_index")[0]
    assert index_event.metadata["unreadable_catalogs"].value == [str(catalog)]
    assert index_event.metadata["images"].value == 4
    index = (data / "gallery" / "index.html").read_text()
    assert "4 of 8 images of the grid made, across 2 styles." in index
    assert re.search(r">Banksy</a>: \? of 4 images \(catalog unreadable\)</li>", index)
    assert re.search(r">Andy Warhol</a>: 4 of 4 images</li>", index)
    assert "The catalog of Banksy could not be read" in index and "sd-assets rebuild-catalog" in index
    assert index.count("catalog unreadable</span>") == 2  # Banksy's contact-sheet cells: not "not made yet"
    assert index.count("not made yet") == 0

    # The search shows the other styles' images, names the file it could not read, and exits 2.
    found = _run([BIN / "sd-assets", "search", "--json"], cli_env, check=False)
    assert found.returncode == 2 and "Traceback" not in found.stderr
    assert {row["style"] for row in json.loads(found.stdout)} == {"Andy Warhol"}
    assert len(json.loads(found.stdout)) == 4
    assert found.stderr.startswith(f"sd-assets: {catalog} is not a readable catalog")
    assert found.stderr.strip().endswith("; the rows in it are left out of this search")
    table = _run([BIN / "sd-assets", "search", "--style", "banksy"], cli_env, check=False)
    assert table.returncode == 2 and table.stdout == "" and "no images match" in table.stderr
    # A search the style filter keeps away from Banksy misses nothing: no warning, and it succeeds.
    for others in (["--style", "warhol"], ["--where", "style=andy warhol"]):
        other = _run([BIN / "sd-assets", "search", *others], cli_env, check=False)
        assert (other.returncode, other.stderr) == (0, "4 images\n") and other.stdout.count("Andy Warhol") == 4

    _run([BIN / "sd-assets", "rebuild-catalog"], cli_env)
    assert len(json.loads(_run([BIN / "sd-assets", "search", "--json"], cli_env).stdout)) == 8


def test_a_broken_catalog_is_rebuilt_with_the_images_of_every_grid(cli_env, grid_path, instance):
    data = grid_path.parent / "data"
    runs = [materialize_style(grid_path, "Banksy", instance).run_id]
    grid_path.write_text(grid_path.read_text().replace("steps: 2", "steps: 3"))  # new keys: 4 more images
    runs.append(materialize_style(grid_path, "Banksy", instance).run_id)
    catalog = data / "catalog" / "banksy.parquet"
    catalog.write_bytes(catalog.read_bytes()[:300])

    broken = _run([BIN / "sd-assets", "search", "--style", "banksy"], cli_env, check=False)
    assert broken.returncode == 2 and "Traceback" not in broken.stderr and broken.stdout == ""
    assert broken.stderr.startswith(f"sd-assets: {catalog} is not a readable catalog")
    assert "`sd-assets rebuild-catalog` sets it aside" in broken.stderr

    rebuilt = _run([BIN / "sd-assets", "rebuild-catalog"], cli_env)
    first, second = rebuilt.stdout.splitlines()
    assert first == f"{catalog}: 8 rows (0 kept, 8 from PNGs)"
    assert second.startswith(f"  it was unreadable; the old file is now {data}/catalog/unreadable/banksy-")
    found = json.loads(_run([BIN / "sd-assets", "search", "--style", "banksy", "--json"], cli_env).stdout)
    assert sorted(row["steps"] for row in found) == [2] * 4 + [3] * 4
    assert {Path(row["path"]) for row in found} == set((data / "images").rglob("*.png"))

    again = _run([BIN / "sd-assets", "rebuild-catalog"], cli_env)
    assert again.stdout.strip() == f"every image in {data} has its catalog row; nothing to rebuild"
    typo = _run([BIN / "sd-assets", "rebuild-catalog"], {**cli_env, "SD_ASSETS_STORAGE": f"{data}-typo"}, check=False)
    assert typo.returncode == 2
    assert typo.stderr.strip() == (
        f"sd-assets: no store at {data}-typo: there is no such folder; set SD_ASSETS_STORAGE (or storage in the grid "
        "file) to the store's folder"
    )
    empty = grid_path.parent / "empty"
    empty.mkdir()
    nothing = _run([BIN / "sd-assets", "rebuild-catalog"], {**cli_env, "SD_ASSETS_STORAGE": str(empty)}, check=False)
    assert nothing.returncode == 2
    assert nothing.stderr.strip() == (
        f"sd-assets: no images and no catalog in {empty}: nothing to rebuild there (is it the right store?)"
    )

    # Same subject, image and seed, other steps: the table shows the setting that tells them apart.
    # With SD_ASSETS_STORAGE set, no grid file is needed.
    elsewhere = {**cli_env, "SD_ASSETS_GRID": str(grid_path.parent / "no-grid-here.yaml"), "SD_ASSETS_STORAGE": str(data)}
    table = _run([BIN / "sd-assets", "search", "--subject", "turing", "--style", "banksy"], elsewhere, cwd=data)
    header, *lines = table.stdout.splitlines()
    assert header.split() == ["subject", "style", "image_index", "seed", "model_id", "run_id", "steps", "path"]
    assert sorted(line.split()[-2] for line in lines) == ["2", "2", "3", "3"] and "4 images" in table.stderr
    assert {line.split()[-3] for line in lines} == {run[:8] for run in runs}, "a run id's first 8 characters"
    nothing = _run([BIN / "sd-assets", "search", "--subject", "zzz"], elsewhere)
    assert (nothing.stdout, nothing.stderr) == ("", "no images match\n")

    # An image that cannot be read is named, gets no row, and the command says it failed.
    catalog.unlink()
    cut = sorted((data / "images").rglob("*.png"))[0]
    cut.write_bytes(cut.read_bytes()[:100])
    partial = _run([BIN / "sd-assets", "rebuild-catalog"], cli_env, check=False)
    assert partial.returncode == 1 and partial.stdout.startswith(f"{catalog}: 7 rows (0 kept, 7 from PNGs)")
    assert f"sd-assets: skipped {cut}" in partial.stderr
    assert partial.stderr.strip().endswith("sd-assets: 1 image skipped, without a catalog row")


def test_a_long_subject_is_cut_to_forty_columns_in_the_search_table():
    assert shorten("a" * 40) == "a" * 40
    assert shorten("a" * 41) == "a" * 39 + "…"
    assert shorten("北" * 30) == "北" * 19 + "…", "wide characters count two columns"


def test_the_search_table_lines_up_wide_characters_and_accents():
    lines = text_table([["subject", "style", "path"], ["北斎", "Banksy", "/a.png"], ["E\u0301mile", "Frida Kahlo", "/b.png"]])
    assert lines == [
        "subject  style        path",
        "北斎     Banksy       /a.png",  # two wide characters take four columns
        "E\u0301mile    Frida Kahlo  /b.png",  # the combining accent takes none
    ]


def _catalog_of(
    data: Path, images: list[tuple[str, str]], template: str = "{} by {}", style: str = "Banksy", first_key: int = 0
) -> None:
    """A catalog of ``style`` in the store ``data`` of one image per (subject, negative prompt), PNGs
    included, keyed from ``first_key`` on; a third item in an image's tuple is its prompt's template,
    in place of ``template``."""
    from PIL import Image

    from sd_assets.domain import catalog
    from sd_assets.domain.pngmeta import Provenance, encode_png, image_key_path
    from sd_assets.domain.prompts import PromptRow
    from sd_assets.domain.store import LocalStore

    store = LocalStore(data)
    rows, records = [], []
    for number, (subject, negative, *its_template) in enumerate(images):
        key = f"{first_key + number:064x}"
        prompt = (its_template or [template])[0].format(subject, style)
        row = PromptRow(subject, style, 0, prompt, negative, 100, key)
        made = Provenance(
            key=key, subject=row.subject, style=row.style, image_index=0, prompt=row.prompt, negative_prompt=negative,
            seed=100, model_id="tiny-random", model_revision="0" * 40, scheduler="PNDMScheduler", steps=2,
            guidance_scale=7.5, width=64, height=64, run_id=f"run-{number}", partition=row.style,
            created="2026-11-27T00:00:00+00:00", device="cpu", dtype="float32",
        )  # fmt: skip
        store.write_bytes(image_key_path(key), encode_png(Image.new("RGB", (64, 64)), made))
        rows.append(row)
        records.append(catalog.catalog_record(made, store.location(image_key_path(key))))
    catalog.write_pending(store, style, "run-1-000002", records)
    catalog.merge_catalog(store, style, rows)


def test_search_table_cuts_a_long_negative_prompt_to_its_column(tmp_path, monkeypatch, capsys):
    from sd_assets import cli

    long_negative = "blurry, low quality, watermark, text, extra fingers, cropped, jpeg artifacts"
    _catalog_of(tmp_path / "data", [("alan turing", ""), ("alan turing", long_negative)])

    monkeypatch.setenv("SD_ASSETS_STORAGE", str(tmp_path / "data"))
    assert cli.main(["search", "--subject", "turing"]) == 0
    header, *lines = capsys.readouterr().out.splitlines()
    # The two images differ only in their negative prompt: it gets a column, the long one cut to 40.
    assert header.split()[-2:] == ["negative_prompt", "path"] and len(lines) == 2
    assert long_negative not in "\n".join(lines)
    assert any(shorten(long_negative) in line for line in lines) and shorten(long_negative).endswith("…")
    assert len(shorten(long_negative)) == 40


def test_the_search_table_shows_the_prompt_when_a_subject_has_several_in_one_style(tmp_path, monkeypatch, capsys):
    # The grid's prompt template changed between two runs: the same subject, style, seed and
    # settings, another prompt, another image.
    _catalog_of(
        tmp_path / "data",
        [
            ("alan turing", ""), ("alan turing", "", "{}, in the style of Banksy"),
            ("ada lovelace", ""), ("grace hopper", ""),
        ],
    )  # fmt: skip
    monkeypatch.setenv("SD_ASSETS_STORAGE", str(tmp_path / "data"))
    assert main(["search", "--subject", "turing"]) == 0
    header, *lines = capsys.readouterr().out.splitlines()
    assert header.split()[-2:] == ["prompt", "path"] and len(lines) == 2
    assert sorted(line.split("  ")[0] for line in lines) == ["alan turing"] * 2
    assert any("  alan turing by Banksy  " in line for line in lines)
    assert any("  alan turing, in the style of Banksy  " in line for line in lines)
    # Prompts that differ only by their subjects are in the subject column already.
    assert main(["search", "--subject", "e"]) == 0
    header, *lines = capsys.readouterr().out.splitlines()
    assert "prompt" not in header.split() and len(lines) == 2


def test_search_finds_the_row_of_a_png_by_its_path_and_images_by_a_whole_setting(tmp_path, monkeypatch, capsys):
    _catalog_of(tmp_path / "data", [("alan turing", ""), ("ada lovelace", "blurry")])
    monkeypatch.setenv("SD_ASSETS_STORAGE", str(tmp_path / "data"))
    png = next((tmp_path / "data" / "images").rglob(f"{1:064x}.png"))
    assert main(["search", "--key", str(png), "--json"]) == 0
    assert [row["subject"] for row in json.loads(capsys.readouterr().out)] == ["ada lovelace"]

    assert main(["search", "--where", "negative_prompt=BLURRY", "--where", "steps=2"]) == 0
    out = capsys.readouterr()
    assert [line.split("  ")[0] for line in out.out.splitlines()[1:]] == ["ada lovelace"]
    # One column twice: both must match, and no image has two values.
    assert main(["search", "--where", "steps=2", "--where", "steps=50"]) == 0
    assert capsys.readouterr().err == "no images match\n"
    assert main(["search", "--key", " .PNG"]) == 2, "nothing of a key: not every image"
    assert capsys.readouterr().err == "sd-assets: --key ' .PNG' holds no part of a content key\n"
    assert main(["search", "--prompt", "turing by"]) == 0
    assert [line.split("  ")[0] for line in capsys.readouterr().out.splitlines()[1:]] == ["alan turing"]
    # A column that is not there, or a value it cannot hold: one line, exit 2.
    assert main(["search", "--where", "sampler=PLMS"]) == 2
    assert capsys.readouterr().err.startswith("sd-assets: no catalog column 'sampler'; the columns are key, ")
    assert main(["search", "--where", "steps=many"]) == 2
    assert capsys.readouterr().err == "sd-assets: steps is a number, not 'many'\n"
    with pytest.raises(SystemExit) as exited:
        main(["search", "--where", "steps"])
    assert exited.value.code == 2 and "'steps' is not COLUMN=VALUE" in capsys.readouterr().err


def test_search_names_a_style_whose_catalog_is_gone_though_its_gallery_is_there(tmp_path, monkeypatch, capsys):
    data = tmp_path / "data"
    _catalog_of(data, [("alan turing", ""), ("ada lovelace", "")])
    _catalog_of(data, [("alan turing", "")], style="Andy Warhol", first_key=100)
    for slug in ("banksy", "andy-warhol"):
        (data / "gallery" / slug).mkdir(parents=True)
        (data / "gallery" / slug / "page-1.html").write_text("<html></html>")
    (data / "catalog" / "andy-warhol.parquet").unlink()  # deleted, or not copied with the images
    # A run that set out to make more of its images left its intent, which holds no rows.
    (data / "catalog" / "pending" / "andy-warhol").mkdir(parents=True, exist_ok=True)
    (data / "catalog" / "pending" / "andy-warhol" / "run-9.making.json").write_text('["' + "f" * 64 + '"]')
    monkeypatch.setenv("SD_ASSETS_STORAGE", str(data))

    assert main(["search", "--style", "bank"]) == 0, "Banksy's search misses none of its rows"
    assert capsys.readouterr().err == "2 images\n"
    assert main(["search"]) == 2
    out, err = capsys.readouterr()
    assert [re.split(r"  +", line)[1] for line in out.splitlines()[1:]] == ["Banksy"] * 2, "the other style's rows"
    assert err.splitlines()[0] == (
        f"sd-assets: {data / 'catalog' / 'andy-warhol.parquet'} is gone, though andy-warhol's gallery is there: its "
        "images are left out of this search; `sd-assets rebuild-catalog` gives each its row from its PNG"
    )
    assert main(["rebuild-catalog"]) == 0
    capsys.readouterr()
    assert main(["search"]) == 0
    out, err = capsys.readouterr()
    assert sorted(re.split(r"  +", line)[1] for line in out.splitlines()[1:]) == ["Andy Warhol", "Banksy", "Banksy"]
    assert not err.startswith("sd-assets:")


def test_the_search_table_shows_characters_that_would_act_on_the_terminal_as_code_points(
    tmp_path, monkeypatch, capsys
):
    # A right-to-left override would reverse the rest of the line, path included; an escape
    # would start a terminal control sequence.
    _catalog_of(tmp_path / "data", [("alan \u202eturing", ""), ("ada \x1b[2Jlovelace", "")])
    monkeypatch.setenv("SD_ASSETS_STORAGE", str(tmp_path / "data"))
    assert main(["search", "--style", "banksy"]) == 0
    out = capsys.readouterr().out
    assert "\u202e" not in out and "\x1b" not in out
    header, *lines = out.splitlines()
    assert sorted(line.split("  ")[0] for line in lines) == ["ada <U+001B>[2Jlovelace", "alan <U+202E>turing"]
    assert all(line.endswith(".png") for line in lines)
    # --json is data for programs: the subjects as they are.
    assert main(["search", "--json"]) == 0
    subjects = {record["subject"] for record in json.loads(capsys.readouterr().out)}
    assert subjects == {"alan \u202eturing", "ada \x1b[2Jlovelace"}


def test_each_search_option_filters_on_its_own_column(tmp_path, monkeypatch, capsys):
    _catalog_of(tmp_path / "data", [("alan turing", ""), ("ada lovelace", "")])
    _catalog_of(tmp_path / "data", [("alan turing", ""), ("grace hopper", "")], style="Andy Warhol", first_key=2)
    monkeypatch.setenv("SD_ASSETS_STORAGE", str(tmp_path / "data"))

    def found(*options: str) -> list[tuple[str, str, str]]:
        assert main(["search", *options, "--json"]) == 0
        return sorted((row["style"], row["subject"], row["run_id"]) for row in json.loads(capsys.readouterr().out))

    assert len(found()) == 4
    warhol = [("Andy Warhol", "alan turing", "run-0"), ("Andy Warhol", "grace hopper", "run-1")]
    assert found("--style", "WARHOL") == warhol
    assert found("--style", "andy-warhol", "--subject", "turing") == [("Andy Warhol", "alan turing", "run-0")]
    assert found("--run", "run-1") == [("Andy Warhol", "grace hopper", "run-1"), ("Banksy", "ada lovelace", "run-1")]
    assert found("--prompt", "lovelace by banksy") == [("Banksy", "ada lovelace", "run-1")]
    assert len(found("--model", "TINY-random")) == 4 and found("--model", "stable-diffusion") == []
    assert found("--key", f"{3:064x}") == [("Andy Warhol", "grace hopper", "run-1")]


def test_a_store_in_a_folder_whose_name_is_not_utf8_is_named_in_one_line(tmp_path, monkeypatch, capsys):
    # "größe" unpacked from an archive made where file names were Latin-1: one byte a letter.
    grid = write_grid(tmp_path / os.fsdecode(b"gr\xf6\xdfe"), styles=("Banksy",))
    for name, value in {"SD_ASSETS_GRID": str(grid), "SD_ASSETS_DEVICE": "cpu"}.items():
        monkeypatch.setenv(name, value)
    monkeypatch.delenv("DAGSTER_HOME", raising=False)
    expected = (
        f"storage {tmp_path}/gr\\xf6\\xdfe/data: the path is not UTF-8 text, which every image's provenance and "
        "catalog row record; rename the folder, or put the store in another one (storage: in the grid, or "
        "SD_ASSETS_STORAGE)"
    )

    assert main(["search"]) == 2
    assert capsys.readouterr().err == f"sd-assets: {expected}\n"
    assert main(["demo"]) == 1
    summary = capsys.readouterr().err.splitlines()[-2:]
    assert summary[0] == f"  grid_inputs: {expected}"
    assert summary[1].startswith("  model_weights: not run: grid_inputs failed in this run")
    assert not (grid.parent / "data" / "images").exists()


def test_ctrl_c_outside_a_run_is_one_line_and_exit_status_130(monkeypatch, capsys):
    from sd_assets import cli

    def interrupted(args):
        raise KeyboardInterrupt  # what Python raises on Ctrl-C, here while loading or between runs

    monkeypatch.setattr(cli, "_rebuild_catalog", interrupted)
    assert main(["rebuild-catalog"]) == 130
    assert capsys.readouterr().err == (
        "sd-assets: interrupted; every file it wrote is whole, and the command run again goes on\n"
    )


def test_plain_ascii_cells_are_shown_as_they_are_and_control_characters_are_named():
    # Most cells are plain ASCII and take their length; the control characters among ASCII still show by name.
    assert visible("alan turing /data/images/3f/3f2a.png") == "alan turing /data/images/3f/3f2a.png"
    assert visible("a\tb\x7f\x1b[2J") == "a<U+0009>b<U+007F><U+001B>[2J"
    assert visible("\u202eturing") == "<U+202E>turing"
    assert [display_width(text) for text in ("alan turing", "a\x1bb", "", "漢字", "e\u0301")] == [11, 3, 0, 4, 1]


def test_search_json_printed_in_chunks_is_the_list_printed_at_once(tmp_path, monkeypatch, capsys):
    _catalog_of(tmp_path / "data", [(f"subject {n}", "") for n in range(5)])
    monkeypatch.setenv("SD_ASSETS_STORAGE", str(tmp_path / "data"))
    assert main(["search", "--json"]) == 0
    whole = capsys.readouterr().out
    rows = json.loads(whole)
    assert len(rows) == 5 and whole == json.dumps(rows, indent=1, ensure_ascii=False) + "\n"
    for chunk in (1, 2, 5):  # a million rows at once took 8.6 GB
        monkeypatch.setattr(cli, "JSON_CHUNK_ROWS", chunk)
        assert main(["search", "--json"]) == 0
        assert capsys.readouterr().out == whole
    assert main(["search", "--subject", "nobody", "--json"]) == 0
    assert capsys.readouterr().out == "[]\n"
