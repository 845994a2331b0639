"""The ``generate:`` and ``evaluate:`` sections of the root config (run-time settings, not the protocol).

What makes two runs comparable (prompts, seeds, metrics, face backends, sampling) lives in the protocol file
(:mod:`idforge.evaluate.protocol`); these sections only say where it is and how to run it on this machine.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator

from idforge.config_section import Section
from idforge.diffusion.schedulers import check_scheduler_name


class GenerateConfig(Section):
    protocol: str = Field(default="configs/protocols/default.yaml", description="protocol (prompts, seeds, sampling)")
    batch_size: int = Field(default=4, ge=1, description="images per method.generate call")
    device: Literal["auto", "cpu", "cuda"] = "auto"
    # Optional overrides of the protocol's sampling (they are recorded per image, so runs stay auditable).
    num_inference_steps: int | None = Field(default=None, ge=1)
    guidance_scale: float | None = None
    negative_prompt: str = ""
    scheduler: str | None = Field(default=None, description="sampler: model | ddim | dpm++ | euler | euler_a, or a "
                                  "diffusers scheduler class (e.g. DDIMScheduler); None = the base model's")

    _scheduler_name = field_validator("scheduler")(classmethod(lambda cls, v: check_scheduler_name(v)))
    # A photo-target adapter (prepare.target: photo) draws any of its buckets: set both to one (e.g. 576 x 448) to
    # keep that aspect; None = the protocol's, and a protocol without one = the base model's native square.
    height: int | None = Field(default=None, ge=8, description="image height in pixels; None = the protocol's")
    width: int | None = Field(default=None, ge=8, description="image width in pixels; None = the protocol's")

    @field_validator("height", "width")
    @classmethod
    def _latent_grid(cls, value: int | None, info) -> int | None:
        if value is not None and value % 8:
            raise ValueError(f"generate.{info.field_name} {value} is not a multiple of 8 (the VAE's pixels per latent):"
                             f" use {value // 8 * 8} or {value // 8 * 8 + 8}")
        return value
    # What stands for the identity in the prompt templates' {} (a method with a learned token supplies its own).
    subject: str = "a person"
    class_noun: Literal["person", "man", "woman", "boy", "girl"] = "person"
    # The face model the methods are conditioned on (reference embeddings for IdentityRefs).
    conditioning_backend: Literal["insightface", "opencv"] = "insightface"
    face_model_dir: str | None = Field(default=None, description="face model directory; None = the embedded default")
    # CLIP features of the references, computed as the prepare stage does for training (keep them in step).
    clip_model: str | None = Field(default=None, description="None = model.clip")
    clip_features: Literal["auto", "on", "off"] = "auto"
    clip_crop: Literal["ffhq", "arcface"] = "ffhq"
    clip_hidden_layer: int = -2
    # local: one process, one pipeline. ray: (identity, seeds) work units spread over Ray actors, each loading the
    # pipeline and face/CLIP models once: one actor per GPU of the cluster, or `workers` CPU actors where it has none.
    # Both write the same files (same bytes) and index, and resume the same way (the per-image recipe hash).
    engine: Literal["local", "ray"] = "local"
    workers: int = Field(default=1, ge=1, description="engine=ray without GPUs: CPU actors (and local Ray's CPUs)")
    threads_per_worker: int = Field(default=1, ge=1, description="engine=ray: torch threads per CPU actor")
    ray_address: str | None = Field(default=None, description="engine=ray: the cluster to join (ray://head:10001, "
                                    "auto); None = start a local Ray for this run")


class EvaluateConfig(Section):
    protocol: str = Field(default="configs/protocols/default.yaml", description="protocol file (metrics, backends)")
    batch_size: int = Field(default=8, ge=1, description="images per metric forward pass")
    device: Literal["auto", "cpu", "cuda"] = "auto"
    # Face model the evaluated method was conditioned on; the evaluation's primary backend is a different one.
    conditioning_backend: Literal["insightface", "opencv"] = "insightface"
    # Model directories for the face backends (None = the embedded defaults that registry packages ship).
    insightface_model_dir: str | None = None
    clip_model: str | None = Field(default=None, description="override the protocol's CLIP id or directory")
    lpips_backend: Literal["auto", "lpips", "stlpips"] | None = None
    log_to_mlflow: bool = True
    # Long side of the report's thumbnails (files beside the identity pages; the full images are linked).
    report_thumb_px: int = Field(default=128, ge=16)
    # MLflow's browsable per-image table keeps the `mlflow_table_rows` lowest and highest id_sim rows (half each);
    # the whole table is logged as metrics.parquet beside it. 0 = log no table.
    mlflow_table_rows: int = Field(default=200, ge=0)
    # Per-identity image grids logged to MLflow (identities in sorted order; 0 = none): the report pages hold all.
    mlflow_grids: int = Field(default=20, ge=0)
