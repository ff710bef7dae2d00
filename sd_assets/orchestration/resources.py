"""Resources: the only way assets touch the outside world (grid file, artifact store, Hugging Face hub, GPU)."""

import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import dagster as dg

from sd_assets.domain import devices, engine, node_locks
from sd_assets.domain.errors import SdAssetsError
from sd_assets.domain.grid import GridConfig, load_grid
from sd_assets.domain.hub_settings import HubSettings
from sd_assets.domain.store import ArtifactStore, open_store


class GridResource(dg.ConfigurableResource):
    """The grid file that says what to generate."""

    path: str

    def load(self) -> GridConfig:
        return load_grid(self.path)


class ArtifactStoreResource(dg.ConfigurableResource):
    """Where images, galleries, catalogs and model weights live: a folder or s3://bucket/prefix.

    For an s3:// URL this class uses boto3's default client; ``S3ArtifactStoreResource`` (in
    ``s3_resources``, which the definitions pick for s3:// storage) configures it through
    dagster-aws. Either way boto3 reads the credentials from the standard AWS environment
    variables (or a profile or instance role), never from the grid file.
    """

    url: str

    def open(self) -> ArtifactStore:
        return open_store(self.url)


class HubResource(dg.ConfigurableResource):
    """How ``model_weights`` reaches the Hugging Face hub.

    ``token`` is meant to be ``dg.EnvVar("HF_TOKEN")`` (gated repos); ``cache_dir`` None means
    huggingface_hub's default cache (``HF_HUB_CACHE``, else ``$HF_HOME/hub``).
    """

    token: str | None = None
    offline: bool = False
    cache_dir: str | None = None
    endpoint: str | None = None

    def settings(self) -> HubSettings:
        return HubSettings(token=self.token, offline=self.offline, cache_dir=self.cache_dir, endpoint=self.endpoint)


class GeneratorResource(dg.ConfigurableResource):
    """How this node runs Stable Diffusion: which device, where the node-local model copy goes.

    ``device_count``: devices that runs on this node share, one run per device at a time
    (default: the visible CUDA GPUs when ``device`` is 'auto' or 'cuda'; none on CPU). Set it
    on a CPU-only node to cap how many runs generate at once. An explicit 'cuda:<i>' claims nothing.
    ``device_lock_dir``: the node-local folder of the device claims and of the locks that keep
    two runs from doing the same work at once (``domain.node_locks``).
    """

    device: str = "auto"
    model_cache_dir: str = str(Path.home() / ".cache" / "sd-assets" / "models")
    writer_threads: int = 4
    max_pending_images: int = 64
    device_count: int | None = None
    device_lock_dir: str = str(Path(tempfile.gettempdir()) / "sd-assets-device-locks")
    device_wait_seconds: float = 600.0

    @property
    def batch_memory_file(self) -> Path:
        return Path(self.model_cache_dir).expanduser() / "auto-batch-sizes.json"

    @contextmanager
    def exclusive(self, kind: str, *identity: str, on_wait: Callable[[str], None] | None = None) -> Iterator[None]:
        """No other process on this node does the work ``kind`` + ``identity`` during the ``with`` block.

        A second run asking for the same work waits (``on_wait`` says for whom) and then finds
        it done; a holder that dies releases it.
        """
        with node_locks.hold_lock(Path(self.device_lock_dir), node_locks.work_lock_name(kind, *identity), on_wait):
            yield

    @contextmanager
    def claim_device(self) -> Iterator[tuple[str, int | None]]:
        """(torch device, claimed index or None) for the ``with`` block; see ``domain.devices``."""
        try:
            device = engine.pick_device(self.device)
        except SdAssetsError as exc:  # the setting to change, as device_count's error names its own
            setting = "set the generator's device (SD_ASSETS_DEVICE) to auto, which takes a GPU if one is seen, or cpu"
            raise SdAssetsError(f"{exc}; {setting}") from None
        count = self.device_count
        if device == "cuda":
            visible = engine.cuda_device_count()
            count = visible if count is None else count
            if count > visible:
                raise SdAssetsError(
                    f"device_count (SD_ASSETS_DEVICE_COUNT) is {count}, but this process sees {visible} CUDA GPUs; "
                    f"set it to {visible} or less"
                )
        if count is None or device.startswith("cuda:"):
            yield device, None
            return
        with devices.claim_device(Path(self.device_lock_dir), count, self.device_wait_seconds) as claim:
            yield devices.device_for_index(device, claim.index), claim.index
