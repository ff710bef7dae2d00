"""The Kubernetes deployment (helm/values.yaml) through Dagster's and dagster-k8s's own code.

No cluster here. The instance's dagster.yaml and the code server's pod are what the official
chart renders from helm/values.yaml (``helm_chart``), with two things changed for this machine:
Postgres is this machine's, and the run launcher reads a kubeconfig for a loopback server that
stands for the Kubernetes API (it keeps the Jobs posted to it). A style is launched as the
daemon launches one, by the K8sRunLauncher; the Job it posts is checked against the Kubernetes
API's own models and then run, container and volumes as local stand-ins, against moto's S3.
"""

from __future__ import annotations

import copy
import http.server
import json
import os
import shutil
import socket
import subprocess
import sys
import threading
import time
import zipfile
from collections.abc import Iterator
from pathlib import Path

import boto3
import dagster as dg
import kubernetes
import pytest
import yaml
from moto.server import ThreadedMotoServer

from sd_assets.definitions import GENERATE_JOB
from sd_assets_tests import helm_chart
from sd_assets_tests.helm_chart import NAMESPACE, Pod
from sd_assets_tests.helpers import PG, write_grid

WORKTREE = Path(__file__).resolve().parents[1]
VALUES = WORKTREE / "helm" / "values.yaml"
BIN = Path(sys.executable).parent
STYLE = "Andy Warhol"
SUBJECTS = ["alan turing", "ada lovelace"]


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


class _KubernetesApi(http.server.BaseHTTPRequestHandler):
    """Takes the Jobs posted to it, as the API server would, and keeps them."""

    posted: list[tuple[str, dict]]

    def do_POST(self):
        body = self.rfile.read(int(self.headers["Content-Length"]))
        self.posted.append((self.path, json.loads(body)))
        self.send_response(201)
        self.send_header("Content-Type", "application/json")
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


@pytest.fixture
def kubernetes_api(tmp_path) -> Iterator[tuple[Path, list]]:
    """A kubeconfig for the loopback API server, and the (path, Job) pairs posted to it."""
    handler = type("Api", (_KubernetesApi,), {"posted": []})
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    kubeconfig = tmp_path / "kubeconfig"
    kubeconfig.write_text(yaml.safe_dump({
        "apiVersion": "v1", "kind": "Config", "current-context": "test",
        "clusters": [{"name": "test", "cluster": {"server": f"http://127.0.0.1:{server.server_port}"}}],
        "users": [{"name": "test", "user": {"token": "test"}}],
        "contexts": [{"name": "test", "context": {"cluster": "test", "user": "test"}}],
    }))  # fmt: skip
    try:
        yield kubeconfig, handler.posted
    finally:
        server.shutdown()
        server.server_close()


@pytest.fixture(scope="module")
def s3_endpoint() -> Iterator[str]:
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=_free_port(), verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    yield f"http://{host}:{port}"
    server.stop()


def _values() -> dict:
    return yaml.safe_load(VALUES.read_text())


def _on_this_machine(values: dict, database: str, kubeconfig: Path) -> dict:
    """The chart's values with this machine's Postgres and the loopback API server."""
    values = copy.deepcopy(values)
    values["postgresql"].update(postgresqlHost=PG["host"], postgresqlUsername=PG["user"], postgresqlDatabase=database)
    launcher = values["runLauncher"]["config"]["k8sRunLauncher"]
    launcher.update(loadInclusterConfig=False, kubeconfigFile=str(kubeconfig))
    return values


def _env_value(env: list[dict], name: str) -> str:
    return next(variable["value"] for variable in env if variable["name"] == name)


def test_the_chart_makes_an_instance_with_the_kubernetes_launcher_and_one_queued_run_a_style(
    tmp_path, postgres_database, kubernetes_api, monkeypatch
):
    kubeconfig, _posted = kubernetes_api
    # What every pod of the chart gets from the Postgres Secret.
    monkeypatch.setenv("DAGSTER_PG_PASSWORD", "unused-with-trust-auth")
    monkeypatch.setenv("AWS_REGION", "us-east-1")
    config = helm_chart.instance_config(_on_this_machine(_values(), postgres_database, kubeconfig))
    home = tmp_path / "home"
    home.mkdir()
    (home / "dagster.yaml").write_text(yaml.safe_dump(config))

    # Dagster validates every section against its own schema as it loads them.
    with dg.DagsterInstance.from_config(str(home)) as instance:
        assert type(instance.run_storage).__name__ == "PostgresRunStorage"
        launcher = instance.run_launcher
        assert type(launcher).__name__ == "K8sRunLauncher"
        assert launcher.job_namespace == NAMESPACE
        assert launcher.run_k8s_config["container_config"]["resources"]["limits"]["nvidia.com/gpu"] == 1
        queue = instance.get_concurrency_config().run_queue_config
        assert queue.max_concurrent_runs == 4
        assert queue.tag_concurrency_limits == [
            {"key": "dagster/partition", "value": {"applyLimitPerUniqueValue": True}, "limit": 1}
        ]
        assert instance.run_retries_max_retries == 2
        assert not instance.run_retries_retry_on_asset_or_op_failure
        assert instance.run_monitoring_enabled
        assert type(instance.compute_log_manager).__name__ == "S3ComputeLogManager"


def _validated_job(body: dict) -> kubernetes.client.V1Job:
    """The Job as the Kubernetes API's models read it; every field of the body is one they know."""
    api = kubernetes.client.ApiClient()
    response = type("Response", (), {"data": json.dumps(body)})()
    job = api.deserialize(response, "V1Job")
    assert api.sanitize_for_serialization(job) == body, "the Job has fields the Kubernetes API does not know"
    return job


def _wait_until_ready(port: int, process: subprocess.Popen, log: Path, env: dict, deadline: float) -> None:
    """Waits on the chart's readiness probe of a code server: ``dagster api grpc-health-check``."""
    while time.monotonic() < deadline:
        if process.poll() is not None:
            pytest.fail(f"the code server exited with {process.returncode}:\n{log.read_text()[-3000:]}")
        probe = subprocess.run([str(BIN / "dagster"), "api", "grpc-health-check", "-p", str(port)], env=env,
                               capture_output=True, timeout=60)  # fmt: skip
        if probe.returncode == 0:
            return
        time.sleep(1)
    pytest.fail(f"the code server was not ready in time:\n{log.read_text()[-3000:]}")


def test_a_style_launched_on_the_chart_runs_in_a_gpu_pod_and_makes_its_images(
    tmp_path, postgres_database, kubernetes_api, s3_endpoint, monkeypatch
):
    kubeconfig, posted = kubernetes_api
    monkeypatch.setenv("DAGSTER_PG_PASSWORD", "unused-with-trust-auth")
    chart_values = _values()
    values = _on_this_machine(chart_values, postgres_database, kubeconfig)
    deployment = helm_chart.user_deployment(values, "sd-assets")
    deployment["port"] = _free_port()

    # What docs/KUBERNETES.md has the user create: the Secrets and the grid ConfigMap.
    aws = {
        "AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_REGION": "us-east-1",
        "AWS_ENDPOINT_URL": s3_endpoint,
    }  # fmt: skip
    for name, value in aws.items():
        monkeypatch.setenv(name, value)
    secrets = {"sd-assets-aws": aws, "sd-assets-postgresql": {"postgresql-password": "unused-with-trust-auth"}}
    grid_text = write_grid(tmp_path / "grid-source", styles=["Banksy", STYLE], subjects=SUBJECTS).read_text()
    config_maps = {**helm_chart.chart_config_maps(values, deployment), "sd-assets-grid": {"grid.yaml": grid_text}}
    storage = _env_value(deployment["env"], "SD_ASSETS_STORAGE")
    bucket, prefix = storage.removeprefix("s3://").split("/", 1)
    s3 = boto3.client("s3", endpoint_url=s3_endpoint, region_name="us-east-1", aws_access_key_id="testing",
                      aws_secret_access_key="testing")  # fmt: skip
    s3.create_bucket(Bucket=bucket)
    s3.put_object(Bucket=bucket, Key=f"{prefix}/subjects/people.txt", Body="\n".join(SUBJECTS).encode())

    # The image's own environment: the project installed, no variables of this test's process.
    image_env = {"PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}", "HOME": str(tmp_path)}
    for name in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        if name in os.environ:
            image_env[name] = os.environ[name]

    # The image's DAGSTER_HOME (deploy/Dockerfile), a folder of each container's own.
    dagster_home = helm_chart.instance_config(values)["run_launcher"]["config"]["dagster_home"]
    code_server = Pod(helm_chart.code_server_pod_spec(values, deployment), tmp_path / "code-server", secrets,
                      config_maps, image_paths={dagster_home: tmp_path / "code-server" / "dagster_home"})  # fmt: skip
    (tmp_path / "code-server" / "dagster_home").mkdir(parents=True)
    log = tmp_path / "code-server.log"
    process = code_server.start(image_env, log)
    try:
        _wait_until_ready(deployment["port"], process, log, image_env, time.monotonic() + 120)

        # The daemon's side: the chart's instance, launching the run as it dequeues one (the
        # queue itself is the instance test's; here the run goes straight to the launcher).
        home = tmp_path / "home"
        home.mkdir()
        instance_config = helm_chart.instance_config(values)
        instance_config["run_coordinator"] = {
            "module": "dagster.core.run_coordinator", "class": "DefaultRunCoordinator",
        }  # fmt: skip
        (home / "dagster.yaml").write_text(yaml.safe_dump(instance_config))
        workspace = tmp_path / "workspace.yaml"
        workspace.write_text(yaml.safe_dump({"load_from": [{"grpc_server": {
            "host": "127.0.0.1", "port": deployment["port"], "location_name": deployment["name"]}}]}))  # fmt: skip
        launcher_env = {**image_env, **aws, "DAGSTER_HOME": str(home), "DAGSTER_PG_PASSWORD": "unused"}
        launch = subprocess.run(
            [str(BIN / "dagster"), "job", "launch", "-w", str(workspace), "-j", GENERATE_JOB,
             "--tags", json.dumps({"dagster/partition": STYLE})],
            env=launcher_env, capture_output=True, text=True, timeout=120,
        )  # fmt: skip
        assert launch.returncode == 0, launch.stderr[-3000:]
    finally:
        process.terminate()
        process.wait(timeout=30)

    assert [path for path, _ in posted] == [f"/apis/batch/v1/namespaces/{NAMESPACE}/jobs"]
    body = posted[0][1]
    job = _validated_job(body)
    pod = job.spec.template.spec
    (container,) = pod.containers
    assert container.image == helm_chart.code_server_image(deployment)
    assert container.args[:3] == ["dagster", "api", "execute_run"]
    # One GPU, on a GPU node, for the run's pod.
    assert container.resources.limits["nvidia.com/gpu"] == "1"
    assert pod.node_selector == {"nvidia.com/gpu.present": "true"}
    assert [(t.key, t.effect) for t in pod.tolerations] == [("nvidia.com/gpu", "NoSchedule")]
    # The code server's grid, store and credentials, and the node's model cache.
    env = {variable.name: variable.value for variable in container.env}
    assert env["SD_ASSETS_GRID"] == "/etc/sd-assets/grid.yaml"
    assert env["SD_ASSETS_STORAGE"] == storage
    assert env["SD_ASSETS_MODEL_CACHE"] == "/var/cache/sd-assets/models"
    assert {source.secret_ref.name for source in container.env_from if source.secret_ref} == {"sd-assets-aws"}
    volumes = {volume.name: volume for volume in pod.volumes}
    assert volumes["grid"].config_map.name == "sd-assets-grid"
    assert volumes["model-cache"].host_path.path == "/var/cache/sd-assets/models"

    # The kubelet's side: the pod's container, run to its end.
    run_pod = Pod(body["spec"]["template"]["spec"], tmp_path / "run-pod", secrets, config_maps,
                  image_paths={dagster_home: tmp_path / "run-pod" / "dagster_home"})  # fmt: skip
    (tmp_path / "run-pod" / "dagster_home").mkdir(parents=True)
    finished = run_pod.run(image_env, timeout=600)
    assert finished.returncode == 0, finished.stdout[-3000:] + finished.stderr[-3000:]

    with dg.DagsterInstance.from_config(str(home)) as instance:
        (run,) = instance.get_runs()
        assert run.status == dg.DagsterRunStatus.SUCCESS
        assert run.tags["dagster/partition"] == STYLE
        assert run.tags["dagster/image"] == helm_chart.code_server_image(deployment)
        record = instance.get_latest_materialization_event(dg.AssetKey("style_images"))
        assert record.run_id == run.run_id
        assert record.asset_materialization.partition == STYLE
        assert record.asset_materialization.metadata["generated"].value == len(SUBJECTS) * 2

    keys = [item["Key"] for page in s3.get_paginator("list_objects_v2").paginate(Bucket=bucket)
            for item in page.get("Contents", [])]  # fmt: skip
    assert len([key for key in keys if key.startswith(f"{prefix}/images/") and key.endswith(".png")]) == 4
    assert f"{prefix}/gallery/index.html" in keys
    # The step's output went to the chart's compute log bucket; the model to the node's cache.
    assert any(key.startswith("dagster-compute-logs/") for key in keys)
    assert any((tmp_path / "run-pod" / "volumes" / "model-cache").rglob("*.safetensors"))


def test_the_image_installs_the_whole_package_from_what_its_dockerfile_copies(tmp_path):
    """The image installs the project as a wheel, not in place as make does: a file that the
    wheel leaves out (a template, say) would be missing only on the cluster."""
    dockerfile = (WORKTREE / "deploy" / "Dockerfile").read_text().splitlines()
    install = next(i for i, line in enumerate(dockerfile) if line.startswith("RUN pip install ."))
    context = tmp_path / "context"
    context.mkdir()
    for line in dockerfile[:install]:
        if line.startswith("COPY "):
            source, _destination = line.split()[1:]
            if (WORKTREE / source).is_dir():
                shutil.copytree(WORKTREE / source, context / source, ignore=shutil.ignore_patterns("__pycache__"))
            else:
                shutil.copy(WORKTREE / source, context / source)
    built = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "--no-build-isolation", "-w",
         str(tmp_path / "wheel"), str(context)],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert built.returncode == 0, built.stderr[-3000:]
    (wheel,) = (tmp_path / "wheel").glob("*.whl")
    packaged = {name for name in zipfile.ZipFile(wheel).namelist() if name.startswith("sd_assets/")}
    project = {
        path.relative_to(WORKTREE).as_posix()
        for path in (WORKTREE / "sd_assets").rglob("*")
        if path.is_file() and "__pycache__" not in path.parts
    }
    assert project - packaged == set()
    entry_points = next(name for name in zipfile.ZipFile(wheel).namelist() if name.endswith("entry_points.txt"))
    assert "sd-assets = sd_assets.cli:main" in zipfile.ZipFile(wheel).read(entry_points).decode()
