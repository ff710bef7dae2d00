"""Resources: the only way assets touch the outside world (grid file, artifact store, GPU)."""


from pathlib import Path

import dagster as dg

from sd_assets.domain.grid import GridConfig, load_grid
from sd_assets.domain.store import ArtifactStore, open_store


class GridResource(dg.ConfigurableResource):
    """The grid file that says what to generate."""

    path: str

    def load(self) -> GridConfig:
        return load_grid(self.path)


class ArtifactStoreResource(dg.ConfigurableResource):
    """Where images, galleries, catalogs and model weights live: a folder or s3://bucket/prefix."""

    url: str

    def open(self) -> ArtifactStore:
        return open_store(self.url)


class GeneratorResource(dg.ConfigurableResource):
    """How this node runs Stable Diffusion: which device, where the node-local model copy goes."""

    device: str = "auto"
    model_cache_dir: str = str(Path.home() / ".cache" / "sd-assets" / "models")
    writer_threads: int = 4
    max_pending_images: int = 64

    @property
    def batch_memory_file(self) -> Path:
        return Path(self.model_cache_dir).expanduser() / "auto-batch-sizes.json"
