"""Inference samplers by name: ``model`` (the base model's own scheduler) | ``ddim`` | ``dpm++`` | ``euler`` |
``euler_a``, each built with diffusers' ``from_config`` from the model's scheduler config, so the noise schedule
(betas, T, prediction type, timestep spacing) stays the model's and only the solver changes.

Training never uses these (``training_scheduler`` is DDPM); papers name their sampler (PIDiff: DDIM 50 steps, ID-EA:
DPM-Solver 50 steps), and the presets set it.
"""

from __future__ import annotations

from typing import Any, Literal, get_args

from idforge.errors import ConfigError

SchedulerName = Literal["model", "ddim", "dpm++", "euler", "euler_a"]  # the names; configs also take None
SCHEDULER_NAMES: tuple[str, ...] = get_args(SchedulerName)

# name -> diffusers class (``dpm++`` = DPMSolverMultistepScheduler, whose default algorithm is dpmsolver++)
_CLASSES = {
    "ddim": "DDIMScheduler",
    "dpm++": "DPMSolverMultistepScheduler",
    "euler": "EulerDiscreteScheduler",
    "euler_a": "EulerAncestralDiscreteScheduler",
}

__all__ = ["SCHEDULER_NAMES", "SchedulerName", "check_scheduler_name", "make_scheduler"]


def check_scheduler_name(name: str | None) -> str | None:
    """``name`` if it is a sampler name, None (the model's own) or a diffusers scheduler class name (e.g.
    ``DDIMScheduler``, kept for configs that name the class); else ``ValueError`` listing the choices."""
    if name is None or name in SCHEDULER_NAMES or (name.endswith("Scheduler") and name.isidentifier()):
        return name
    raise ValueError(f"unknown scheduler {name!r}; choices: {', '.join(SCHEDULER_NAMES)} "
                     "(or a diffusers scheduler class name such as DDIMScheduler)")


def make_scheduler(name: str | None, model_scheduler: Any) -> Any:
    """A fresh inference scheduler ``name`` (see ``check_scheduler_name``) with ``model_scheduler``'s config.

    Raises:
        ConfigError: unknown name (the message lists the choices).
    """
    import diffusers

    try:
        check_scheduler_name(name)
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    if name in (None, "model"):
        return type(model_scheduler).from_config(model_scheduler.config)
    cls = getattr(diffusers, _CLASSES.get(name, name), None)
    if cls is None:
        raise ConfigError(f"unknown scheduler {name!r}: not a diffusers scheduler class; choices: "
                          f"{', '.join(SCHEDULER_NAMES)}")
    return cls.from_config(model_scheduler.config)
