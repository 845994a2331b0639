"""The Method interface every identity method implements (``Method``) and the behaviour they share (``BaseMethod``).

A method supplies modules, trainable parameters, a loss and a sampler; the loops (``idforge.train``, evaluation)
own devices, optimisers, Ray, checkpoints and MLflow. Identity always enters the UNet through diffusers attention
processors installed with ``unet.set_attn_processor``; the method's trainable weights live in ``method.modules``
(an ``nn.ModuleDict`` keyed by checkpoint prefix: ``mff``, ``adapter``, ``image_proj``, ...).

Where the rest lives: the data a method receives (``IdentityRefs``, ``TrainBatch``, ``Condition``,
``InjectionState``) in ``methods.types``, the diffusion objective in ``methods.objective``, checkpoint files in
``methods.checkpoint``, the shared sampler in ``methods.sampling``, names -> classes in ``methods.registry``.

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
import logging
from collections.abc import Iterator, Mapping, Sequence
from typing import TYPE_CHECKING, Any, ClassVar, Literal, Protocol, runtime_checkable

import torch
from pydantic import Field, ValidationError
from torch import Tensor, nn

from idforge.config_section import Section
from idforge.diffusion import attention
from idforge.errors import ConfigError
from idforge.methods.sampling import SamplingConfig, sample
from idforge.methods.types import Condition, IdentityRefs, InjectionState, TrainBatch

if TYPE_CHECKING:
    from PIL.Image import Image

__all__ = ["Regime", "MethodConfig", "Method", "BaseMethod", "TrainingModule", "check_state_keys"]

log = logging.getLogger(__name__)

Regime = Literal["population", "per-identity"]


# ----------------------------------------------------------------------------------------------------------------
# configs


class MethodConfig(Section):
    """Base of every method's typed config. Subclasses add their own fields (sizes, switches, loss weights)."""

    scale: float = Field(default=1.0, description="identity strength at run time; 0 = the base model exactly")

    # field -> (prepared tensor, axis of its per-item shape): sizes the prepared data decides (``for_data``)
    data_dims: ClassVar[dict[str, tuple[str, int]]] = {}

    @classmethod
    def for_data(cls, user: Mapping[str, Any], shapes: Mapping[str, Sequence[int]]) -> dict[str, Any]:
        """``user``'s config values plus, for each ``data_dims`` field the user left unset, its size read from the
        prepared data's per-item tensor ``shapes`` (``{"face_embed": [512], "clip_patch_tokens": [257, 1024]}``)."""
        out = dict(user)
        for name, (tensor, axis) in cls.data_dims.items():
            if name not in out and tensor in shapes:
                out[name] = int(shapes[tensor][axis])
        return out


# ----------------------------------------------------------------------------------------------------------------
# the protocol


@runtime_checkable
class Method(Protocol):
    """What the trainer, generator, evaluator and pipelines rely on. See ``BaseMethod`` for the shared behaviour."""

    name: ClassVar[str]
    regime: ClassVar[Regime]
    config: MethodConfig
    modules: nn.ModuleDict  # the trainable weights, keyed by checkpoint prefix (what DDP wraps and EMA tracks)
    refs_per_item: int  # references per training item the data sampling defaults to
    ref_includes_target: ClassVar[bool]  # may the target image be one of its own references

    def attach(self, pipe: Any) -> None: ...
    def detach(self, pipe: Any | None = None) -> None: ...
    def train(self, mode: bool = True) -> Method: ...
    def eval(self) -> Method: ...
    def trainable_parameters(self) -> list[nn.Parameter]: ...
    def training_loss(self, batch: TrainBatch, pipe: Any, *, generator: torch.Generator | None = None
                      ) -> dict[str, Tensor]:
        """{"loss": scalar to backpropagate, "diffusion": the plain denoising MSE (detached), other detached parts};
        ``generator`` draws the noise and timesteps (the loop passes each rank's own, checkpointed one)."""
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
    # How the training data samples references (the loop's defaults; ``train.refs_per_item`` and
    # ``train.ref_includes_target`` override them): references per item, and whether the target image itself
    # may be one of them. A method whose count comes from its config overrides ``refs_per_item`` with a property.
    refs_per_item: int = 1
    ref_includes_target: ClassVar[bool] = False

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
    def built_for(self) -> dict[str, Any] | None:
        """The ``arch_signature`` of the UNet the modules were built for; None before the first ``attach``."""
        return self._built_for

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
        original = dict(unet.attn_processors)
        processors = self.make_processors(pipe)
        attention.install(unet, processors)
        self._original_processors = original
        self._installed = dict(processors)  # our own references: set_attn_processor pops from what it is given
        self._unet = unet
        self.on_attach(pipe)

    def on_attach(self, pipe: Any) -> None:  # noqa: B027 - an optional hook, not an abstract method
        """Hook for subclasses (e.g. resolve class-noun token ids); default does nothing."""

    def detach(self, pipe: Any | None = None) -> None:
        """Restore the processors the UNet had before ``attach`` (the base model, bit for bit)."""
        if self._unet is None:
            return
        assert self._original_processors is not None
        attention.install(self._unet, self._original_processors)
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
# the strict key check


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
