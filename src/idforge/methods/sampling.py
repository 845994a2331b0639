"""The sampler every method shares: a plain, deterministic denoising loop over the pipeline's components.

Methods customise two hooks (``encode_prompts`` and ``denoise``); the loop does seeds, batching, classifier-free
guidance and decoding. We do not call ``pipe(...)`` because several methods change the UNet batch itself
(Infinite-ID runs an extra text-only stream per step), which the stock pipelines cannot express.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any, Protocol

import torch
from pydantic import Field, field_validator
from torch import Tensor

from idforge.config_section import Section
from idforge.diffusion.schedulers import check_scheduler_name
from idforge.methods.types import Condition, InjectionState

if TYPE_CHECKING:
    from PIL.Image import Image

log = logging.getLogger(__name__)


class SamplingConfig(Section):
    """Keyword arguments of ``Method.generate`` (validated, so a typo in ``--set`` fails loudly)."""

    seeds: list[int] = Field(default_factory=lambda: [0])
    num_inference_steps: int = Field(default=30, ge=1)
    guidance_scale: float = 5.0
    negative_prompt: str = ""
    height: int | None = None  # None = the UNet's native size (sample_size * vae_scale_factor)
    width: int | None = None
    batch_size: int = Field(default=4, ge=1, description="prompts per UNet batch (x2 with guidance)")
    scheduler: str | None = Field(default=None, description="model | ddim | dpm++ | euler | euler_a or a diffusers "
                                  "scheduler class, built from the pipeline's scheduler config; None = its own")

    _scheduler_name = field_validator("scheduler")(classmethod(lambda cls, v: check_scheduler_name(v)))


class Sampled(Protocol):
    """The hooks of a method the sampler calls (``BaseMethod`` has them all; methods override the last four)."""

    name: str
    state: InjectionState

    @property
    def is_attached(self) -> bool: ...
    def train(self, mode: bool = True) -> Any: ...
    def eval(self) -> Any: ...
    def encode_prompts(self, pipe: Any, prompts: list[str], cond: Condition | None) -> Any: ...
    def unconditional(self, cond: Condition) -> Condition: ...
    def sampling_streams(self) -> int: ...
    def denoise(self, pipe: Any, latents: Tensor, t: Tensor, text: Any, cond: Condition) -> Tensor: ...


def _chunks(items: list[str], size: int) -> list[list[str]]:
    return [items[i:i + size] for i in range(0, len(items), size)]


def image_size(pipe: Any, cfg: SamplingConfig) -> tuple[int, int]:
    """(height, width) in pixels: the config's, else the UNet's native size."""
    scale = getattr(pipe, "vae_scale_factor", 8)
    native = pipe.unet.config.sample_size
    native = native if isinstance(native, int) else native[0]
    h = cfg.height or native * scale
    w = cfg.width or native * scale
    if h % scale or w % scale:
        raise ValueError(f"height/width ({h}x{w}) must be multiples of the VAE factor {scale}")
    return h, w


def sampling_scheduler(pipe: Any, name: str | None = None) -> Any:
    """A fresh scheduler for one sampling run (``idforge.diffusion.schedulers.make_scheduler``): ``model``/None = the
    pipeline's own, ``ddim`` | ``dpm++`` | ``euler`` | ``euler_a`` or a diffusers class name, all built from the
    pipeline's scheduler config (the base model's betas and prediction type)."""
    from idforge.diffusion.schedulers import make_scheduler

    return make_scheduler(name, pipe.scheduler)


def decode_latents(pipe: Any, latents: torch.Tensor) -> list[Image]:
    """(B, 4, h, w) scaled latents -> B PIL images."""
    vae = pipe.vae
    shift = getattr(vae.config, "shift_factor", None) or 0.0
    x = latents.to(vae.dtype) / vae.config.scaling_factor + shift
    images = vae.decode(x).sample
    return pipe.image_processor.postprocess(images.float(), output_type="pil")


def negative_text(method: Sampled, pipe: Any, negative_prompt: str, batch: int, like: Any) -> Any:
    """The unconditional branch's text: the negative prompt, or zeros where the pipeline asks for them
    (SDXL's ``force_zeros_for_empty_prompt`` with an empty negative prompt, as its own ``__call__`` does)."""
    from idforge.diffusion.text import TextCondition

    if not negative_prompt and getattr(pipe.config, "force_zeros_for_empty_prompt", False):
        pooled = None if like.pooled is None else torch.zeros_like(like.pooled)
        return TextCondition(torch.zeros_like(like.hidden), pooled)
    return method.encode_prompts(pipe, [negative_prompt] * batch, None)


@torch.no_grad()
def sample(method: Sampled, pipe: Any, prompts: list[str], cond: Condition, cfg: SamplingConfig) -> list[Image]:
    """``len(prompts) * len(cfg.seeds)`` images, prompt-major (all seeds of prompt 0 first).

    Each seed draws the initial latents from ``torch.Generator("cpu").manual_seed(seed)`` (shared by every prompt
    of the seed) and feeds the scheduler's own noise from the same generator, so a (prompts, seed) pair always
    gives the same pixels. ``cond`` is one identity (batch 1) and is repeated across the prompts. The unconditional
    branch uses the negative prompt and ``method.unconditional(cond)``.
    """
    from idforge.diffusion.text import TextCondition

    if not prompts:
        return []
    if not method.is_attached:
        raise ValueError(f"method {method.name!r} is not attached to a pipeline: call method.attach(pipe) first")
    unet = pipe.unet
    device, dtype = unet.device, unet.dtype
    height, width = image_size(pipe, cfg)
    scale = getattr(pipe, "vae_scale_factor", 8)
    shape = (1, unet.config.in_channels, height // scale, width // scale)
    guided = cfg.guidance_scale > 1.0
    cond = cond.to(device)
    scheduler = sampling_scheduler(pipe, cfg.scheduler)
    was_training = method.state.mode == "train"
    method.eval()
    streams = method.sampling_streams()
    flags_before = dict(method.state.flags)
    method.state.flags.update(streams=streams, guided=guided)
    results: dict[tuple[int, int], Image] = {}
    try:
        for start, chunk in zip(range(0, len(prompts), cfg.batch_size), _chunks(prompts, cfg.batch_size), strict=True):
            b = len(chunk)
            text = method.encode_prompts(pipe, chunk, cond.expand(b))
            step_cond = cond.expand(b)
            if guided:
                neg = negative_text(method, pipe, cfg.negative_prompt, b, text)
                text = TextCondition.cat([neg, text])
                step_cond = type(cond).cat([method.unconditional(cond).expand(b), step_cond])
            # Every stream sees the same prompts and identity; the processors decide what each stream uses.
            text = TextCondition.cat([text] * streams)
            step_cond = type(cond).cat([step_cond] * streams)
            for seed in cfg.seeds:
                gen = torch.Generator("cpu").manual_seed(int(seed))
                noise = torch.randn(shape, generator=gen, dtype=torch.float32)
                scheduler.set_timesteps(cfg.num_inference_steps, device=device)
                latents = (noise.expand(streams * b, *shape[1:]) * scheduler.init_noise_sigma).to(device)
                for t in scheduler.timesteps:
                    per_stream = latents.chunk(streams)
                    model_in = torch.cat([x for lat in per_stream for x in ((lat, lat) if guided else (lat,))])
                    model_in = scheduler.scale_model_input(model_in, t).to(dtype)
                    pred = method.denoise(pipe, model_in, t, text, step_cond).float()
                    guided_preds = []
                    for p in pred.chunk(streams):
                        if guided:
                            p_uncond, p_cond = p.chunk(2)
                            p = p_uncond + cfg.guidance_scale * (p_cond - p_uncond)
                        guided_preds.append(p)
                    latents = scheduler.step(torch.cat(guided_preds), t, latents, generator=gen).prev_sample
                for i, img in enumerate(decode_latents(pipe, latents[:b])):
                    results[(start + i, int(seed))] = img
    finally:
        method.state.flags.clear()
        method.state.flags.update(flags_before)
        method.train(was_training)
    return [results[(p, int(s))] for p in range(len(prompts)) for s in cfg.seeds]
