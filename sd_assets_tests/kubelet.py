"""The tests' stand-in for a kubelet: a pod spec's one container run as a process on this machine,
its Secrets and ConfigMaps as local values and its volumes as local folders."""

from __future__ import annotations

import subprocess
from collections.abc import Mapping
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path, PurePosixPath


@dataclass
class Pod:
    """A stand-in kubelet for a pod spec: its one container as a process on this machine.

    Secrets and ConfigMaps are looked up by name in ``secrets`` and ``config_maps`` (a name not
    there fails, as the pod would stay in CreateContainerConfigError); each volume is a folder
    under ``root`` (a ConfigMap volume holds its keys as files), but a hostPath is under
    ``node``, shared by the pods of that node; a path the container would see under a mount or
    in ``image_paths`` is rewritten to the local folder in its env.
    """

    spec: Mapping
    root: Path
    node: Path
    secrets: Mapping[str, Mapping[str, str]]
    config_maps: Mapping[str, Mapping[str, str]]
    image_paths: Mapping[str, Path] = field(default_factory=dict)

    @property
    def container(self) -> Mapping:
        (container,) = self.spec["containers"]
        return container

    def _lookup(self, kind: str, name: str) -> Mapping[str, str]:
        sources = self.secrets if kind == "secret" else self.config_maps
        if name not in sources:
            raise AssertionError(f"the pod needs {kind} {name!r}, which nothing creates")
        return sources[name]

    def volume_folders(self) -> dict[str, Path]:
        folders = {}
        for volume in self.spec.get("volumes") or []:
            if volume.get("hostPath"):
                folder = self.node / volume["hostPath"]["path"].lstrip("/")
            elif volume.get("configMap") or "emptyDir" in volume:
                folder = self.root / "volumes" / volume["name"]
            else:
                raise AssertionError(f"volume {volume['name']!r}: a kind this stand-in does not have")
            folder.mkdir(parents=True, exist_ok=True)
            if volume.get("configMap"):
                for key, text in self._lookup("configmap", volume["configMap"]["name"]).items():
                    (folder / key).write_text(text)
            folders[volume["name"]] = folder
        return folders

    @cached_property
    def mounts(self) -> dict[str, Path]:
        """Each path the container sees a volume at, and the local folder it is here."""
        folders = self.volume_folders()
        return {
            mount["mountPath"]: folders[mount["name"]] for mount in self.container.get("volumeMounts") or []
        } | dict(self.image_paths)

    def local_path(self, path: str) -> str:
        for seen, local in sorted(self.mounts.items(), key=lambda item: -len(item[0])):
            if path == seen or path.startswith(seen.rstrip("/") + "/"):
                return str(local / PurePosixPath(path).relative_to(seen))
        return path

    def _local_value(self, name: str, value: str) -> str:
        local = self.local_path(value)
        if value.startswith("/") and local == value:
            # It would be written inside the container, and lost with the pod.
            raise AssertionError(f"{name}={value} is on none of the pod's volumes")
        return local

    def environment(self) -> dict[str, str]:
        env: dict[str, str] = {}
        for source in self.container.get("envFrom") or []:
            if "secretRef" in source:
                found = self._lookup("secret", source["secretRef"]["name"])
            else:
                found = self._lookup("configmap", source["configMapRef"]["name"])
            env.update({name: self._local_value(name, value) for name, value in found.items()})
        for variable in self.container.get("env") or []:
            if "value" in variable:
                env[variable["name"]] = self._local_value(variable["name"], variable["value"])
            else:
                ref = variable["valueFrom"]["secretKeyRef"]
                env[variable["name"]] = self._lookup("secret", ref["name"])[ref["key"]]
        return env

    def command(self) -> list[str]:
        return [*(self.container.get("command") or []), *(self.container.get("args") or [])]

    def run(self, base_env: Mapping[str, str], timeout: float) -> subprocess.CompletedProcess:
        """Runs the container to its end; ``base_env`` stands for the image's own environment."""
        return subprocess.run(
            self.command(), env={**base_env, **self.environment()}, capture_output=True, text=True,
            timeout=timeout, cwd=self.root,
        )  # fmt: skip

    def start(self, base_env: Mapping[str, str], log: Path) -> subprocess.Popen:
        """Starts a container that serves (a code server), its output in ``log``."""
        with open(log, "wb") as output:
            return subprocess.Popen(
                self.command(), env={**base_env, **self.environment()}, stdout=output, stderr=subprocess.STDOUT,
                cwd=self.root,
            )  # fmt: skip
