"""How to reach the Hugging Face hub, as plain settings.

Apart from ``hub`` so that a run whose model needs no hub (the offline ``tiny-random``) does not
load the hub client: ``huggingface_hub`` is imported only when a setting is read.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class HubSettings:
    """How to reach the hub: a token for gated repos, offline mode, and the HF cache folder.

    ``cache_dir`` None means huggingface_hub's default (``HF_HUB_CACHE``, else ``$HF_HOME/hub``).
    """

    token: str | None = None
    offline: bool = False
    cache_dir: str | None = None
    endpoint: str | None = None

    @property
    def is_offline(self) -> bool:
        """Offline when asked here, or when the process started with HF_HUB_OFFLINE=1."""
        from huggingface_hub import constants

        return self.offline or constants.is_offline_mode()

    def cache_folder(self) -> Path:
        from huggingface_hub import constants

        return Path(self.cache_dir or constants.HF_HUB_CACHE).expanduser()
