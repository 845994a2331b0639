"""Tiny random models of the real diffusers/transformers classes, saved with ``save_pretrained``.

No diffusion or CLIP weights ship in a registry package and no machine of ours reaches a hub, so tests and the demo
load these through the same ``from_pretrained`` code that loads SD1.5/SDXL/CLIP in production.

Shapes (sd15): 64x64 RGB images, VAE with 4 blocks (``vae_scale_factor`` 8) -> latents (4, 8, 8); UNet with
``block_out_channels`` (32, 64) and cross-attention (attn1 self + attn2 cross) in every down, mid and up block;
text encoder hidden size 32 (= UNet ``cross_attention_dim``), 77 tokens. sdxl: same image/latent sizes, two text
encoders (32 + 32 -> ``cross_attention_dim`` 64), ``text_time`` added conditioning with the SDXL time ids.
clip: ``CLIPModel`` with 32x32 images, patch 8, projection dim 32, plus its tokenizer and image processor.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from idforge.errors import ConfigError
from idforge.io.atomic import atomic_path
from idforge.logs import quiet_known_notices

if TYPE_CHECKING:
    import torch

log = logging.getLogger(__name__)

TinyKind = Literal["sd15", "sdxl", "clip"]
KINDS: tuple[str, ...] = ("sd15", "sdxl", "clip")

IMAGE_SIZE = 64  # pixels, sd15 and sdxl
LATENT_SIZE = 8  # IMAGE_SIZE / vae_scale_factor
TEXT_HIDDEN = 32  # text encoder hidden size; sd15 cross_attention_dim
PROJECTION_DIM = 32  # CLIP projection dim (sdxl text_encoder_2 pooled size, clip image/text features)
CLIP_IMAGE_SIZE = 32
CLIP_PATCH_SIZE = 8
SDXL_TIME_EMBED_DIM = 8  # addition_time_embed_dim; SDXL passes 6 time ids


def make_tiny(out_dir: str | Path, kind: str = "sd15", seed: int = 0) -> Path:
    """Build a tiny random ``kind`` model and save it at ``out_dir`` (created or replaced atomically).

    The same ``seed`` gives bit-identical weights. Returns ``out_dir`` as a ``Path``.
    Raises ``ConfigError`` for an unknown ``kind``.
    """
    quiet_known_notices()
    if kind not in KINDS:
        raise ConfigError(f"make_tiny: kind={kind!r} is not one of {', '.join(KINDS)}; pass --kind sd15|sdxl|clip")
    out = Path(out_dir).expanduser()
    builders = {"sd15": _save_sd15, "sdxl": _save_sdxl, "clip": _save_clip}
    with atomic_path(out) as tmp:
        tmp.mkdir(parents=True)
        builders[kind](tmp, seed)
    log.info("wrote tiny %s model (seed %d) to %s", kind, seed, out)
    return out


# ----------------------------------------------------------------------------------------------------------------
# building blocks


def _seeded(seed: int, build: Any) -> Any:
    """Run ``build()`` with torch's global RNG seeded, restoring the caller's RNG state afterwards.

    Module constructors draw their initial weights from the global generator; forking keeps that side effect local.
    """
    import torch

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return build()


def _text_config(vocab_size: int, bos: int, eos: int, pad: int, projection_dim: int = PROJECTION_DIM) -> Any:
    from transformers import CLIPTextConfig

    return CLIPTextConfig(
        vocab_size=vocab_size,
        hidden_size=TEXT_HIDDEN,
        intermediate_size=37,
        projection_dim=projection_dim,
        # >= 2 layers: SDXL (and clip-skip) read hidden_states[-2].
        num_hidden_layers=3,
        num_attention_heads=4,
        max_position_embeddings=77,
        hidden_act="gelu",
        bos_token_id=bos,
        eos_token_id=eos,
        pad_token_id=pad,
    )


def _tokenizer(pad_token: str | None = None) -> Any:
    from idforge.diffusion.tokenizer import EOS, build_clip_tokenizer

    return build_clip_tokenizer(pad_token=pad_token or EOS)


def _save_tokenizer(tok: Any, out: Path) -> None:
    """``save_pretrained`` plus CLIP's classic ``vocab.json``/``merges.txt``, so older loaders read it too."""
    from idforge.diffusion.tokenizer import write_vocab_files

    tok.save_pretrained(out)
    write_vocab_files(out)


def _vae(seed: int, scaling_factor: float) -> Any:
    from diffusers import AutoencoderKL

    # 4 blocks -> 3 downsamplings -> vae_scale_factor 8 (what the pipelines derive from block_out_channels).
    return _seeded(
        seed,
        lambda: AutoencoderKL(
            in_channels=3,
            out_channels=3,
            down_block_types=("DownEncoderBlock2D",) * 4,
            up_block_types=("UpDecoderBlock2D",) * 4,
            block_out_channels=(8, 8, 16, 16),
            layers_per_block=1,
            latent_channels=4,
            norm_num_groups=8,
            sample_size=IMAGE_SIZE,
            scaling_factor=scaling_factor,
        ),
    )


def _unet_kwargs() -> dict[str, Any]:
    # Cross-attention blocks everywhere: other modules install attn1/attn2 processors in down, mid and up blocks.
    return dict(
        sample_size=LATENT_SIZE,
        in_channels=4,
        out_channels=4,
        block_out_channels=(32, 64),
        layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        mid_block_type="UNetMidBlock2DCrossAttn",
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        norm_num_groups=8,
    )


def _scheduler_config() -> dict[str, Any]:
    """The SD1.5/SDXL noise schedule; any diffusers scheduler (DDPM for training, DDIM/Euler/DPM++) reads it."""
    return dict(
        num_train_timesteps=1000,
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        clip_sample=False,
        set_alpha_to_one=False,
        steps_offset=1,
        prediction_type="epsilon",
        timestep_spacing="leading",
    )


def _scheduler() -> Any:
    from diffusers import DDIMScheduler

    return DDIMScheduler(**_scheduler_config())


# ----------------------------------------------------------------------------------------------------------------
# the three kinds


def _save_sd15(out: Path, seed: int) -> None:
    from diffusers import StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextModel

    tok = _tokenizer()
    unet = _seeded(
        seed,
        lambda: UNet2DConditionModel(**_unet_kwargs(), cross_attention_dim=TEXT_HIDDEN, attention_head_dim=(2, 4)),
    )
    vae = _vae(seed + 1, scaling_factor=0.18215)
    cfg = _text_config(len(tok), tok.bos_token_id, tok.eos_token_id, tok.pad_token_id)
    text_encoder = _seeded(seed + 2, lambda: CLIPTextModel(cfg))
    pipe = StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tok,
        unet=unet,
        scheduler=_scheduler(),
        safety_checker=None,
        feature_extractor=None,
        image_encoder=None,
        requires_safety_checker=False,
    )
    _save_pipeline(pipe, out)


def _save_sdxl(out: Path, seed: int) -> None:
    from diffusers import StableDiffusionXLPipeline, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    tok = _tokenizer()
    tok_2 = _tokenizer(pad_token="!")  # SDXL's second tokenizer pads with "!" (id of the byte symbol)
    # SDXL's added conditioning: pooled text_encoder_2 output (projection_dim) + 6 time ids x time embed dim.
    unet = _seeded(
        seed,
        lambda: UNet2DConditionModel(
            **_unet_kwargs(),
            cross_attention_dim=TEXT_HIDDEN * 2,
            attention_head_dim=(2, 4),
            use_linear_projection=True,
            addition_embed_type="text_time",
            addition_time_embed_dim=SDXL_TIME_EMBED_DIM,
            projection_class_embeddings_input_dim=PROJECTION_DIM + 6 * SDXL_TIME_EMBED_DIM,
        ),
    )
    vae = _vae(seed + 1, scaling_factor=0.13025)
    te_cfg = _text_config(len(tok), tok.bos_token_id, tok.eos_token_id, tok.pad_token_id)
    te2_cfg = _text_config(len(tok_2), tok_2.bos_token_id, tok_2.eos_token_id, tok_2.pad_token_id)
    text_encoder = _seeded(seed + 2, lambda: CLIPTextModel(te_cfg))
    text_encoder_2 = _seeded(seed + 3, lambda: CLIPTextModelWithProjection(te2_cfg))
    pipe = StableDiffusionXLPipeline(
        vae=vae,
        text_encoder=text_encoder,
        text_encoder_2=text_encoder_2,
        tokenizer=tok,
        tokenizer_2=tok_2,
        unet=unet,
        scheduler=_scheduler(),
        image_encoder=None,
        feature_extractor=None,
        force_zeros_for_empty_prompt=True,
    )
    _save_pipeline(pipe, out)


def _save_pipeline(pipe: Any, out: Path) -> None:
    pipe.save_pretrained(out, safe_serialization=True)
    # Rewrite the tokenizer folders with the classic vocab.json/merges.txt beside tokenizer.json.
    for name in ("tokenizer", "tokenizer_2"):
        tok = getattr(pipe, name, None)
        if tok is not None:
            _save_tokenizer(tok, out / name)


def _save_clip(out: Path, seed: int) -> None:
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPVisionConfig

    tok = _tokenizer()
    text_cfg = _text_config(len(tok), tok.bos_token_id, tok.eos_token_id, tok.pad_token_id)
    vision_cfg = CLIPVisionConfig(
        hidden_size=32,
        intermediate_size=37,
        projection_dim=PROJECTION_DIM,
        num_hidden_layers=2,
        num_attention_heads=4,
        image_size=CLIP_IMAGE_SIZE,
        patch_size=CLIP_PATCH_SIZE,
        num_channels=3,
    )
    config = CLIPConfig(
        text_config=text_cfg.to_dict(), vision_config=vision_cfg.to_dict(), projection_dim=PROJECTION_DIM
    )
    model = _seeded(seed, lambda: CLIPModel(config))
    model.save_pretrained(out, safe_serialization=True)
    _save_tokenizer(tok, out)
    # OpenAI CLIP's preprocessing (resize shortest edge, centre crop, CLIP mean/std) at the tiny image size.
    CLIPImageProcessor(
        size={"shortest_edge": CLIP_IMAGE_SIZE},
        crop_size={"height": CLIP_IMAGE_SIZE, "width": CLIP_IMAGE_SIZE},
    ).save_pretrained(out)


def state_fingerprint(module: torch.nn.Module) -> str:
    """sha256 over a module's state dict (names, dtypes, shapes, bytes): equal iff weights are bit-identical."""
    import hashlib

    import torch

    h = hashlib.sha256()
    for name, tensor in sorted(module.state_dict().items()):
        t = tensor.detach().cpu().contiguous()
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)}".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()
