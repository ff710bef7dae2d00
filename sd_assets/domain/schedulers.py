"""The names people give Stable Diffusion's schedulers, and diffusers' classes behind them.

Owns the table between diffusers' scheduler classes and the sampler names the AUTOMATIC1111 web
UI shows (a PNG's ``parameters`` chunk writes them; a grid's ``inference.scheduler`` written that
way is answered with the class). Plain strings only: nothing here imports diffusers.
"""

from __future__ import annotations

import re

# Names the web UI shows for diffusers' schedulers; others are shown by class name.
SAMPLER_NAMES = {
    "PNDMScheduler": "PLMS",
    "DDIMScheduler": "DDIM",
    "DDPMScheduler": "DDPM",
    "LMSDiscreteScheduler": "LMS",
    "EulerDiscreteScheduler": "Euler",
    "EulerAncestralDiscreteScheduler": "Euler a",
    "HeunDiscreteScheduler": "Heun",
    "KDPM2DiscreteScheduler": "DPM2",
    "KDPM2AncestralDiscreteScheduler": "DPM2 a",
    "DPMSolverMultistepScheduler": "DPM++ 2M",
    "DPMSolverSinglestepScheduler": "DPM++ SDE",
    "UniPCMultistepScheduler": "UniPC",
    "LCMScheduler": "LCM",
}
USUAL_SCHEDULERS = "PNDMScheduler, DDIMScheduler, EulerDiscreteScheduler and DPMSolverMultistepScheduler"

_CLASSES_BY_SAMPLER = {sampler.casefold(): class_name for class_name, sampler in SAMPLER_NAMES.items()}


def _spelling(name: str) -> str:
    """``name`` as the table spells it: 'euler_a' and 'Euler-A' are 'euler a'."""
    return " ".join(re.split(r"[\s_-]+", name.strip())).casefold()


def web_ui_name(name: str) -> str | None:
    """Said of a grid's scheduler ``name`` that is the web UI's sampler name ('Euler a',
    'euler_a', 'DPM++ 2M Karras'): which class to write instead. None for any other name."""
    spelt = _spelling(name)
    class_name = _CLASSES_BY_SAMPLER.get(spelt.removesuffix(" karras"))
    if class_name is None:
        return None
    left_out = " (without Karras sigmas, which the grid has no setting for)" if spelt.endswith(" karras") else ""
    return f"the web UI's name; diffusers' class is {class_name}{left_out}"


def class_spelt_otherwise(name: str) -> str | None:
    """The table's class that ``name`` spells another way ('EulerDiscrete', 'eulerdiscretescheduler',
    'Euler_Discrete'); None for any other name."""
    spelt = _spelling(name).replace(" ", "").removesuffix("scheduler") + "scheduler"
    return next((class_name for class_name in SAMPLER_NAMES if class_name.casefold() == spelt), None)
