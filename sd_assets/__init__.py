"""sd-assets: Stable Diffusion image grids as Dagster assets.

``dagster ... -m sd_assets`` loads ``defs`` from here; see ``sd_assets.definitions``.
"""

from sd_assets.definitions import build_definitions

defs = build_definitions()
