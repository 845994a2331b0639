"""The Method interface every identity method implements, and the pieces they share.

A method supplies modules, trainable parameters, a loss and a sampler; the loops (``idforge.train``, evaluation)
own devices, optimisers, Ray, checkpoints and MLflow. Identity always enters the UNet through diffusers attention
processors installed with ``unet.set_attn_processor``; the method's trainable weights live in ``method.modules``
(an ``nn.ModuleDict`` keyed by checkpoint prefix: ``mff``, ``adapter``, ``image_proj``, ...).

Typical use by a loop::

    method = get_method("infinite-id", cfg_dict)      # typed config validated here
    method.attach(pipe)                                # builds modules for this UNet, installs processors
    opt = torch.optim.AdamW(method.trainable_parameters(), lr=...)
    out = method.training_loss(batch, pipe)            # {"loss": scalar, ...parts for logging}
    out["loss"].backward(); opt.step()
    save_method(method, "method.safetensors")
    ...
    method = load_method("method.safetensors", pipe)  # rebuilds, attaches, strict key check
    images = method.generate(pipe, ["a photo of a man"], method.identity_condition(refs, pipe), seeds=[0, 1])
"""

from __future__ import annotations

import abc
import contextlib
import json
import logging
import os
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Literal, Protocol, runtime_checkable

import torch
from pydantic import Field, ValidationError
from torch import Tensor, nn

from idforge.config_section import Section
from idforge.errors import ConfigError
from idforge.methods.registry import available_methods, get_method, method_class, register_method

if TYPE_CHECKING:
    from PIL.Image import Image

__all__ = [
    "Regime",
    "MethodConfig",
    "SamplingConfig",
    "IdentityRefs",
    "TrainBatch",
    "Condition",
    "InjectionState",
    "DiffusionOutput",
    "Method",
    "BaseMethod",
    "TrainingModule",
    "diffusion_loss",
    "predict_x0",
    "sample_timesteps",
    "training_scheduler",
    "check_state_keys",
    "save_method",
    "load_method",
    "read_method_metadata",
    "get_method",
    "available_methods",
    "method_class",
    "register_method",
]

log = logging.getLogger(__name__)

Regime = Literal["population", "per-identity"]
CHECKPOINT_FORMAT = "idforge.method/1"


# ----------------------------------------------------------------------------------------------------------------
# configs


class MethodConfig(Section):
    """Base of every method's typed config. Subclasses add their own fields (sizes, switches, loss weights)."""

    scale: float = Field(default=1.0, description="identity strength at run time; 0 = the base model exactly")


class SamplingConfig(Section):
    """Keyword arguments of ``Method.generate`` (validated, so a typo in ``--set`` fails loudly)."""

    seeds: list[int] = Field(default_factory=lambda: [0])
    num_inference_steps: int = Field(default=30, ge=1)
    guidance_scale: float = 5.0
    negative_prompt: str = ""
    height: int | None = None  # None = the UNet's native size (sample_size * vae_scale_factor)
    width: int | None = None
    batch_size: int = Field(default=4, ge=1, description="prompts per UNet batch (x2 with guidance)")


# ----------------------------------------------------------------------------------------------------------------
# data the methods receive


def _to(t: Tensor | None, device: Any = None, dtype: torch.dtype | None = None) -> Tensor | None:
    if t is None:
        return None
    if dtype is not None and t.is_floating_point():
        return t.to(device=device, dtype=dtype)
    return t.to(device=device)


@dataclass
class IdentityRefs:
    """Reference photos of ONE identity, already turned into features (by ``idforge.faces`` and CLIP).

    Every field has the reference index first (N references). Methods use what they need and raise
    ``ValueError`` naming the missing field otherwise.

    face_embeds:       (N, Dface) float32, L2-normalised identity embeddings (ArcFace 512-d by default).
    clip_image_embeds: (N, Dclip) float32, CLIP image embeddings (projected pooled output, ``image_embeds``).
    clip_patch_tokens: (N, P, Dvis) float32, CLIP vision hidden states of the penultimate layer, class token
                       first (P = 1 + (image_size / patch_size)^2, Dvis = vision hidden size).
    face_crops:        (N, 3, 112, 112) float32 in [0, 1], ArcFace-aligned RGB crops.
    class_noun:        the word of the prompt that stands for the person ("man", "woman", "person", ...).
    """

    face_embeds: Tensor | None = None
    clip_image_embeds: Tensor | None = None
    clip_patch_tokens: Tensor | None = None
    face_crops: Tensor | None = None
    class_noun: str = "person"

    def __post_init__(self) -> None:
        counts = {f.name: getattr(self, f.name).shape[0] for f in fields(self)
                  if isinstance(getattr(self, f.name), Tensor)}
        if not counts:
            raise ValueError("IdentityRefs needs at least one feature tensor (face_embeds, clip_image_embeds, ...)")
        if len(set(counts.values())) != 1:
            raise ValueError(f"IdentityRefs fields disagree on the number of references: {counts}")

    @property
    def num_refs(self) -> int:
        return next(getattr(self, f.name).shape[0] for f in fields(self) if isinstance(getattr(self, f.name), Tensor))

    def to(self, device: Any = None, dtype: torch.dtype | None = None) -> IdentityRefs:
        return replace(self, **{f.name: _to(getattr(self, f.name), device, dtype) for f in fields(self)
                                if isinstance(getattr(self, f.name), Tensor)})

    def require(self, *names: str) -> None:
        missing = [n for n in names if getattr(self, n) is None]
        if missing:
            raise ValueError(f"IdentityRefs is missing {', '.join(missing)}: compute them from the reference photos "
                             "(face embeddings with idforge.faces, CLIP features with the method's CLIP model)")


@dataclass
class TrainBatch:
    """One training batch as the loop feeds it (every tensor has the batch dimension B first).

    latents:           (B, 4, h, w) float, VAE latents of the target images ALREADY multiplied by
                       ``vae.config.scaling_factor``.
    input_ids:         (B, L) long, prompt token ids of the (first) tokenizer. Needed by methods that change the
                       text encoder's input (IDAdapter's textual injection); otherwise ``text_embeds`` suffices.
    input_ids_2:       (B, L) long, SDXL's second tokenizer.
    text_embeds:       (B, L, Dtext) float, cached ``encoder_hidden_states`` (SDXL: both encoders' penultimate
                       states concatenated, as the SDXL pipeline builds them).
    pooled_text_embeds:(B, Dpool) float, SDXL only: text_encoder_2's projected pooled output.
    add_time_ids:      (B, 6) float, SDXL only (original size, crop top-left, target size); default from latents.
    face_embeds:       (B, N, Dface) float32 L2-normalised identity embeddings of the N reference images.
    clip_image_embeds: (B, N, Dclip) float, projected pooled CLIP image embeddings of the references.
    clip_patch_tokens: (B, N, P, Dvis) float, CLIP vision penultimate hidden states of the references.
    face_mask:         (B, 1, h, w) float in [0, 1], face region at latent resolution (1 = face).
    ref_pixels:        (B, 3, 112, 112) float in [0, 1], an ArcFace-aligned reference crop (face identity loss
                       embeds it with the torch ArcFace when ``face_embeds`` are not ArcFace-512).
    target_kps:        (B, 5, 2) float, the 5 ArcFace landmarks of the TARGET image in pixel coordinates of the
                       image the latents encode (h*8 x w*8); the face identity loss aligns with them.
    identity:          (B,) long, identity index (for logging / mismatch tests).
    noise, timesteps:  optional fixed (B, 4, h, w) noise and (B,) long timesteps, for reproducible held-out losses.
    """

    latents: Tensor
    input_ids: Tensor | None = None
    input_ids_2: Tensor | None = None
    text_embeds: Tensor | None = None
    pooled_text_embeds: Tensor | None = None
    add_time_ids: Tensor | None = None
    face_embeds: Tensor | None = None
    clip_image_embeds: Tensor | None = None
    clip_patch_tokens: Tensor | None = None
    face_mask: Tensor | None = None
    ref_pixels: Tensor | None = None
    target_kps: Tensor | None = None
    identity: Tensor | None = None
    noise: Tensor | None = None
    timesteps: Tensor | None = None

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> TrainBatch:
        """Build from a collated dict, ignoring keys that are not fields (e.g. string metadata)."""
        names = {f.name for f in fields(cls)}
        if "latents" not in data:
            raise ValueError("a training batch needs 'latents' (B, 4, h, w)")
        return cls(**{k: v for k, v in data.items() if k in names})

    @property
    def batch_size(self) -> int:
        return int(self.latents.shape[0])

    def rows(self, start: int, stop: int) -> TrainBatch:
        """Samples ``start:stop`` of every batched tensor (for evaluating a large batch in pieces)."""
        return replace(self, **{f.name: None if (v := getattr(self, f.name)) is None else v[start:stop]
                                for f in fields(self)})

    def to(self, device: Any = None, dtype: torch.dtype | None = None) -> TrainBatch:
        """Move every tensor; floating tensors also take ``dtype`` when given (ids stay long)."""
        return replace(self, **{f.name: _to(getattr(self, f.name), device, dtype) for f in fields(self)})

    def require(self, *names: str) -> None:
        missing = [n for n in names if getattr(self, n) is None]
        if missing:
            raise ValueError(f"training batch is missing {', '.join(missing)} (the prepare stage must provide them "
                             "for this method)")

    def with_identity_of(self, other: TrainBatch) -> TrainBatch:
        """This batch's images and text with ``other``'s identity features (for mismatched-identity checks)."""
        ident = ("face_embeds", "clip_image_embeds", "clip_patch_tokens", "ref_pixels", "identity")
        return replace(self, **{n: getattr(other, n) for n in ident})


@dataclass
class Condition:
    """What ``identity_condition`` returns and ``generate`` consumes: named tensors, batch dimension first.

    ``tensors`` hold the identity tokens a method's processors read (e.g. ``{"tokens": (1, T, D)}``); ``meta`` holds
    small non-tensor facts (class noun, number of references). ``zeros_like`` is the unconditional branch of
    classifier-free guidance (IP-Adapter FaceID style: zeros of the identity input, run through the same modules).
    """

    method: str
    tensors: dict[str, Tensor]
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def batch_size(self) -> int:
        return int(next(iter(self.tensors.values())).shape[0])

    def to(self, device: Any = None, dtype: torch.dtype | None = None) -> Condition:
        return Condition(self.method, {k: _to(v, device, dtype) for k, v in self.tensors.items()}, dict(self.meta))

    def zeros_like(self) -> Condition:
        return Condition(self.method, {k: torch.zeros_like(v) for k, v in self.tensors.items()}, dict(self.meta))

    def expand(self, n: int) -> Condition:
        """Repeat a single-identity condition (batch 1) to batch ``n``."""
        if self.batch_size == n:
            return self
        if self.batch_size != 1:
            raise ValueError(f"cannot expand a condition of batch {self.batch_size} to {n}")
        return Condition(self.method, {k: v.expand(n, *v.shape[1:]) for k, v in self.tensors.items()}, dict(self.meta))

    @staticmethod
    def cat(conds: Sequence[Condition]) -> Condition:
        keys = conds[0].tensors.keys()
        return Condition(conds[0].method, {k: torch.cat([c.tensors[k] for c in conds]) for k in keys},
                         dict(conds[0].meta))


@dataclass
class InjectionState:
    """Mutable run-time state shared by a method and the attention processors it installed.

    The processors hold a reference to this object (not copies), so ``set_scale`` and the current identity
    tokens reach every layer at once without re-installing processors.
    """

    scale: float = 1.0
    context: dict[str, Tensor] = field(default_factory=dict)  # identity tokens for the current UNet call
    mode: str = "train"  # "train" | "infer": methods whose attention differs between the two read it
    flags: dict[str, Any] = field(default_factory=dict)


# ----------------------------------------------------------------------------------------------------------------
# the diffusion objective


@dataclass
class DiffusionOutput:
    """Everything a method may need after one denoising prediction (all (B, ...) tensors)."""

    loss: Tensor  # scalar, mean squared error to the target
    model_pred: Tensor
    target: Tensor
    noisy_latents: Tensor
    noise: Tensor
    timesteps: Tensor


def training_scheduler(pipe: Any):
    """A DDPM scheduler with the pipeline scheduler's training config (betas, T, prediction_type).

    Inference schedulers (DPM-Solver, Euler) share ``add_noise`` semantics only loosely; training always uses the
    DDPM forward process the base model was trained with.
    """
    from diffusers import DDPMScheduler

    return DDPMScheduler.from_config(pipe.scheduler.config)


def sample_timesteps(scheduler: Any, batch_size: int, device: Any = "cpu", generator: torch.Generator | None = None,
                     t_min: int = 0, t_max: int | None = None) -> Tensor:
    """(B,) long timesteps uniform in [t_min, t_max) (t_max defaults to the scheduler's T)."""
    t_max = int(scheduler.config.num_train_timesteps) if t_max is None else t_max
    if not 0 <= t_min < t_max:
        raise ValueError(f"timestep window [{t_min}, {t_max}) is empty")
    gen_device = generator.device if generator is not None else "cpu"
    t = torch.randint(t_min, t_max, (batch_size,), generator=generator, device=gen_device)
    return t.to(device)


def diffusion_loss(
    denoise: Callable[[Tensor, Tensor], Tensor],
    latents: Tensor,
    scheduler: Any,
    *,
    noise: Tensor | None = None,
    timesteps: Tensor | None = None,
    generator: torch.Generator | None = None,
    t_min: int = 0,
    t_max: int | None = None,
    mask: Tensor | None = None,
) -> DiffusionOutput:
    """Noise ``latents``, predict with ``denoise(noisy_latents, timesteps)``, MSE to the scheduler's target.

    The target follows ``scheduler.config.prediction_type``: ``epsilon`` -> the noise, ``v_prediction`` -> the
    velocity, ``sample`` -> the clean latents. ``mask`` (B, 1, h, w) weights the per-pixel error (mean over the
    weighted area). The loss is computed in float32 whatever the autocast dtype.
    """
    if noise is None:
        gen_device = generator.device if generator is not None else latents.device
        noise = torch.randn(latents.shape, generator=generator, device=gen_device, dtype=latents.dtype)
        noise = noise.to(latents.device)
    if timesteps is None:
        timesteps = sample_timesteps(scheduler, latents.shape[0], latents.device, generator, t_min, t_max)
    timesteps = timesteps.to(latents.device).long()
    noisy = scheduler.add_noise(latents, noise, timesteps)
    kind = scheduler.config.prediction_type
    if kind == "epsilon":
        target = noise
    elif kind == "v_prediction":
        target = scheduler.get_velocity(latents, noise, timesteps)
    elif kind == "sample":
        target = latents
    else:
        raise ValueError(f"unsupported scheduler prediction_type {kind!r}")
    pred = denoise(noisy, timesteps)
    err = (pred.float() - target.float()) ** 2
    if mask is not None:
        w = mask.float().expand_as(err)
        loss = (err * w).sum() / w.sum().clamp_min(1e-8)
    else:
        loss = err.mean()
    return DiffusionOutput(loss, pred, target, noisy, noise, timesteps)


def predict_x0(scheduler: Any, noisy_latents: Tensor, model_pred: Tensor, timesteps: Tensor) -> Tensor:
    """The clean latents implied by one prediction (differentiable): x0 = (x_t - sqrt(1-a) eps) / sqrt(a)."""
    acp = scheduler.alphas_cumprod.to(device=noisy_latents.device, dtype=torch.float32)[timesteps.long()]
    a = acp.view(-1, *([1] * (noisy_latents.ndim - 1)))
    x_t, pred = noisy_latents.float(), model_pred.float()
    kind = scheduler.config.prediction_type
    if kind == "epsilon":
        return (x_t - (1 - a).sqrt() * pred) / a.sqrt()
    if kind == "v_prediction":
        return a.sqrt() * x_t - (1 - a).sqrt() * pred
    if kind == "sample":
        return pred
    raise ValueError(f"unsupported scheduler prediction_type {kind!r}")


# ----------------------------------------------------------------------------------------------------------------
# the protocol


@runtime_checkable
class Method(Protocol):
    """What the trainer, generator, evaluator and pipelines rely on. See ``BaseMethod`` for the shared behaviour."""

    name: ClassVar[str]
    regime: ClassVar[Regime]
    config: MethodConfig

    def attach(self, pipe: Any) -> None: ...
    def detach(self, pipe: Any | None = None) -> None: ...
    def trainable_parameters(self) -> Iterable[nn.Parameter]: ...
    def training_loss(self, batch: TrainBatch, pipe: Any) -> dict[str, Tensor]:
        """{"loss": scalar to backpropagate, "diffusion": the plain denoising MSE (detached), other detached parts}."""
        ...

    def identity_condition(self, refs: IdentityRefs, pipe: Any) -> Condition: ...
    def generate(self, pipe: Any, prompts: Sequence[str], cond: Condition, **sampling: Any) -> list[Image]: ...
    def state_dict(self) -> dict[str, Tensor]: ...
    def load_state_dict(self, sd: Mapping[str, Tensor]) -> None: ...
    def set_scale(self, scale: float) -> None: ...


class BaseMethod(abc.ABC):
    """Shared behaviour: config handling, module ownership, attach/detach of processors, scale, state dicts,
    the sampler. A subclass sets ``name``, ``regime``, ``Config`` and implements ``build``, ``make_processors``,
    ``training_loss`` and ``identity_condition`` (and may override ``encode_prompts`` / ``denoise`` for sampling).
    """

    name: ClassVar[str] = ""
    regime: ClassVar[Regime] = "population"
    Config: ClassVar[type[MethodConfig]] = MethodConfig

    def __init__(self, config: MethodConfig | None = None) -> None:
        self.config = config if config is not None else self.Config()
        if not isinstance(self.config, self.Config):
            raise TypeError(f"{type(self).__name__} needs a {self.Config.__name__}, got {type(self.config).__name__}")
        self.modules = nn.ModuleDict()
        self.state = InjectionState(scale=float(self.config.scale))
        self._built_for: dict[str, Any] | None = None
        self._original_processors: dict[str, Any] | None = None
        self._installed: dict[str, Any] = {}
        self._unet: nn.Module | None = None
        self._pending_state: dict[str, Tensor] | None = None

    # -- construction -------------------------------------------------------------------------------------------

    @classmethod
    def from_config(cls, config: MethodConfig | Mapping[str, Any] | None = None, **overrides: Any) -> BaseMethod:
        """Validate ``config`` (object or mapping) plus keyword overrides into ``cls.Config``; build the method."""
        if isinstance(config, MethodConfig):
            data = config.model_dump()
        else:
            data = dict(config or {})
        data.update(overrides)
        try:
            cfg = cls.Config.model_validate(data)
        except ValidationError as exc:
            from idforge.config import format_validation_error

            raise ConfigError(format_validation_error(exc, cls.Config, f"method {cls.name!r} config")) from None
        return cls(cfg)

    @abc.abstractmethod
    def build(self, pipe: Any) -> None:
        """Create ``self.modules`` for this pipeline's UNet (sizes from the UNet config + the method config)."""

    @abc.abstractmethod
    def make_processors(self, pipe: Any) -> dict[str, Any]:
        """Processors to install, keyed by ``...attn1.processor`` names; only the ones that change are needed."""

    @staticmethod
    def arch_signature(unet: nn.Module) -> dict[str, Any]:
        """The UNet facts module shapes depend on (a checkpoint only loads onto a UNet with the same ones)."""
        c = unet.config
        return {
            "block_out_channels": list(c.block_out_channels),
            "cross_attention_dim": c.cross_attention_dim,
            "attention_processors": len(unet.attn_processors),
        }

    # -- attaching ----------------------------------------------------------------------------------------------

    @property
    def is_attached(self) -> bool:
        return self._unet is not None

    def attach(self, pipe: Any) -> None:
        """Build modules (first time), move them to the UNet's device, and install this method's processors.

        Raises:
            ValueError: already attached, or the modules were built for a UNet of another shape.
        """
        if self.is_attached:
            raise ValueError(f"method {self.name!r} is already attached; detach() first")
        unet = pipe.unet
        sig = self.arch_signature(unet)
        if self._built_for is None:
            self.build(pipe)
            self._built_for = sig
        elif sig != self._built_for:
            raise ValueError(f"method {self.name!r} was built for a UNet with {self._built_for}, "
                             f"this pipeline's UNet has {sig}")
        # Trainable weights stay float32 (autocast handles bf16 compute); they live where the UNet lives.
        self.modules.to(device=unet.device, dtype=torch.float32)
        if self._pending_state is not None:
            pending, self._pending_state = self._pending_state, None
            self.load_state_dict(pending)
        self._original_processors = dict(unet.attn_processors)
        processors = self.make_processors(pipe)
        unknown = sorted(set(processors) - set(self._original_processors))
        if unknown:
            raise ValueError(f"processor names not in this UNet: {unknown[:3]}")
        full = {**self._original_processors, **processors}
        self._installed = dict(processors)  # our own references: set_attn_processor pops from what it is given
        unet.set_attn_processor(dict(full))
        self._unet = unet
        self.on_attach(pipe)

    def on_attach(self, pipe: Any) -> None:  # noqa: B027 - an optional hook, not an abstract method
        """Hook for subclasses (e.g. resolve class-noun token ids); default does nothing."""

    def detach(self, pipe: Any | None = None) -> None:
        """Restore the processors the UNet had before ``attach`` (the base model, bit for bit)."""
        if self._unet is None:
            return
        assert self._original_processors is not None
        self._unet.set_attn_processor(dict(self._original_processors))
        self._unet = None
        self._installed = {}
        self._original_processors = None

    @property
    def processors(self) -> dict[str, Any]:
        """The processors this method installed (by name); empty when detached."""
        return dict(self._installed)

    # -- parameters, modes, scale -----------------------------------------------------------------------------

    def trainable_parameters(self) -> list[nn.Parameter]:
        return [p for p in self.modules.parameters() if p.requires_grad]

    def num_trainable_parameters(self) -> int:
        return sum(p.numel() for p in self.trainable_parameters())

    def train(self, mode: bool = True) -> BaseMethod:
        """Training mode for the method's modules and its processors (``state.mode``).

        Switching to inference also drops the identity left by the last ``training_loss`` (see
        ``set_training_context``), so a later plain UNet call does not see a stale identity.
        """
        self.modules.train(mode)
        self.state.mode = "train" if mode else "infer"
        if not mode:
            self.state.context = {}
        return self

    def eval(self) -> BaseMethod:
        return self.train(False)

    def to(self, device: Any = None, dtype: torch.dtype | None = None) -> BaseMethod:
        self.modules.to(device=device, dtype=dtype)
        return self

    @property
    def device(self) -> torch.device:
        p = next(self.modules.parameters(), None)
        return p.device if p is not None else torch.device("cpu")

    def set_scale(self, scale: float) -> None:
        """Identity strength at run time (every installed processor reads it). 0 gives the base model exactly."""
        self.state.scale = float(scale)

    @property
    def scale(self) -> float:
        return self.state.scale

    @contextlib.contextmanager
    def conditioning(self, cond: Condition | Mapping[str, Tensor]) -> Iterator[None]:
        """Make ``cond``'s tensors the identity context of every UNet call inside the block."""
        tensors = cond.tensors if isinstance(cond, Condition) else dict(cond)
        previous = self.state.context
        self.state.context = tensors
        try:
            yield
        finally:
            self.state.context = previous

    def set_training_context(self, tensors: Mapping[str, Tensor]) -> None:
        """Make ``tensors`` the identity context for a training forward AND its backward.

        Unlike ``conditioning`` it is not undone on exit: with gradient checkpointing the UNet re-runs the
        processors during ``backward()``, and they must see the same identity then. The next call replaces it.
        """
        self.state.context = dict(tensors)

    # -- state dicts --------------------------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Tensor]:
        """Trainable weights only, keys prefixed by module (``mff.``, ``adapter.``, ``image_proj.``...)."""
        return {k: v for k, v in self.modules.state_dict().items()}

    def load_state_dict(self, sd: Mapping[str, Tensor]) -> None:
        """Strictly load weights; before the modules exist (not attached yet) they are kept and loaded at attach.

        Raises:
            ValueError: missing or unexpected keys, or a shape mismatch (the message names them).
        """
        if self._built_for is None:
            self._pending_state = dict(sd)
            return
        expected = self.modules.state_dict()
        check_state_keys(expected, sd, source=f"method {self.name!r}")
        self.modules.load_state_dict(dict(sd), strict=True)

    # -- abstract method behaviour ------------------------------------------------------------------------------

    @abc.abstractmethod
    def training_loss(self, batch: TrainBatch, pipe: Any, *, generator: torch.Generator | None = None
                      ) -> dict[str, Tensor]:
        """``{"loss": scalar tensor, ...detached parts for logging}`` for one batch (method in train mode)."""

    @abc.abstractmethod
    def identity_condition(self, refs: IdentityRefs, pipe: Any) -> Condition:
        """Reference features of one identity -> the condition ``generate`` consumes (batch 1)."""

    # -- sampling -----------------------------------------------------------------------------------------------

    def encode_prompts(self, pipe: Any, prompts: Sequence[str], cond: Condition | None) -> Any:
        """Prompts -> ``idforge.diffusion.text.TextCondition``. ``cond`` is None for the negative prompt.

        Methods that put identity into the text (textual injection) override this.
        """
        from idforge.diffusion.text import encode_prompts

        return encode_prompts(pipe, prompts)

    def unconditional(self, cond: Condition) -> Condition:
        """The identity condition of the unconditional guidance branch (default: zeros of ``cond``).

        Methods whose condition holds encoder *outputs* override this to run zeros of the *inputs* through their
        modules (IP-Adapter FaceID style).
        """
        return cond.zeros_like()

    def sampling_streams(self) -> int:
        """Latent streams the sampler runs per prompt (1; Infinite-ID's mixed attention adds a text-only stream).

        With S streams the UNet batch is ``cat([stream_0, ..., stream_{S-1}])``, each stream laid out as
        ``[uncond rows, cond rows]`` under guidance; ``state.flags["streams"]`` tells the processors S. Every stream
        starts from the same noise; only stream 0 is decoded.
        """
        return 1

    def denoise(self, pipe: Any, latents: Tensor, t: Tensor, text: Any, cond: Condition) -> Tensor:
        """One UNet prediction for a sampling step with identity ``cond`` (batch of ``latents``)."""
        from idforge.diffusion.text import unet_call

        with self.conditioning(cond):
            return unet_call(pipe, latents, t, text)

    def generate(self, pipe: Any, prompts: Sequence[str], cond: Condition, **sampling: Any) -> list[Image]:
        """Images for every (prompt, seed): ``len(prompts) * len(seeds)`` PIL images, prompt-major.

        Deterministic per seed: each seed fixes the initial latents (shared by the prompts of that seed) and the
        sampler's noise. Classifier-free guidance uses the negative prompt with ``cond.zeros_like()``.
        See ``SamplingConfig`` for the keyword arguments.
        """
        from idforge.methods.sampling import sample

        try:
            cfg = SamplingConfig.model_validate(sampling)
        except ValidationError as exc:
            from idforge.config import format_validation_error

            raise ConfigError(format_validation_error(exc, SamplingConfig, "sampling arguments")) from None
        return sample(self, pipe, list(prompts), cond, cfg)


class TrainingModule(nn.Module):
    """An ``nn.Module`` whose forward is ``method.training_loss`` (for DDP: wrap this, not the UNet).

    Only ``method.modules`` is registered as a submodule, so DDP broadcasts and all-reduces just the method's
    weights; the frozen pipeline is referenced, not owned. Build it after ``method.attach(pipe)`` (the modules are
    created there).
    """

    def __init__(self, method: BaseMethod, pipe: Any) -> None:
        super().__init__()
        self.method_modules = method.modules
        self._method = method
        self._pipe = pipe

    def forward(self, batch: TrainBatch, generator: torch.Generator | None = None) -> dict[str, Tensor]:
        return self._method.training_loss(batch, self._pipe, generator=generator)


# ----------------------------------------------------------------------------------------------------------------
# checkpoints


def check_state_keys(expected: Mapping[str, Tensor], got: Mapping[str, Tensor], source: str = "checkpoint") -> None:
    """Raise ``ValueError`` naming missing/unexpected keys and shape mismatches between two state dicts."""
    missing = sorted(set(expected) - set(got))
    unexpected = sorted(set(got) - set(expected))
    shapes = sorted(k for k in set(expected) & set(got) if tuple(expected[k].shape) != tuple(got[k].shape))
    problems = []
    if missing:
        problems.append(f"missing keys {_short(missing)}")
    if unexpected:
        problems.append(f"unexpected keys {_short(unexpected)}")
    if shapes:
        problems.append("shape mismatch " + ", ".join(
            f"{k}: expected {tuple(expected[k].shape)}, got {tuple(got[k].shape)}" for k in shapes[:5]))
    if problems:
        raise ValueError(f"{source}: " + "; ".join(problems))


def _short(keys: list[str], n: int = 8) -> str:
    more = f" (+{len(keys) - n} more)" if len(keys) > n else ""
    return "[" + ", ".join(keys[:n]) + "]" + more


def save_method(method: BaseMethod, path: str | os.PathLike[str]) -> Path:
    """Write the method's weights as safetensors, with its name, config and UNet signature as JSON metadata.

    Written atomically (temp file then rename). Tensors are saved contiguous on CPU in their own dtype.
    """
    from safetensors.torch import save_file

    from idforge.io.atomic import atomic_path

    if method._built_for is None:
        raise ValueError(f"method {method.name!r} has no weights yet: attach it to a pipeline first")
    sd = {k: v.detach().to("cpu").contiguous() for k, v in method.state_dict().items()}
    metadata = {
        "format": CHECKPOINT_FORMAT,
        "method": method.name,
        "config": json.dumps(method.config.model_dump(mode="json"), sort_keys=True),
        "unet": json.dumps(method._built_for, sort_keys=True),
    }
    path = Path(path)
    with atomic_path(path) as tmp:
        save_file(sd, str(tmp), metadata=metadata)
    return path


def read_method_metadata(path: str | os.PathLike[str]) -> dict[str, Any]:
    """``{"method": name, "config": dict, "unet": dict}`` of a checkpoint written by ``save_method``."""
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"method checkpoint {path} does not exist")
    with safe_open(str(path), framework="pt") as fh:
        meta = fh.metadata() or {}
    if meta.get("format") != CHECKPOINT_FORMAT:
        raise ValueError(f"{path} is not an idforge method checkpoint (metadata format={meta.get('format')!r}, "
                         f"expected {CHECKPOINT_FORMAT!r}); write it with idforge.methods.base.save_method")
    return {"method": meta["method"], "config": json.loads(meta["config"]), "unet": json.loads(meta["unet"])}


def load_method(path: str | os.PathLike[str], pipe: Any | None = None, **config_overrides: Any) -> BaseMethod:
    """Rebuild a method from ``save_method``'s file. With ``pipe`` it is attached and loaded now (strict key and
    shape check, ``ValueError`` naming offenders); without, the weights load strictly at ``attach``.

    ``config_overrides`` change inference-time options (e.g. ``mixed_attention=False``); shape-defining keys must
    match the checkpoint or the strict check fails.
    """
    from safetensors.torch import load_file

    meta = read_method_metadata(path)
    method = get_method(meta["method"], meta["config"], **config_overrides)
    sd = load_file(str(path))
    method.load_state_dict(sd)  # pending until attach: the module shapes come from the UNet
    if pipe is not None:
        method.attach(pipe)
    return method
