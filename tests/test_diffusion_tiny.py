"""Tiny random models: they load with the real diffusers/transformers classes and behave like the real shapes."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from idforge.diffusion.tiny import make_tiny, state_fingerprint
from idforge.diffusion.tokenizer import CLASS_NOUNS, WORDS, build_clip_tokenizer
from idforge.errors import ConfigError


@pytest.fixture(scope="module")
def sd15_pipe(tiny_sd15_dir):
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(tiny_sd15_dir)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _generate(pipe, seed: int, prompt: str = "a photo of a man wearing a red sweater") -> np.ndarray:
    image = pipe(prompt, num_inference_steps=2, generator=torch.Generator().manual_seed(seed)).images[0]
    assert image.size == (64, 64)
    return np.asarray(image)


def test_sd15_generates_64px_deterministically(sd15_pipe):
    a = _generate(sd15_pipe, seed=0)
    b = _generate(sd15_pipe, seed=0)
    c = _generate(sd15_pipe, seed=1)
    assert a.shape == (64, 64, 3) and a.dtype == np.uint8
    assert np.array_equal(a, b)
    assert np.abs(a.astype(int) - c.astype(int)).mean() > 1.0
    assert a.std() > 1.0  # not a constant image


def test_sd15_shapes_and_attention_layout(sd15_pipe):
    assert sd15_pipe.vae_scale_factor == 8
    assert sd15_pipe.unet.config.cross_attention_dim == sd15_pipe.text_encoder.config.hidden_size == 32
    latents = sd15_pipe.vae.encode(torch.zeros(1, 3, 64, 64)).latent_dist.mean
    assert latents.shape == (1, 4, 8, 8)
    names = list(sd15_pipe.unet.attn_processors)
    for block in ("down_blocks", "mid_block", "up_blocks"):
        for attn in ("attn1", "attn2"):
            assert any(n.startswith(block) and f".{attn}." in n for n in names), (block, attn)
    assert sd15_pipe.safety_checker is None and sd15_pipe.feature_extractor is None


def test_sd15_schedulers_swap_and_train_scheduler(sd15_pipe):
    from diffusers import DDPMScheduler, DPMSolverMultistepScheduler, EulerDiscreteScheduler

    DDPMScheduler.from_config(sd15_pipe.scheduler.config).add_noise(
        torch.zeros(1, 4, 8, 8), torch.randn(1, 4, 8, 8), torch.tensor([10])
    )
    original = sd15_pipe.scheduler
    try:
        for cls in (DPMSolverMultistepScheduler, EulerDiscreteScheduler):
            sd15_pipe.scheduler = cls.from_config(original.config)
            assert _generate(sd15_pipe, seed=0).std() > 1.0
    finally:
        sd15_pipe.scheduler = original


def test_sdxl_generates_64px_deterministically(tiny_sdxl_dir):
    from diffusers import StableDiffusionXLPipeline

    pipe = StableDiffusionXLPipeline.from_pretrained(tiny_sdxl_dir)
    pipe.set_progress_bar_config(disable=True)
    assert pipe.unet.config.addition_embed_type == "text_time"
    assert pipe.unet.config.cross_attention_dim == 64
    a = _generate(pipe, seed=0)
    assert np.array_equal(a, _generate(pipe, seed=0))
    assert np.abs(a.astype(int) - _generate(pipe, seed=1).astype(int)).mean() > 1.0


def test_clip_features_and_tokenizer(tiny_clip_dir):
    from PIL import Image
    from transformers import CLIPImageProcessor, CLIPModel, CLIPTokenizer, CLIPVisionModelWithProjection

    model = CLIPModel.from_pretrained(tiny_clip_dir).eval()
    tok = CLIPTokenizer.from_pretrained(tiny_clip_dir)
    proc = CLIPImageProcessor.from_pretrained(tiny_clip_dir)
    images = [Image.new("RGB", (80, 60), (200, 30, 30)), Image.new("RGB", (50, 50), (10, 90, 250))]
    pixels = proc(images=images, return_tensors="pt").pixel_values
    assert pixels.shape == (2, 3, 32, 32)
    text = tok(["a photo of a man", "a woman on the beach"], padding=True, return_tensors="pt")
    with torch.no_grad():
        img_feat = model.get_image_features(pixel_values=pixels)
        txt_feat = model.get_text_features(**text)
    img_feat = getattr(img_feat, "pooler_output", img_feat)
    txt_feat = getattr(txt_feat, "pooler_output", txt_feat)
    assert img_feat.shape == (2, 32) and txt_feat.shape == (2, 32)
    assert not torch.allclose(img_feat[0], img_feat[1])
    # The vision tower alone (what IP-Adapter-style image encoders load) reads the same directory.
    vision = CLIPVisionModelWithProjection.from_pretrained(tiny_clip_dir)
    assert vision.config.image_size == 32


def test_tokenizer_round_trips_and_keeps_prompt_words_whole():
    tok = build_clip_tokenizer()
    for word in WORDS:
        assert len(tok(word, add_special_tokens=False).input_ids) == 1, word
    for noun in CLASS_NOUNS:
        assert noun in tok.get_vocab() or f"{noun}</w>" in tok.get_vocab()
    prompt = "a photo of sks man wearing a red sweater on the beach, in the style of van gogh"
    ids = tok(prompt).input_ids
    assert ids[0] == tok.bos_token_id and ids[-1] == tok.eos_token_id
    assert tok.decode(ids, skip_special_tokens=True) == prompt.replace(",", " ,")
    # Unknown ASCII words fall back to byte symbols and still round-trip.
    assert tok.decode(tok("xylophone qqq", add_special_tokens=False).input_ids) == "xylophone qqq"
    assert tok.unk_token_id not in tok("zebra quokka", add_special_tokens=False).input_ids
    padded = tok("a man", padding="max_length", max_length=tok.model_max_length).input_ids
    assert len(padded) == 77


def test_same_seed_same_weights_other_seed_different(tmp_path, tiny_clip_dir):
    from transformers import CLIPModel

    a = make_tiny(tmp_path / "a", kind="clip", seed=0)
    b = make_tiny(tmp_path / "b", kind="clip", seed=1)
    fp = {p: state_fingerprint(CLIPModel.from_pretrained(p)) for p in (a, b, tiny_clip_dir)}
    assert fp[a] == fp[tiny_clip_dir]  # the fixture used seed 0 too
    assert fp[a] != fp[b]
    assert (a / "model.safetensors").read_bytes() == (tiny_clip_dir / "model.safetensors").read_bytes()


def test_pipeline_weights_are_bit_identical_per_seed(tmp_path, tiny_sdxl_dir):
    def weights(d):
        return {f.relative_to(d).as_posix(): f.read_bytes() for f in sorted(d.rglob("*.safetensors"))}

    same = weights(make_tiny(tmp_path / "same", kind="sdxl", seed=0))
    other = weights(make_tiny(tmp_path / "other", kind="sdxl", seed=7))
    ref = weights(tiny_sdxl_dir)
    assert set(ref) == {f"{m}/{n}" for m, n in [
        ("unet", "diffusion_pytorch_model.safetensors"), ("vae", "diffusion_pytorch_model.safetensors"),
        ("text_encoder", "model.safetensors"), ("text_encoder_2", "model.safetensors"),
    ]}  # fmt: skip
    assert same == ref
    assert all(other[k] != ref[k] for k in ref)


def test_make_tiny_replaces_atomically_and_rejects_bad_kind(tmp_path):
    out = tmp_path / "m"
    make_tiny(out, kind="clip", seed=0)
    (out / "stale.txt").write_text("old")
    make_tiny(out, kind="clip", seed=1)
    assert not (out / "stale.txt").exists()
    assert json.loads((out / "config.json").read_text())["projection_dim"] == 32
    with pytest.raises(ConfigError, match="kind='sd3'"):
        make_tiny(tmp_path / "bad", kind="sd3")
    assert not (tmp_path / "bad").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m"]  # no temp dirs left behind


def test_model_sizes_stay_tiny(tiny_sd15_dir, tiny_sdxl_dir):
    for d in (tiny_sd15_dir, tiny_sdxl_dir):
        for f in d.rglob("*.safetensors"):
            assert f.stat().st_size < 5 * 2**20, f
