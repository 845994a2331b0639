"""Config of ``idforge finetune``: per-identity training of a per-identity method (one identity = one task)."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, field_validator

from idforge.config_section import Section
from idforge.diffusion.schedulers import check_scheduler_name


class FinetuneConfig(Section):
    """Per-identity loop settings. ``None`` recipe fields mean "the method's paper default" (its ``train`` recipe).

    ``method_config`` is the method's own typed config (validated by the method: unknown keys fail there).
    """

    method_config: dict[str, Any] = Field(default_factory=dict, description="the method's config (see its Config)")
    steps: int | None = Field(default=None, ge=1)
    batch_size: int | None = Field(default=None, ge=1)
    lr: float | None = Field(default=None, gt=0)
    scale_lr: bool | None = None
    weight_decay: float | None = Field(default=None, ge=0)
    max_images: int | None = Field(default=None, ge=1, description="use at most this many images per identity")
    resolution: int | None = Field(default=None, ge=8, description="training image size; None = the model's native")
    class_noun: str = Field(default="person", description="word for the person in prompts (man, woman, person...)")
    seed: int = 0
    device: Literal["auto", "cpu", "cuda"] = "auto"
    dtype: Literal["float32", "float16", "bfloat16"] = Field(
        default="float32", description="frozen model weights; trained weights stay float32 (autocast compute)")
    log_every: int = Field(default=10, ge=1, description="MLflow loss logging interval in steps")
    sample_prompts: list[str] | None = Field(default=None, description="None = the method's sample prompt")
    sample_seeds: list[int] = Field(default_factory=lambda: [0, 1])
    sample_steps: int = Field(default=20, ge=1, description="denoising steps of the images logged at the end")
    sample_scheduler: str | None = Field(default=None, description="sampler of those images (as generate.scheduler)")

    _scheduler_name = field_validator("sample_scheduler")(classmethod(lambda cls, v: check_scheduler_name(v)))
    num_threads: int | None = Field(default=None, ge=1, description="torch CPU threads per task; None = torch's")
    # fan-out
    gpus_per_task: float | None = Field(default=None, ge=0, description="Ray GPUs per identity; None = 1 if CUDA")
    cpus_per_task: float = Field(default=1, gt=0)
    workers: int | None = Field(default=None, ge=1, description=(
        "long-lived fan-out workers, each loading the base once; None = one per GPU of the Ray cluster "
        "(at gpus_per_task), or on CPU as many as its CPUs hold at cpus_per_task"))
    ray_address: str | None = Field(default=None, description="None = start/join a local Ray instance")
    force: bool = Field(default=False, description="re-train identities that already have a DONE artifact")
