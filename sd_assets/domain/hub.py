"""Stable Diffusion weights from the Hugging Face hub, through ``huggingface_hub``.

Owns resolving a revision name to the commit sha it points to, choosing only the files a
``StableDiffusionPipeline`` needs (preferring the fp16 safetensors variant when the repo has
one), downloading them into the Hugging Face cache (``HF_HOME`` / ``HF_HUB_CACHE``, offline
with ``HF_HUB_OFFLINE=1``), and turning the hub's errors into ``ModelError`` messages that say
which setting to change.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

import httpx2
from huggingface_hub import HfApi, snapshot_download
from huggingface_hub.errors import (
    GatedRepoError,
    HfHubHTTPError,
    LocalEntryNotFoundError,
    RepositoryNotFoundError,
    RevisionNotFoundError,
    RevisionResolutionError,
)
from huggingface_hub.file_download import repo_folder_name

from sd_assets.domain.errors import ModelError
from sd_assets.domain.hub_settings import HubSettings

# The pipeline's parts, in the folders diffusers gives them; the safety checker only when asked.
WEIGHT_COMPONENTS = ("unet", "vae", "text_encoder")
CONFIG_COMPONENTS = ("scheduler", "tokenizer")
FP16 = "fp16"


@contextlib.contextmanager
def _hub_errors(repo_id: str, revision: str, settings: HubSettings) -> Iterator[None]:
    """Turn huggingface_hub's exceptions into one ModelError that names the fix."""
    where = f"model {repo_id}@{revision}"
    try:
        yield
    except GatedRepoError:
        if settings.token:
            raise ModelError(
                f"{where} is gated and the HF_TOKEN given has no access: accept its licence at "
                f"https://huggingface.co/{repo_id} with the account the token belongs to"
            ) from None
        raise ModelError(
            f"{where} is gated: accept its licence at https://huggingface.co/{repo_id} and set HF_TOKEN "
            "to an access token of that account"
        ) from None
    except RepositoryNotFoundError:
        raise ModelError(
            f"{where}: no such model repo on the Hugging Face hub; check model.id in the grid "
            "(a private repo also needs HF_TOKEN)"
        ) from None
    except RevisionNotFoundError:
        raise ModelError(
            f"{where}: the repo has no revision {revision!r}; set model.revision to a branch, tag or commit sha"
        ) from None
    except (RevisionResolutionError, LocalEntryNotFoundError, httpx2.TransportError) as exc:
        cache = settings.cache_folder()
        if settings.is_offline:
            raise ModelError(
                f"{where} is not (completely) in the Hugging Face cache {cache} and HF_HUB_OFFLINE=1 forbids "
                f"downloading it: fill the cache on a machine with network (`hf download {repo_id} "
                f"--revision {revision}`) and point HF_HOME or HF_HUB_CACHE at it, or set model.revision "
                "to a commit sha whose weights the store already holds"
            ) from None
        raise ModelError(
            f"{where}: cannot reach the Hugging Face hub ({type(exc).__name__}). To work offline, set "
            "HF_HUB_OFFLINE=1 with the model in the Hugging Face cache (HF_HOME or HF_HUB_CACHE), or set "
            "model.revision to a commit sha whose weights the store already holds"
        ) from None
    except HfHubHTTPError as exc:
        raise ModelError(f"{where}: the Hugging Face hub answered an error: {exc}") from None


def _api(settings: HubSettings) -> HfApi:
    return HfApi(endpoint=settings.endpoint, token=settings.token)


def resolve_commit(repo_id: str, revision: str, settings: HubSettings) -> str:
    """The 40-hex commit sha that ``revision`` (branch, tag or sha) names in ``repo_id`` now.

    Offline, or when the hub cannot be reached, the answer comes from the cache's ``refs/``.
    """
    with _hub_errors(repo_id, revision, settings):
        resolved = _api(settings).resolve_revision(
            repo_id,
            revision=revision,
            cache_dir=settings.cache_dir,
            local_files_only=settings.is_offline,
            token=settings.token,
        )
    return resolved.resolved


def _snapshot_folder(repo_id: str, sha: str, settings: HubSettings) -> Path:
    return settings.cache_folder() / repo_folder_name(repo_id=repo_id, repo_type="model") / "snapshots" / sha


def list_files(repo_id: str, sha: str, settings: HubSettings) -> list[str]:
    """Every file of the repo at ``sha``: from the hub, or offline from the cached snapshot."""
    if settings.is_offline:
        folder = _snapshot_folder(repo_id, sha, settings)
        if not folder.is_dir():
            with _hub_errors(repo_id, sha, settings):
                raise LocalEntryNotFoundError(str(folder))
        return sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file())
    with _hub_errors(repo_id, sha, settings):
        return sorted(_api(settings).list_repo_files(repo_id, revision=sha, token=settings.token))


def _weights_variant(name: str) -> str | None:
    """The variant a weights file belongs to ('fp16', 'non_ema', ...); None for the plain weights."""
    # diffusers names variants 'model.fp16.safetensors', 'model-00001-of-00002.fp16.safetensors'
    # and 'model.safetensors.index.fp16.json'; a repo may also hold training-only variants such
    # as 'diffusion_pytorch_model.non_ema.safetensors', which inference never loads.
    parts = [p for p in PurePosixPath(name).name.split(".")[1:] if p not in ("safetensors", "bin", "index", "json")]
    return ".".join(parts) or None


def _is_weights(name: str) -> bool:
    base = PurePosixPath(name).name
    return base.endswith((".safetensors", ".bin")) or ".safetensors.index." in base or ".bin.index." in base


def _component_weights(files: list[str], variant: str | None) -> list[str]:
    """The weights of one component in ``variant`` (None: plain), safetensors over .bin."""
    chosen = [f for f in files if _is_weights(f) and _weights_variant(f) == variant]
    safetensors = [f for f in chosen if ".safetensors" in PurePosixPath(f).name]
    return safetensors or chosen


@dataclass(frozen=True)
class FileSelection:
    """The files a pipeline needs, and the weights variant they use (None: plain weights)."""

    paths: tuple[str, ...]
    variant: str | None


def select_pipeline_files(
    repo_id: str, files: Iterable[str], variant: str = "auto", safety_checker: bool = False
) -> FileSelection:
    """Pick model_index.json, the configs and tokenizer, and one set of weights per component.

    ``variant``: 'fp16' needs fp16 weights for every component; 'auto' uses them when every
    component has them, else the plain weights (but the fp16 ones of a component that has no
    others: the pipeline then loads with the fp16 variant, plain weights where a part lacks
    fp16); 'none' always the plain weights.
    """
    files = sorted(files)
    if "model_index.json" not in files:
        raise ModelError(f"model {repo_id}: no model_index.json; not a diffusers Stable Diffusion repo")
    weight_components = WEIGHT_COMPONENTS + (("safety_checker",) if safety_checker else ())
    config_components = CONFIG_COMPONENTS + (("feature_extractor",) if safety_checker else ())
    by_component = {c: [f for f in files if f.startswith(f"{c}/")] for c in weight_components + config_components}
    missing = [
        c for c in weight_components
        if not _component_weights(by_component[c], None) and not _component_weights(by_component[c], FP16)
    ]
    if missing:
        raise ModelError(f"model {repo_id}: no weights for {', '.join(missing)}; not a Stable Diffusion repo")
    has_fp16 = all(_component_weights(by_component[c], FP16) for c in weight_components)
    if variant == FP16 and not has_fp16:
        raise ModelError(
            f"model {repo_id} has no fp16 weights for every component; set model.variant to 'auto' or 'none'"
        )
    fp16_only = [c for c in weight_components if not _component_weights(by_component[c], None)]
    if variant == "none" and fp16_only:
        raise ModelError(
            f"model {repo_id}: no plain weights for {', '.join(fp16_only)}; set model.variant to 'auto' or 'fp16'"
        )
    # diffusers, asked for the fp16 variant, loads each part's fp16 weights where it has them and its
    # plain ones elsewhere: 'auto' asks for it when a part has nothing else, too.
    use_fp16 = variant != "none" and (has_fp16 or bool(fp16_only))
    paths = ["model_index.json"]
    for component in config_components:
        paths += [f for f in by_component[component] if not _is_weights(f)]
    for component in weight_components:
        paths += [f for f in by_component[component] if f.endswith("config.json")]
        fp16_weights = _component_weights(by_component[component], FP16) if use_fp16 else []
        paths += fp16_weights or _component_weights(by_component[component], None)
    return FileSelection(tuple(sorted(set(paths))), FP16 if use_fp16 else None)


def _blob_sizes(repo_id: str, settings: HubSettings) -> dict[str, int]:
    blobs = settings.cache_folder() / repo_folder_name(repo_id=repo_id, repo_type="model") / "blobs"
    return {p.name: p.stat().st_size for p in blobs.iterdir() if p.is_file()} if blobs.is_dir() else {}


@dataclass(frozen=True)
class HubDownload:
    """What ``download_pipeline`` put in the folder, and the bytes that came over the network."""

    selection: FileSelection
    bytes_downloaded: int


def download_pipeline(
    repo_id: str,
    sha: str,
    settings: HubSettings,
    folder: Path,
    variant: str = "auto",
    safety_checker: bool = False,
) -> HubDownload:
    """Download (or find in the HF cache) the pipeline's files at ``sha`` and link them into ``folder``.

    ``folder`` ends up holding exactly the selected files, as symlinks into the HF cache.
    """
    selection = select_pipeline_files(repo_id, list_files(repo_id, sha, settings), variant, safety_checker)
    before = _blob_sizes(repo_id, settings)
    with _hub_errors(repo_id, sha, settings):
        snapshot = Path(
            snapshot_download(
                repo_id,
                revision=sha,
                allow_patterns=list(selection.paths),
                cache_dir=settings.cache_dir,
                local_files_only=settings.is_offline,
                token=settings.token,
                endpoint=settings.endpoint,
            )
        )
    after = _blob_sizes(repo_id, settings)
    downloaded = sum(size for name, size in after.items() if before.get(name) != size)
    for path in selection.paths:
        source = snapshot / path
        if not source.is_file():
            raise ModelError(
                f"model {repo_id}@{sha}: {path} is missing from the Hugging Face cache {snapshot}; "
                "delete that snapshot folder and download again"
            )
        target = folder / path
        target.parent.mkdir(parents=True, exist_ok=True)
        os.symlink(source.resolve(), target)
    return HubDownload(selection, downloaded)
