"""What the model libraries print that a user of sd-assets has nothing to do about.

transformers warns, once a process, that its torchvision image processors fall back to their
PIL twins when torchvision is not installed, and advises installing it. The pipelines use those
processors only for the optional safety checker, where the PIL one does the same work, and
torchvision on a CPU machine would pull a CUDA build of gigabytes. ``quiet()`` drops just that
message; every other warning of the libraries still shows.
"""

from __future__ import annotations

import logging

_FALLBACK_MESSAGE = "requires torchvision (not installed); falling back to"
_LOGGER = "transformers.utils.import_utils"


def _not_the_torchvision_fallback(record: logging.LogRecord) -> bool:
    return _FALLBACK_MESSAGE not in record.getMessage()


def quiet() -> None:
    """Drop the torchvision fallback warning; call before diffusers' pipelines are imported."""
    logger = logging.getLogger(_LOGGER)
    if _not_the_torchvision_fallback not in logger.filters:
        logger.addFilter(_not_the_torchvision_fallback)
