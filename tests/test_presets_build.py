"""Every shipped preset builds its method at the preset's real base-model shapes (meta device: no memory), and the
trainable-parameter count is the paper's where the paper (or the method's definition) gives one. New presets are
picked up automatically; a method with a reported count adds it to PAPER_COUNTS."""

from __future__ import annotations

import contextlib
from collections.abc import Callable

import pytest
import torch

from idforge.config import load_config
from idforge.presets import available_presets
from tests.fixtures.meta_pipelines import KINDS, meta_pipeline

PRESETS = sorted(available_presets())

# CLIP vision towers a preset may name: the prepared tensors' per-item shapes they give (hidden states incl. the
# class token; projected image embedding).
CLIP_SHAPES = {
    "openai/clip-vit-base-patch16": {"clip_patch_tokens": [197, 768], "clip_image_embed": [512]},
    "openai/clip-vit-large-patch14": {"clip_patch_tokens": [257, 1024], "clip_image_embed": [768]},
    "laion/CLIP-ViT-H-14-laion2B-s32B-b79K": {"clip_patch_tokens": [257, 1280], "clip_image_embed": [1024]},
    "laion/CLIP-ViT-bigG-14-laion2B-39B-b160k": {"clip_patch_tokens": [257, 1664], "clip_image_embed": [1280]},
}
FACE_SHAPE = {"face_embed": [512]}  # ArcFace


def _lora_rank4_sd15(rank: int) -> int:
    """LoRA on to_q/k/v/out.0 of SD1.5's 32 attention layers: rank * (in + out) per projection."""
    total = 0
    for c in [320] * 5 + [640] * 5 + [1280] * 6:
        self_attn = 4 * rank * (c + c)
        cross = rank * (c + c) + 2 * rank * (768 + c) + rank * (c + c)
        total += self_attn + cross
    return total


# preset -> (expected trainable parameters, relative tolerance, source)
PAPER_COUNTS: dict[str, tuple[Callable[[dict], int], float, str]] = {
    "pidiff": (lambda mc: 38_500_000, 0.005, "PIDiff Table 8: 38.5 M (q/k/v of 16 SCAs + F)"),
    "textual-inversion": (lambda mc: mc.get("num_tokens", 1) * 768, 0.0, "TI §3: one 768-d vector per token"),
    "dreambooth-lora": (lambda mc: _lora_rank4_sd15(mc.get("rank", 4)), 0.0, "LoRA: r (in + out) per projection"),
}


@pytest.mark.parametrize("name", PRESETS)
def test_preset_builds_at_real_shape_with_the_papers_trainable_count(name, tiny_e4e_checkpoint):
    from idforge.methods.registry import method_class

    cfg = load_config(preset=name)
    kind = cfg.model.kind
    assert kind in KINDS, f"preset {name} must name model.kind (one of {KINDS}), got {kind!r}"
    cls = method_class(name)
    section = cfg.finetune if cls.regime == "per-identity" else cfg.train
    user = dict(section.method_config)
    if name == "pidiff":
        user["encoder_path"] = str(tiny_e4e_checkpoint)  # a site path: presets leave it out
    if cls.regime == "population":
        assert cfg.model.clip in CLIP_SHAPES, f"add {cfg.model.clip!r} to CLIP_SHAPES"
        user = cls.Config.for_data(user, {**FACE_SHAPE, **CLIP_SHAPES[cfg.model.clip]})
    pipe = meta_pipeline(kind)
    method = cls.from_config(user)
    # Population methods copy the UNet's own projections into modules made on the default device, which cannot
    # read the meta UNet: build them on meta. Per-identity methods read the (CPU) text encoder while building.
    with torch.device("meta") if cls.regime == "population" else contextlib.nullcontext():
        method.attach(pipe)
    try:
        n = method.num_trainable_parameters()
        assert n > 0
        # trained weights are the method's own (LoRA layers sit inside the UNet but belong to the method)
        owned = {id(p) for p in method.modules.parameters()}
        base = [p for comp in (pipe.unet, pipe.text_encoder, pipe.text_encoder_2) if comp is not None
                for p in comp.parameters() if id(p) not in owned]
        assert not any(p.requires_grad for p in base)
        assert not {id(p) for p in method.trainable_parameters()} & {id(p) for p in base}
        if name in PAPER_COUNTS:
            expected, tol, source = PAPER_COUNTS[name]
            want = expected(section.method_config)
            assert abs(n - want) <= tol * want, f"{name}: {n:,} trainable, {source} says {want:,}"
    finally:
        method.detach()
