"""Settings of the ``prepare`` stage and of the population training loop (``prepare:`` and ``train:`` sections).

Import-light (pydantic only) so loading a config never pulls in torch or Ray.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, field_validator, model_validator

from idforge.config_section import Section

DEFAULT_CAPTION_TEMPLATES = [
    "a photo of a {class_noun}",
    "a close-up photo of a {class_noun}",
    "a portrait photo of a {class_noun}",
    "a photo of the face of a {class_noun}",
]


class PrepareConfig(Section):
    """What ``idforge prepare`` caches from a curated dataset (see ``idforge.train.prepare``)."""

    caption_templates: list[str] = Field(
        default_factory=lambda: list(DEFAULT_CAPTION_TEMPLATES),
        description="captions of the training images; {class_noun} is replaced by the identity's class noun",
    )
    class_noun: str = Field(
        default="person", description="class noun of identities whose identities.parquet row names none"
    )
    resolution: int | None = Field(
        default=None, ge=8, description="training image side in pixels; None = the base model's native size"
    )
    flip: bool = Field(default=True, description="also cache the latents of the horizontally flipped image")
    image_source: Literal["aligned", "matted"] = Field(
        default="aligned", description="encode the FFHQ-aligned 512 crop as is, or its matted version when present"
    )
    clip_crop: Literal["ffhq", "arcface"] = Field(
        default="ffhq", description="which aligned crop CLIP sees: the 512 FFHQ-style crop or the 112 ArcFace crop"
    )
    clip_hidden_layer: int = Field(default=-2, description="CLIP vision hidden state kept as patch tokens")
    storage_dtype: Literal["float16", "float32"] = Field(
        default="float16", description="dtype of cached float tensors on disk (the dataset returns float32)"
    )
    batch_size: int = Field(default=8, ge=1, description="images per VAE/CLIP forward pass")
    prune: bool = Field(default=True, description="delete cached items no longer in the dataset")
    # engine=ray (idforge.train.prepare_ray): Ray Data actors encode, items are written as shards of many items
    engine: Literal["local", "ray"] = Field(
        default="local", description="local: one process, one file per item; ray: Ray Data encoder actors writing "
        "shards of shard_items items (local or s3:// output)")
    ray_address: str | None = Field(
        default=None, description="engine=ray: the cluster to join (ray://head:10001, auto); None = a local Ray")
    workers: int = Field(default=1, ge=1, description="engine=ray: encoder actors (one GPU each where CUDA is used)")
    shard_items: int = Field(default=256, ge=1, description="engine=ray: items per shard file")
    # What the denoising target is. "aligned": the FFHQ-aligned face crop, square at ``resolution``. "photo": the
    # original photo around the face (both papers train on photos of people in context: IDAdapter on MM-CelebA-HQ,
    # Infinite-ID on LAION-Face-style web photos), resized into an aspect-ratio bucket of about ``resolution``^2
    # pixels. The references (CLIP/ArcFace inputs) are the aligned crops in both cases.
    target: Literal["aligned", "photo"] = Field(
        default="aligned", description="denoising target: the aligned face crop, or the photo around the face")
    # 2.5 x the detector's face box (which spans brow to chin) frames head, hair and shoulders with the face at
    # about 40 % of the side, close to FFHQ's framing (face ~ 1/3 to 1/2 of the crop) yet with real background;
    # much larger factors shrink the face below what a 512 px target can draw with identity detail.
    context_factor: float = Field(
        default=2.5, ge=1.0, le=10.0, description="photo target: the face box enlarged by this (clamped to the image)")
    bucket_step: int = Field(
        default=64, ge=8, description="photo target: bucket sides are multiples of this (64: SD/SDXL latents stay "
        "divisible by 8 through the UNet's downsampling)")
    bucket_aspect_range: tuple[float, float] = Field(
        default=(0.5, 2.0), description="photo target: smallest and largest bucket width/height")
    bucket_area_tolerance: float = Field(
        default=0.1, gt=0, lt=1, description="photo target: bucket area within this fraction of resolution^2")

    @field_validator("caption_templates")
    @classmethod
    def _templates_have_noun(cls, value: list[str]) -> list[str]:
        if not value:
            raise ValueError("at least one caption template is needed")
        bad = [t for t in value if t.count("{class_noun}") != 1]
        if bad:
            raise ValueError(f"each caption template needs exactly one '{{class_noun}}': {bad}")
        return value

    @field_validator("bucket_aspect_range")
    @classmethod
    def _aspect_range_ordered(cls, value: tuple[float, float]) -> tuple[float, float]:
        lo, hi = value
        if not 0 < lo <= 1 <= hi:
            raise ValueError(f"bucket_aspect_range must satisfy 0 < min <= 1 <= max (width/height), got {value}")
        return value

    @model_validator(mode="after")
    def _photo_has_no_matte(self) -> PrepareConfig:
        if self.target == "photo" and self.image_source == "matted":
            raise ValueError("prepare.image_source 'matted' exists only for the aligned crop: with target 'photo' "
                             "set image_source 'aligned' (or target 'aligned' to train on matted crops)")
        # The Ray engine's shards and index do not carry the photo target's buckets yet (bucket_h/bucket_w, the
        # kept photo in the stored input hash): refused rather than written without them.
        if self.target == "photo" and self.engine == "ray":
            raise ValueError("prepare.target 'photo' runs on prepare.engine 'local' only for now: set engine 'local' "
                             "(or target 'aligned' to prepare on Ray)")
        return self

    def item_params(self) -> dict[str, Any]:
        """The settings that change a cached image item (captions do not: they are cached separately)."""
        params = self.model_dump(include={"resolution", "flip", "image_source", "clip_crop", "clip_hidden_layer",
                                          "storage_dtype"})
        if self.target == "photo":  # the aligned target's keys stay what they were before the photo target
            params.update(self.model_dump(include={"target", "context_factor", "bucket_step", "bucket_aspect_range",
                                                   "bucket_area_tolerance"}, mode="json"))
        return params


class TrainConfig(Section):
    """Population training (IDAdapter, Infinite-ID) with Ray Train; see ``idforge.train.population``."""

    method: str = Field(default="infinite-id", description="method name (idforge.methods.available_methods())")
    method_config: dict[str, Any] = Field(default_factory=dict, description="the method's own typed config")
    init_from: str | None = Field(
        default=None, description="method.safetensors to start from (fine-tune/retrain); ignored when resuming"
    )
    # optimisation
    optimizer: Literal["adamw", "adamw_fused", "adamw_8bit"] = Field(
        default="adamw", description="AdamW as torch's multi-tensor kernel, one fused kernel, or bitsandbytes' 8-bit "
        "state (CUDA); Adam = AdamW with weight_decay 0")
    lr: float = Field(default=1e-4, gt=0)
    weight_decay: float = Field(default=0.01, ge=0)
    adam_betas: tuple[float, float] = (0.9, 0.999)
    adam_eps: float = 1e-8
    warmup_steps: int = Field(default=0, ge=0, description="linear learning-rate warm-up, in optimizer steps")
    max_grad_norm: float | None = Field(default=1.0, description="gradient clipping; None = off")
    steps: int = Field(default=1000, ge=1, description="optimizer steps (each = grad_accum micro-batches)")
    batch_size: int = Field(default=4, ge=1, description="micro-batch per worker")
    grad_accum: int = Field(default=1, ge=1)
    ema: bool = False
    ema_decay: float = Field(default=0.999, gt=0, lt=1)
    export_ema: bool = Field(default=True, description="with ema: method.safetensors holds the EMA weights")
    # numerics and speed
    mixed_precision: Literal["no", "bf16", "fp16"] = Field(
        default="bf16", description="autocast dtype on GPU; CPU workers always compute in float32"
    )
    frozen_dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        default="auto", description="dtype of the frozen base weights; auto = the autocast dtype on GPU, else fp32"
    )
    channels_last: bool = True
    compile_unet: bool = Field(default=False, description="torch.compile the frozen UNet (GPU)")
    gradient_checkpointing: bool = Field(
        default=False, description="recompute the frozen UNet's activations in backward (memory for time)")
    allow_tf32: bool = True
    find_unused_parameters: bool = False
    # data
    refs_per_item: int | None = Field(
        default=None, ge=1, description="reference images per item; None = the method's default"
    )
    ref_includes_target: bool | None = Field(
        default=None, description="may the target be one of its references; None = the method's default"
    )
    flip_prob: float = Field(default=0.5, ge=0, le=1)
    loader_workers: int = Field(default=0, ge=0, description="DataLoader worker processes per training worker")
    holdout_per_identity: int = Field(
        default=0, ge=0, description="images per identity kept out of training (targets and references) for "
        "the held-out identity-gap validation; identities with no more images than this are all trained on"
    )
    validate_every: int = Field(default=0, ge=0, description="steps between identity-gap checks (held-out photos "
                                "when holdout_per_identity > 0, else across photos of the training set); 0 = off")
    # bookkeeping
    checkpoint_every: int = Field(default=500, ge=1, description="optimizer steps between Ray checkpoints")
    report_every: int = Field(default=50, ge=1, description="optimizer steps between metric reports (costly)")
    keep_checkpoints: int = Field(default=2, ge=1)
    max_failures: int = Field(default=2, ge=0, description="worker failures Ray Train recovers from")
    sample_every: int = Field(default=0, ge=0, description="steps between logged sample grids; 0 = off")
    sample_prompts: list[str] = Field(default_factory=lambda: ["a photo of a {class_noun}"])
    sample_steps: int = Field(default=20, ge=1)
    seed: int = 0
    cpus_per_worker: int = Field(default=1, ge=1)
    storage_path: str | None = Field(
        default=None, description="Ray Train persistent storage (shared by all nodes); None = <output>/ray"
    )
    input: Literal["local", "stream"] = Field(
        default="local", description="local: every worker reads the whole prepared set (an s3:// one is copied to "
        "each node first); stream: each rank reads only the shards of its identities from storage, through a "
        "bounded cache (idforge.train.stream)")
    stream_cache_bytes: int = Field(
        default=2 << 30, ge=1 << 20, description="input=stream: local cache of downloaded shards per worker (LRU)")
    stream_window_shards: int = Field(
        default=8, ge=1, description="input=stream: shards whose items are shuffled together (the cache should hold "
        "this many shards)")
