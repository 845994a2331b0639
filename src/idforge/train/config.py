"""Settings of the ``prepare`` stage and of the population training loop (``prepare:`` and ``train:`` sections).

Import-light (pydantic only) so loading a config never pulls in torch or Ray.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, field_validator

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

    @field_validator("caption_templates")
    @classmethod
    def _templates_have_noun(cls, value: list[str]) -> list[str]:
        if not value:
            raise ValueError("at least one caption template is needed")
        bad = [t for t in value if t.count("{class_noun}") != 1]
        if bad:
            raise ValueError(f"each caption template needs exactly one '{{class_noun}}': {bad}")
        return value

    def item_params(self) -> dict[str, Any]:
        """The settings that change a cached image item (captions do not: they are cached separately)."""
        return self.model_dump(include={"resolution", "flip", "image_source", "clip_crop", "clip_hidden_layer",
                                        "storage_dtype"})


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
