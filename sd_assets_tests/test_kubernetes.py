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
import re
import shutil
import subprocess
import sys
import threading
import time
import urllib.request
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
from sd_assets_tests.helm_chart import NAMESPACE
from sd_assets_tests.kubelet import Pod
from sd_assets_tests.helpers import LOCAL_POSTGRES, free_port, stop_processes, write_grid

WORKTREE = Path(__file__).resolve().parents[1]
VALUES = WORKTREE / "helm" / "values.yaml"
BIN = Path(sys.executable).parent
STYLE = "Andy Warhol"
SUBJECTS = ["alan turing", "ada lovelace"]


class _KubernetesApi(http.server.BaseHTTPRequestHandler):
    """Takes the Jobs posted to it, as the API server would, and answers for their status.

    ``jobs`` holds each Job by name in the order posted; ``status`` is what a Job's status reads
    (active until the test's stand-in kubelet has run it), and ``posted_at`` when it came (epoch
    seconds, as the instance's run records).
    """

    jobs: dict[str, dict]
    status: dict[str, dict]
    posted_at: dict[str, float]

    def _reply(self, code: int, body: dict) -> None:
        data = json.dumps(body).encode()
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_POST(self):
        job = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        assert self.path == f"/apis/batch/v1/namespaces/{NAMESPACE}/jobs", self.path
        self.jobs[job["metadata"]["name"]] = job
        self.status[job["metadata"]["name"]] = {"active": 1}
        self.posted_at[job["metadata"]["name"]] = time.time()
        self._reply(201, job)

    def do_GET(self):
        parts = self.path.split("?")[0].strip("/").split("/")
        # /apis/batch/v1/namespaces/<namespace>/jobs/<name>[/status]
        if parts[:3] == ["apis", "batch", "v1"] and len(parts) >= 7 and parts[6] in self.jobs:
            self._reply(200, {**self.jobs[parts[6]], "status": self.status[parts[6]]})
        else:
            self._reply(404, {"kind": "Status", "apiVersion": "v1", "status": "Failure", "reason": "NotFound",
                              "code": 404})  # fmt: skip

    def log_message(self, *args):
        pass


@pytest.fixture
def s3_endpoint() -> Iterator[str]:
    """An empty S3 for each test: the values name one bucket, and moto keeps its buckets per
    process, whatever server serves them, so an earlier test's images would still be there."""
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    endpoint = f"http://{host}:{port}"
    urllib.request.urlopen(urllib.request.Request(f"{endpoint}/moto-api/reset", method="POST"), timeout=30).close()
    yield endpoint
    server.stop()


def _values() -> dict:
    return yaml.safe_load(VALUES.read_text())


def _on_this_machine(values: dict, database: str, kubeconfig: Path) -> dict:
    """The chart's values with this machine's Postgres and the loopback API server."""
    values = copy.deepcopy(values)
    values["postgresql"].update(
        postgresqlHost=LOCAL_POSTGRES["host"], postgresqlUsername=LOCAL_POSTGRES["user"], postgresqlDatabase=database
    )
    launcher = values["runLauncher"]["config"]["k8sRunLauncher"]
    launcher.update(loadInclusterConfig=False, kubeconfigFile=str(kubeconfig))
    return values


def _env_value(env: list[dict], name: str) -> str:
    return next(variable["value"] for variable in env if variable["name"] == name)


@pytest.fixture
def kubernetes_api(tmp_path) -> Iterator[tuple[Path, type[_KubernetesApi]]]:
    """A kubeconfig for the loopback API server, and the server's handler class (its Jobs)."""
    handler = type("Api", (_KubernetesApi,), {"jobs": {}, "status": {}, "posted_at": {}})
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
        yield kubeconfig, handler
    finally:
        server.shutdown()
        server.server_close()


def test_the_chart_makes_an_instance_with_the_kubernetes_launcher_and_one_queued_run_a_style(
    tmp_path, postgres_database, kubernetes_api, monkeypatch
):
    # Only the kubeconfig: the launcher loads it as it starts, and this test launches nothing.
    kubeconfig, _api = kubernetes_api
    # What every pod of the chart gets from the Postgres Secret.
    monkeypatch.setenv("DAGSTER_PG_PASSWORD", "unused-with-trust-auth")
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


# Values the API server accepts for the fields the values file sets (it answers 422 to others).
HOST_PATH_TYPES = {"", "DirectoryOrCreate", "Directory", "FileOrCreate", "File", "Socket", "CharDevice", "BlockDevice"}
TOLERATION_OPERATORS = {"Exists", "Equal"}
TAINT_EFFECTS = {"NoSchedule", "PreferNoSchedule", "NoExecute"}
PULL_POLICIES = {"Always", "IfNotPresent", "Never"}


def _validated_job(body: dict) -> kubernetes.client.V1Job:
    """The Job as the Kubernetes API's models read it, with the values of the fields the values
    file sets checked as the API server would take them. (dagster-k8s builds the Job from those
    models, so a field they do not know already fails the launch.)"""
    response = type("Response", (), {"data": json.dumps(body)})()
    job = kubernetes.client.ApiClient().deserialize(response, "V1Job")
    pod = job.spec.template.spec
    for container in pod.containers:
        assert container.image_pull_policy in PULL_POLICIES, container.image_pull_policy
        for amounts in (container.resources.requests or {}, container.resources.limits or {}):
            for amount in amounts.values():
                kubernetes.utils.parse_quantity(amount)  # raises ValueError on "24GB"
        assert {mount.name for mount in container.volume_mounts or []} <= {volume.name for volume in pod.volumes}
    for volume in pod.volumes or []:
        if volume.host_path:
            assert volume.host_path.type in HOST_PATH_TYPES, volume.host_path.type
    for toleration in pod.tolerations or []:
        assert toleration.operator in TOLERATION_OPERATORS and toleration.effect in TAINT_EFFECTS, toleration
    return job


# A sitecustomize for the daemon pod's processes: the editable install's import hook comes before
# PYTHONPATH, so a hook of its own, first in line, refuses the project.
_NO_PROJECT = """
import sys


class _NotInThisImage:
    def find_spec(self, name, path=None, target=None):
        if name == "sd_assets" or name.startswith("sd_assets."):
            raise ImportError(f"{name}: the daemon's image has no sd_assets")
        return None


sys.meta_path.insert(0, _NotInThisImage())
"""


class Cluster:
    """The chart's release on this machine: its code server and daemon as processes, a loopback
    Kubernetes API, this machine's Postgres and moto's S3; run pods run when the test says."""

    def __init__(self, root: Path, database: str, kubeconfig: Path, api: type[_KubernetesApi], s3_endpoint: str):
        self.root = root
        self.api = api
        self.values = _on_this_machine(_values(), database, kubeconfig)
        self.deployment = helm_chart.user_deployment(self.values, "sd-assets")
        self.deployment["port"] = free_port()
        # What docs/KUBERNETES.md has the user create: the Secrets, the grid ConfigMap, the lists.
        self.aws = {
            "AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_REGION": "us-east-1",
            "AWS_ENDPOINT_URL": s3_endpoint,
        }  # fmt: skip
        self.secrets = {"sd-assets-aws": self.aws,
                        "sd-assets-postgresql": {"postgresql-password": "unused-with-trust-auth"}}  # fmt: skip
        grid = write_grid(root / "grid-source", styles=["Banksy", STYLE], subjects=SUBJECTS).read_text()
        self.config_maps = {**helm_chart.chart_config_maps(self.values, self.deployment),
                            "sd-assets-grid": {"grid.yaml": grid}}  # fmt: skip
        self.storage = _env_value(self.deployment["env"], "SD_ASSETS_STORAGE")
        self.bucket, self.prefix = self.storage.removeprefix("s3://").split("/", 1)
        self.s3 = boto3.client("s3", endpoint_url=s3_endpoint, region_name="us-east-1", aws_access_key_id="testing",
                               aws_secret_access_key="testing")  # fmt: skip
        self.s3.create_bucket(Bucket=self.bucket)
        self.s3.put_object(Bucket=self.bucket, Key=f"{self.prefix}/subjects/people.txt",
                           Body="\n".join(SUBJECTS).encode())  # fmt: skip
        # The image's own environment: the project installed, no variables of this test's process.
        self.image_env = {"PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}", "HOME": str(root)}
        for name in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
            if name in os.environ:
                self.image_env[name] = os.environ[name]
        self.instance_config = helm_chart.instance_config(self.values)
        # The image's DAGSTER_HOME (deploy/Dockerfile), a folder of each container's own.
        self.dagster_home = self.instance_config["run_launcher"]["config"]["dagster_home"]
        # The daemon's and the webserver's DAGSTER_HOME: the chart mounts its instance ConfigMap there.
        self.home = root / "instance"
        self.home.mkdir()
        (self.home / "dagster.yaml").write_text(yaml.safe_dump(self.instance_config))
        self.workspace = root / "workspace.yaml"
        server = {"host": "127.0.0.1", "port": self.deployment["port"], "location_name": self.deployment["name"]}
        self.workspace.write_text(yaml.safe_dump({"load_from": [{"grpc_server": server}]}))
        # The daemon pod's environment: the chart gives it the Postgres password, not the AWS Secret,
        # and it runs Dagster's own image, without sd_assets (here made unimportable: the daemon and
        # the commands run in its pod must not need it).
        without_project = root / "daemon-image"
        without_project.mkdir()
        (without_project / "sitecustomize.py").write_text(_NO_PROJECT)
        self.dagster_env = {**self.image_env, "DAGSTER_HOME": str(self.home), "PYTHONPATH": str(without_project),
                            "DAGSTER_PG_PASSWORD": "unused-with-trust-auth"}  # fmt: skip
        blocked = subprocess.run([sys.executable, "-c", "import sd_assets"], env=self.dagster_env, capture_output=True)
        assert b"the daemon's image has no sd_assets" in blocked.stderr, blocked.stderr
        self.processes: list[tuple[Path, subprocess.Popen]] = []

    def pod(self, spec: dict, name: str) -> Pod:
        folder = self.root / name
        (folder / "dagster_home").mkdir(parents=True)
        image_paths = {self.dagster_home: folder / "dagster_home"}
        return Pod(spec, folder, self.root / "node", self.secrets, self.config_maps, image_paths=image_paths)

    def start_code_server(self) -> None:
        log = self.root / "code-server.log"
        spec = helm_chart.code_server_pod_spec(self.values, self.deployment)
        # The pod's address is its own; on this machine the server listens on loopback only.
        (container,) = spec["containers"]
        container["args"] = ["127.0.0.1" if arg == "0.0.0.0" else arg for arg in container["args"]]
        process = self.pod(spec, "code-server").start(self.image_env, log)
        self.processes.append((log, process))
        deadline = time.monotonic() + 120
        # The chart's readiness probe of a code server.
        probe = [str(BIN / "dagster"), "api", "grpc-health-check", "-p", str(self.deployment["port"])]
        while subprocess.run(probe, env=self.image_env, capture_output=True, timeout=60).returncode != 0:
            if process.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"the code server did not get ready:\n{log.read_text()[-3000:]}")
            time.sleep(1)

    def start_daemon(self) -> None:
        log = self.root / "daemon.log"
        with open(log, "wb") as output:
            process = subprocess.Popen(
                [str(BIN / "dagster-daemon"), "run", "-w", str(self.workspace)],
                env=self.dagster_env, stdout=output, stderr=subprocess.STDOUT, cwd=self.root,
            )  # fmt: skip
        self.processes.append((log, process))

    def logs(self) -> str:
        return "\n".join(f"--- {log.name} ---\n{log.read_text()[-3000:]}" for log, _ in self.processes)

    def stop(self) -> None:
        # A code server may take its time over SIGTERM; Kubernetes would kill it after 30 s.
        stop_processes([process for _log, process in self.processes], grace_seconds=10)

    def dagster(self, *args: str) -> None:
        """A ``dagster`` command in the daemon's pod (``kubectl exec``), against the workspace there."""
        done = subprocess.run([str(BIN / "dagster"), *args], env=self.dagster_env, capture_output=True, text=True,
                              timeout=120)  # fmt: skip
        assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]

    def launch(self, style: str) -> None:
        self.dagster("job", "launch", "-w", str(self.workspace), "-j", GENERATE_JOB,
                     "--tags", json.dumps({"dagster/partition": style}))  # fmt: skip

    def backfill(self, *styles: str) -> None:
        self.dagster("job", "backfill", "-w", str(self.workspace), "-j", GENERATE_JOB,
                     "--partitions", ",".join(styles), "--noprompt")  # fmt: skip

    def wait_for_jobs(self, count: int, timeout: float = 120) -> list[dict]:
        deadline = time.monotonic() + timeout
        while len(self.api.jobs) < count:
            if time.monotonic() > deadline:
                pytest.fail(f"{len(self.api.jobs)} Jobs posted, not {count}\n{self.logs()}")
            time.sleep(0.5)
        return list(self.api.jobs.values())

    def run_job(self, job: dict) -> None:
        """What the kubelet does with the Job's pod: runs it, and the Job's status says how it ended."""
        name = job["metadata"]["name"]
        finished = self.pod(job["spec"]["template"]["spec"], name).run(self.image_env, timeout=600)
        self.api.status[name] = {"succeeded": 1} if finished.returncode == 0 else {"failed": 1}
        assert finished.returncode == 0, finished.stdout[-3000:] + finished.stderr[-3000:]

    def keys(self) -> list[str]:
        pages = self.s3.get_paginator("list_objects_v2").paginate(Bucket=self.bucket)
        return [item["Key"] for page in pages for item in page.get("Contents", [])]

    def images(self) -> list[str]:
        return [key for key in self.keys() if key.startswith(f"{self.prefix}/images/") and key.endswith(".png")]


@pytest.fixture
def cluster(tmp_path, postgres_database, kubernetes_api, s3_endpoint, monkeypatch) -> Iterator[Cluster]:
    kubeconfig, api = kubernetes_api
    started = Cluster(tmp_path, postgres_database, kubeconfig, api, s3_endpoint)
    # This process reads the instance too.
    monkeypatch.setenv("DAGSTER_PG_PASSWORD", "unused-with-trust-auth")
    for name, value in started.aws.items():
        monkeypatch.setenv(name, value)
    try:
        # The instance's tables first: the daemon and a first command making them at once on an
        # empty database collide ("type runs already exists").
        with dg.DagsterInstance.from_config(str(started.home)):
            pass
        started.start_code_server()
        started.start_daemon()
        yield started
    finally:
        started.stop()


def test_a_style_launched_on_the_chart_runs_in_a_gpu_pod_and_makes_its_images(cluster):
    cluster.launch(STYLE)
    # The run waits in the queue; the daemon hands it to the K8sRunLauncher, which posts a Job.
    (body,) = cluster.wait_for_jobs(1)
    job = _validated_job(body)
    pod = job.spec.template.spec
    (container,) = pod.containers
    assert container.image == helm_chart.code_server_image(cluster.deployment)
    assert container.args[:3] == ["dagster", "api", "execute_run"]
    # One GPU, on a GPU node, for the run's pod.
    assert container.resources.limits["nvidia.com/gpu"] == "1"
    assert pod.node_selector == {"nvidia.com/gpu.present": "true"}
    assert [(t.key, t.effect) for t in pod.tolerations] == [("nvidia.com/gpu", "NoSchedule")]
    # The code server's grid, store and credentials, and the node's model cache.
    env = {variable.name: variable.value for variable in container.env}
    assert env["SD_ASSETS_GRID"] == "/etc/sd-assets/grid.yaml"
    assert env["SD_ASSETS_STORAGE"] == cluster.storage
    assert env["SD_ASSETS_MODEL_CACHE"] == "/var/cache/sd-assets/models"
    assert {source.secret_ref.name for source in container.env_from if source.secret_ref} == {"sd-assets-aws"}
    volumes = {volume.name: volume for volume in pod.volumes}
    assert volumes["grid"].config_map.name == "sd-assets-grid"
    assert volumes["model-cache"].host_path.path == "/var/cache/sd-assets/models"

    cluster.run_job(body)

    with dg.DagsterInstance.from_config(str(cluster.home)) as instance:
        (run,) = instance.get_runs()
        assert run.status == dg.DagsterRunStatus.SUCCESS
        assert run.tags["dagster/partition"] == STYLE
        assert run.tags["dagster/image"] == helm_chart.code_server_image(cluster.deployment)
        record = instance.get_latest_materialization_event(dg.AssetKey("style_images"))
        assert record.run_id == run.run_id
        assert record.asset_materialization.partition == STYLE
        assert record.asset_materialization.metadata["generated"].value == len(SUBJECTS) * 2

    keys = cluster.keys()
    assert len(cluster.images()) == len(SUBJECTS) * 2
    assert f"{cluster.prefix}/gallery/index.html" in keys
    # The step's output went to the chart's compute log bucket; the model to the node's cache.
    assert any(key.startswith("dagster-compute-logs/") for key in keys)
    assert any((cluster.root / "node" / "var/cache/sd-assets/models").rglob("*.safetensors"))


def test_a_backfill_starts_one_pod_a_style_and_a_second_run_of_a_style_waits_and_makes_nothing_again(cluster):
    # As the docs have it, from the daemon's pod: a backfill of two styles, then one more run of one.
    cluster.backfill(STYLE, "Banksy")
    cluster.launch(STYLE)
    # One Job per style: the style's second run waits in the queue while its first one's pod runs.
    cluster.wait_for_jobs(2)
    with dg.DagsterInstance.from_config(str(cluster.home)) as instance:
        queued = instance.get_runs(filters=dg.RunsFilter(statuses=[dg.DagsterRunStatus.QUEUED]))
        assert [run.tags["dagster/partition"] for run in queued] == [STYLE], cluster.logs()
        ended = {}
        for job in cluster.wait_for_jobs(2)[:2]:
            cluster.run_job(job)
            record = instance.get_run_record_by_id(job["metadata"]["labels"]["dagster/run-id"])
            ended[record.dagster_run.tags["dagster/partition"]] = record.end_time
        assert len(cluster.images()) == 2 * len(SUBJECTS) * 2
        # The two pods ran one after the other on one node: the second found the model in its cache.
        made = instance.fetch_materializations(dg.AssetKey("style_images"), limit=10).records
        copied = sorted(record.asset_materialization.metadata["model_bytes_copied"].value for record in made)
        assert copied[0] == 0 and copied[1] > 0, copied

        # Launched only once the style's first run has ended, it finds its images made.
        again = cluster.wait_for_jobs(3)[2]
        assert cluster.api.posted_at[again["metadata"]["name"]] >= ended[STYLE]
        cluster.run_job(again)
        runs = instance.get_runs(filters=dg.RunsFilter(tags={"dagster/partition": STYLE}))
        assert [run.status for run in runs] == [dg.DagsterRunStatus.SUCCESS] * 2
        latest = instance.get_latest_materialization_event(dg.AssetKey("style_images"))
        assert latest.run_id == runs[0].run_id
        assert latest.asset_materialization.metadata["generated"].value == 0
    assert len(cluster.images()) == 2 * len(SUBJECTS) * 2


def test_the_image_installs_the_whole_package_from_what_its_dockerfile_copies(tmp_path):
    """The image installs the project as a wheel and removes its sources, not in place as make
    does: a file that the wheel leaves out (a template, say) would be missing only on the cluster."""
    dockerfile = (WORKTREE / "deploy" / "Dockerfile").read_text().splitlines()
    build = "/tmp/sd-assets"
    assert f"RUN pip install {build} && rm -rf {build} && mkdir -p \"$DAGSTER_HOME\"" in dockerfile
    install = next(i for i, line in enumerate(dockerfile) if line.startswith(f"RUN pip install {build}"))
    context = tmp_path / "context"
    for line in dockerfile[:install]:
        if line.startswith("COPY "):
            source, destination = line.split()[1:]
            assert destination.startswith(build + "/"), line
            target = context / (destination.removeprefix(build + "/") or ".")
            if (WORKTREE / source).is_dir():
                shutil.copytree(WORKTREE / source, target, ignore=shutil.ignore_patterns("__pycache__"))
            else:
                target.mkdir(parents=True, exist_ok=True)
                shutil.copy(WORKTREE / source, target)
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
    # The image's torch layer is the version setup.py pins (else pip would replace it in the next).
    pinned = re.search(r'"(torch==[^"]+)"', (WORKTREE / "setup.py").read_text()).group(1)
    assert f"RUN pip install {pinned}" in dockerfile
    entry_points = next(name for name in zipfile.ZipFile(wheel).namelist() if name.endswith("entry_points.txt"))
    assert "sd-assets = sd_assets.cli:main" in zipfile.ZipFile(wheel).read(entry_points).decode()
