"""Offline loading: local dirs and cached hub ids load with the real classes; anything else is one clear line."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from idforge.diffusion.loading import (
    ClipBundle,
    describe_model,
    load_clip,
    load_components,
    load_pipeline,
    pipeline_kind,
    resolve_model,
)
from idforge.errors import ConfigError, ModelNotFoundError


def _one_line(exc: pytest.ExceptionInfo) -> str:
    msg = str(exc.value)
    assert "\n" not in msg
    return msg


def test_load_pipeline_auto_picks_the_class(tiny_sd15_dir, tiny_sdxl_dir):
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

    sd = load_pipeline(tiny_sd15_dir)
    xl = load_pipeline(str(tiny_sdxl_dir), kind="auto")
    assert type(sd) is StableDiffusionPipeline and sd.safety_checker is None
    assert type(xl) is StableDiffusionXLPipeline
    sd.set_progress_bar_config(disable=True)
    image = sd("a photo of a woman", num_inference_steps=2, generator=torch.Generator().manual_seed(0)).images[0]
    assert image.size == (64, 64)
    assert load_pipeline(tiny_sd15_dir, kind="sd21").unet.dtype == torch.float32
    assert load_pipeline(tiny_sd15_dir, dtype="bfloat16").unet.dtype == torch.bfloat16


def test_kind_and_dtype_are_checked(tiny_sd15_dir, tiny_clip_dir):
    assert pipeline_kind(tiny_sd15_dir) == "sd"
    with pytest.raises(ConfigError, match="model.kind=sdxl") as exc:
        load_pipeline(tiny_sd15_dir, kind="sdxl")
    _one_line(exc)
    with pytest.raises(ConfigError, match="'sd3'"):
        load_pipeline(tiny_sd15_dir, kind="sd3")
    with pytest.raises(ConfigError, match="'int8'"):
        load_pipeline(tiny_sd15_dir, dtype="int8")
    with pytest.raises(ModelNotFoundError, match="model_index.json") as exc:
        load_pipeline(tiny_clip_dir)  # a CLIP dir is not a pipeline
    _one_line(exc)


def test_load_components_for_training(tiny_sdxl_dir, tiny_sd15_dir):
    from diffusers import DDPMScheduler

    xl = load_components(tiny_sdxl_dir)
    assert xl.kind == "sdxl" and xl.text_encoder_2 is not None and xl.tokenizer_2 is not None
    assert isinstance(xl.noise_scheduler, DDPMScheduler)
    assert xl.noise_scheduler.config.beta_schedule == xl.scheduler.config.beta_schedule == "scaled_linear"
    sd = load_components(tiny_sd15_dir)
    assert sd.kind == "sd" and sd.text_encoder_2 is None and sd.vae_scale_factor == 8
    ids = sd.tokenizer("a photo of a man", padding="max_length", max_length=77, return_tensors="pt").input_ids
    with torch.no_grad():
        hidden = sd.text_encoder(ids)[0]
        latents = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
        out = sd.unet(latents, torch.tensor([500]), encoder_hidden_states=hidden).sample
    assert hidden.shape == (1, 77, 32) and out.shape == (1, 4, 8, 8)


def test_load_clip_bundle(tiny_clip_dir):
    bundle = load_clip(tiny_clip_dir)
    assert isinstance(bundle, ClipBundle)
    model, tokenizer, processor = bundle
    assert not model.training
    pixels = processor(images=[np.full((40, 40, 3), 128, np.uint8)] * 3, return_tensors="pt").pixel_values
    with torch.no_grad():
        feats = model.get_image_features(pixel_values=pixels)
    feats = getattr(feats, "pooler_output", feats)
    assert feats.shape == (3, 32)
    assert tokenizer.decode(tokenizer("a girl in the snow").input_ids, skip_special_tokens=True) == "a girl in the snow"


def test_missing_path_names_the_path(tmp_path):
    missing = tmp_path / "no-such-model"
    with pytest.raises(ModelNotFoundError) as exc:
        load_pipeline(missing)
    msg = _one_line(exc)
    assert str(missing) in msg and "does not exist" in msg and "model.base" in msg
    with pytest.raises(ModelNotFoundError, match="does not exist"):
        load_clip(str(missing))
    (tmp_path / "weights.bin").write_bytes(b"x")
    with pytest.raises(ModelNotFoundError, match="is a file, not a model directory"):
        resolve_model(str(tmp_path / "weights.bin"))


@pytest.mark.parametrize("loader, key", [(load_pipeline, "model.base"), (load_clip, "model.clip")])
def test_uncached_hub_id_is_one_line_with_the_fix(loader, key, tmp_path):
    with pytest.raises(ModelNotFoundError) as exc:
        loader("someone/not-a-model", cache_dir=tmp_path)
    msg = _one_line(exc)
    assert "'someone/not-a-model'" in msg and "not in the Hugging Face cache" in msg
    assert f"--set {key}=/path/to/dir" in msg and "idforge models make-tiny" in msg


def test_malformed_id_is_rejected_without_network():
    with pytest.raises(ModelNotFoundError, match="neither an existing directory nor a valid hub id") as exc:
        resolve_model("bad id with spaces")
    _one_line(exc)


def test_hub_id_in_the_cache_loads_offline(tmp_path, tiny_sd15_dir):
    # The HF cache layout: models--owner--name/{refs/main -> commit, snapshots/<commit>/...}.
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = tmp_path / "hub" / "models--acme--tiny-sd"
    shutil.copytree(tiny_sd15_dir, repo / "snapshots" / commit)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    cache = tmp_path / "hub"
    resolved = resolve_model("acme/tiny-sd", cache_dir=cache)
    assert isinstance(resolved, Path) and resolved.name == commit
    pipe = load_pipeline("acme/tiny-sd", cache_dir=cache)
    assert pipe.unet.config.cross_attention_dim == 32
    with pytest.raises(ModelNotFoundError, match="acme/tiny-sd"):
        resolve_model("acme/tiny-sd", revision="v9", cache_dir=cache)


def test_uncached_id_is_passed_through_when_hub_allowed(tmp_path):
    assert resolve_model("someone/not-a-model", local_files_only=False, cache_dir=tmp_path) == "someone/not-a-model"


def test_describe_model(tiny_sdxl_dir, tiny_clip_dir):
    text = describe_model(tiny_sdxl_dir)
    assert "StableDiffusionXLPipeline" in text and "cross_attention_dim 64" in text and "64x64 px" in text
    assert "text_encoder_2: CLIPTextModelWithProjection" in text
    clip = describe_model(str(tiny_clip_dir), kind="clip")
    assert "CLIPModel" in clip and "projection dim: 32" in clip
    with pytest.raises(ConfigError, match="--kind pipeline"):
        describe_model(tiny_clip_dir, kind="onnx")
