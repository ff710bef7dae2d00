"""What the official Dagster Helm chart makes of helm/values.yaml, for the parts a run goes through.

Written from the chart's templates (dagster/dagster, chart version = the pinned Dagster): the
instance's dagster.yaml (``configmap-instance.yaml`` and its helpers for storage, run launcher,
run coordinator, run monitoring and retries, compute logs) and the environment of a code server
(``deployment-user.yaml``: its image, its env, and the container context that
``includeConfigInLaunchedRuns`` hands to the runs it launches). Helm and a cluster are not on this
machine: the tests give what this renders to Dagster's and dagster-k8s's own code, which validate
it and act on it.
"""

from __future__ import annotations

import json
from collections.abc import Mapping

RELEASE = "sd-assets"
NAMESPACE = "sd-assets"


USER_DEPLOYMENTS_CHART = "dagster-user-deployments"


def fullname(chart: str = "dagster") -> str:
    """A chart's ``dagster.fullname`` in the release: its name, with ``-<chart>`` unless it holds it.

    The code servers' objects are the subchart's, named after ``dagster-user-deployments``.
    """
    return RELEASE if chart in RELEASE else f"{RELEASE}-{chart}"


def _dagster_home(values: Mapping) -> str:
    return values.get("global", {}).get("dagsterHome", "/opt/dagster/dagster_home")


def _postgres_secret(values: Mapping) -> str:
    """The Secret with the Postgres password, that every pod of the chart reads."""
    return values.get("global", {}).get("postgresqlSecretName") or f"{fullname()}-postgresql-secret"


def _postgres_config(values: Mapping) -> dict:
    postgresql = values["postgresql"]
    config = {
        "postgres_db": {
            "username": postgresql["postgresqlUsername"],
            "password": {"env": "DAGSTER_PG_PASSWORD"},
            "hostname": postgresql["postgresqlHost"],
            "db_name": postgresql["postgresqlDatabase"],
            "port": postgresql["service"]["port"],
            "params": postgresql.get("postgresqlParams", {}),
        }
    }
    if postgresql.get("postgresqlScheme"):
        config["postgres_db"]["scheme"] = postgresql["postgresqlScheme"]
    return config


_LAUNCHER_LISTS = {"envVars": "env_vars", "volumeMounts": "volume_mounts", "volumes": "volumes"}
_LAUNCHER_OPTIONAL = {
    "kubeconfigFile": "kubeconfig_file",
    "labels": "labels",
    "resources": "resources",
    "schedulerName": "scheduler_name",
    "securityContext": "security_context",
}
_RUN_K8S_CONFIG = {
    "containerConfig": "container_config",
    "podSpecConfig": "pod_spec_config",
    "podTemplateSpecMetadata": "pod_template_spec_metadata",
    "jobSpecConfig": "job_spec_config",
    "jobMetadata": "job_metadata",
}


def _run_launcher(values: Mapping, namespace: str) -> dict:
    k8s = values["runLauncher"]["config"]["k8sRunLauncher"]
    config = {
        "load_incluster_config": k8s["loadInclusterConfig"],
        "job_namespace": k8s.get("jobNamespace") or namespace,
        "image_pull_policy": k8s["imagePullPolicy"],
        "service_account_name": values.get("serviceAccount", {}).get("name") or fullname(),
        "dagster_home": _dagster_home(values),
        "instance_config_map": f"{fullname()}-instance",
        "postgres_password_secret": _postgres_secret(values),
    }
    if "image" in k8s:
        config["job_image"] = f"{k8s['image']['repository']}:{k8s['image']['tag']}"
    for key, name in (("envConfigMaps", "env_config_maps"), ("envSecrets", "env_secrets")):
        if k8s.get(key):
            config[name] = [source["name"] for source in k8s[key]]
    for key, name in {**_LAUNCHER_LISTS, **_LAUNCHER_OPTIONAL}.items():
        if k8s.get(key):
            config[name] = k8s[key]
    if k8s.get("failPodOnRunFailure"):
        config["fail_pod_on_run_failure"] = True
    if k8s.get("runK8sConfig"):
        config["run_k8s_config"] = {
            name: k8s["runK8sConfig"][key] for key, name in _RUN_K8S_CONFIG.items() if key in k8s["runK8sConfig"]
        }
    return {"module": "dagster_k8s", "class": "K8sRunLauncher", "config": config}


def _run_coordinator(queued: Mapping) -> dict:
    config: dict = {"max_concurrent_runs": queued.get("maxConcurrentRuns", -1)}
    if queued.get("tagConcurrencyLimits"):
        config["tag_concurrency_limits"] = queued["tagConcurrencyLimits"]
    if queued.get("dequeueIntervalSeconds"):
        config["dequeue_interval_seconds"] = queued["dequeueIntervalSeconds"]
    # The chart's defaults, when values leave them out.
    config["dequeue_use_threads"] = queued.get("dequeueUseThreads", True)
    config["dequeue_num_workers"] = queued.get("dequeueNumWorkers", 4)
    return {"module": "dagster.core.run_coordinator", "class": "QueuedRunCoordinator", "config": config}


def _compute_logs(values: Mapping) -> dict | None:
    manager = values.get("computeLogManager", {})
    if manager.get("type") != "S3ComputeLogManager":
        return None
    s3 = manager["config"]["s3ComputeLogManager"]
    config = {"bucket": s3["bucket"], "verify": s3.get("verify", True) is not False}
    for key, name in (("prefix", "prefix"), ("endpointUrl", "endpoint_url"), ("region", "region")):
        if s3.get(key):
            config[name] = s3[key]
    return {"module": "dagster_aws.s3.compute_log_manager", "class": "S3ComputeLogManager", "config": config}


def instance_config(values: Mapping, namespace: str = NAMESPACE) -> dict:
    """The instance's dagster.yaml, as the chart's ConfigMap ``<fullname>-instance`` holds it."""
    postgres = _postgres_config(values)
    daemon = values.get("dagsterDaemon", {})
    config: dict = {
        "scheduler": {"module": "dagster.core.scheduler", "class": "DagsterDaemonScheduler"},
        "schedule_storage": {
            "module": "dagster_postgres.schedule_storage", "class": "PostgresScheduleStorage", "config": postgres,
        },
        "run_launcher": _run_launcher(values, namespace),
        "run_storage": {"module": "dagster_postgres.run_storage", "class": "PostgresRunStorage", "config": postgres},
        "event_log_storage": {
            "module": "dagster_postgres.event_log", "class": "PostgresEventLogStorage", "config": postgres,
        },
    }  # fmt: skip
    coordinator = daemon.get("runCoordinator", {})
    if coordinator.get("enabled") and coordinator.get("type") == "QueuedRunCoordinator":
        config["run_coordinator"] = _run_coordinator(coordinator["config"]["queuedRunCoordinator"])
    compute_logs = _compute_logs(values)
    if compute_logs:
        config["compute_logs"] = compute_logs
    monitoring = daemon.get("runMonitoring", {})
    if monitoring.get("enabled"):
        config["run_monitoring"] = {
            "enabled": True,
            "start_timeout_seconds": monitoring.get("startTimeoutSeconds", 300),
            "max_resume_run_attempts": monitoring.get("maxResumeRunAttempts", 0),
            "poll_interval_seconds": monitoring.get("pollIntervalSeconds", 120),
            "free_slots_after_run_end_seconds": monitoring.get("freeSlotsAfterRunEndSeconds", 0),
        }
    retries = daemon.get("runRetries", {})
    if retries.get("enabled"):
        config["run_retries"] = {"enabled": True}
        if retries.get("maxRetries"):
            config["run_retries"]["max_retries"] = retries["maxRetries"]
        if "retryOnAssetOrOpFailure" in retries:
            config["run_retries"]["retry_on_asset_or_op_failure"] = retries["retryOnAssetOrOpFailure"]
    config["telemetry"] = {"enabled": values.get("telemetry", {}).get("enabled", True)}
    return config


def user_deployment(values: Mapping, name: str) -> dict:
    deployments = values["dagster-user-deployments"]["deployments"]
    return next(deployment for deployment in deployments if deployment["name"] == name)


def code_server_image(deployment: Mapping) -> str:
    return f"{deployment['image']['repository']}:{deployment['image']['tag']}"


def launched_run_container_context(values: Mapping, deployment: Mapping, namespace: str = NAMESPACE) -> dict:
    """What ``includeConfigInLaunchedRuns`` gives the code server to hand to each run it launches."""
    k8s: dict = {
        "image_pull_policy": deployment["image"].get("pullPolicy", "Always"),
        "env_config_maps": [
            f"{fullname(USER_DEPLOYMENTS_CHART)}-{deployment['name']}-user-env",
            *(source["name"] for source in deployment.get("envConfigMaps", [])),
        ],
        "namespace": namespace,
        "service_account_name": values.get("global", {}).get("serviceAccountName")
        or f"{fullname(USER_DEPLOYMENTS_CHART)}-user-deployments",
        "run_k8s_config": {"pod_spec_config": {"automount_service_account_token": True}},
    }
    if deployment.get("envSecrets"):
        k8s["env_secrets"] = [source["name"] for source in deployment["envSecrets"]]
    for key, name in (("volumeMounts", "volume_mounts"), ("volumes", "volumes"), ("labels", "labels"),
                      ("resources", "resources")):  # fmt: skip
        if deployment.get(key):
            k8s[name] = deployment[key]
    if isinstance(deployment.get("env"), list) and deployment["env"]:
        k8s["env"] = deployment["env"]
    return {"k8s": k8s}


def code_server_pod_spec(values: Mapping, deployment: Mapping) -> dict:
    """The pod spec of a code server's Deployment (``deployment-user.yaml``), for the parts it runs with."""
    env = [
        {"name": "DAGSTER_CURRENT_IMAGE", "value": code_server_image(deployment)},
        {"name": "DAGSTER_PG_PASSWORD",
         "valueFrom": {"secretKeyRef": {"name": _postgres_secret(values), "key": "postgresql-password"}}},
    ]  # fmt: skip
    # Left out, the setting counts as enabled; turned off, runs get none of the code server's settings.
    if (deployment.get("includeConfigInLaunchedRuns") or {"enabled": True}).get("enabled"):
        env.append({"name": "DAGSTER_CLI_API_GRPC_CONTAINER_CONTEXT",
                    "value": json.dumps(launched_run_container_context(values, deployment))})  # fmt: skip
    if isinstance(deployment.get("env"), list):
        env.extend(deployment["env"])
    env_from = [
        {"configMapRef": {"name": f"{fullname(USER_DEPLOYMENTS_CHART)}-user-deployments-shared-env"}},
        {"configMapRef": {"name": f"{fullname(USER_DEPLOYMENTS_CHART)}-{deployment['name']}-user-env"}},
        *({"configMapRef": {"name": source["name"]}} for source in deployment.get("envConfigMaps", [])),
        *({"secretRef": {"name": source["name"]}} for source in deployment.get("envSecrets", [])),
    ]
    container = {
        "name": USER_DEPLOYMENTS_CHART,
        "image": code_server_image(deployment),
        "args": ["dagster", "api", "grpc", "-h", "0.0.0.0", "-p", str(deployment["port"]),
                 *deployment["dagsterApiGrpcArgs"]],
        "env": env,
        "envFrom": env_from,
        "volumeMounts": deployment.get("volumeMounts", []),
    }  # fmt: skip
    return {"containers": [container], "volumes": deployment.get("volumes", [])}


def chart_config_maps(values: Mapping, deployment: Mapping, namespace: str = NAMESPACE) -> dict[str, dict[str, str]]:
    """The ConfigMaps of environment variables that the chart makes for a code server."""
    env = deployment.get("env")
    return {
        f"{fullname(USER_DEPLOYMENTS_CHART)}-user-deployments-shared-env": {
            "DAGSTER_HOME": _dagster_home(values),
            "DAGSTER_K8S_PIPELINE_RUN_NAMESPACE": namespace,
            "DAGSTER_K8S_PIPELINE_RUN_ENV_CONFIGMAP": f"{fullname(USER_DEPLOYMENTS_CHART)}-pipeline-env",
        },
        # A deployment's env written as a mapping goes here; as a list, on the container.
        f"{fullname(USER_DEPLOYMENTS_CHART)}-{deployment['name']}-user-env": env if isinstance(env, dict) else {},
    }
