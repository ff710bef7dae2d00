"""sd-assets: Stable Diffusion image grids as Dagster assets.

``dagster ... -m sd_assets`` finds ``defs`` here (see ``sd_assets.definitions``). It is built on
first access, so domain code imports without Dagster, and the CLI without a grid file.
"""

from functools import cache


@cache
def _definitions():
    from sd_assets.definitions import load_definitions

    return load_definitions()


def __getattr__(name: str):
    if name == "defs":
        return _definitions()
    raise AttributeError(f"module 'sd_assets' has no attribute {name!r}")


def __dir__() -> list[str]:
    return [*globals(), "defs"]
