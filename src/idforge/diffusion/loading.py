"""Load base diffusion pipelines and CLIP models from a local directory or a hub id, offline by default.

A local directory is used as is. A hub id is looked up in the Hugging Face cache only (``local_files_only=True``,
the default: no machine of ours reaches a hub), so nothing here waits on the network. Whatever goes wrong becomes
one ``ModelNotFoundError`` line naming the id and how to provide the model; the loading itself is diffusers' and
transformers' own ``from_pretrained``.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple

from idforge.errors import ConfigError, IdforgeError, ModelNotFoundError
from idforge.logs import quiet_known_notices

if TYPE_CHECKING:
    import torch

log = logging.getLogger(__name__)

PIPELINE_KINDS = ("auto", "sd15", "sd21", "sdxl")
DTYPES = ("float32", "float16", "bfloat16")
DESCRIBE_KINDS = ("pipeline", "clip") + PIPELINE_KINDS

# Exceptions from_pretrained and huggingface_hub raise for a model that is missing, partial or unreachable.
# (LocalEntryNotFoundError and OfflineModeIsEnabled are OSErrors; HFValidationError is a ValueError.)
_LOAD_ERRORS: tuple[type[BaseException], ...] = (OSError, ValueError, KeyError, EnvironmentError)


def _first_line(exc: BaseException, limit: int = 200) -> str:
    text = str(exc).strip().splitlines()
    line = text[0] if text else type(exc).__name__
    return line if len(line) <= limit else line[: limit - 3] + "..."


def _looks_local(id_or_path: str) -> bool:
    """True for strings meant as filesystem paths: starting with ``/``, ``.`` or ``~``, or with more than one ``/``.

    Hub ids are ``name`` or ``owner/name``; anything that exists on disk is a path too.
    """
    return id_or_path.startswith(("/", ".", "~")) or id_or_path.count("/") > 1 or Path(id_or_path).exists()


def _how_to_fix(config_key: str) -> str:
    tiny = " --kind clip" if config_key == "model.clip" else ""
    return (
        f"provide a local directory with --set {config_key}=/path/to/dir "
        f"(or build a tiny test model with `idforge models make-tiny DIR{tiny}`)"
    )


def resolve_model(
    id_or_path: str | os.PathLike[str],
    local_files_only: bool = True,
    revision: str | None = None,
    cache_dir: str | os.PathLike[str] | None = None,
    config_key: str = "model.base",
) -> str | Path:
    """Where ``from_pretrained`` should read ``id_or_path`` from.

    Returns a local ``Path`` (an existing directory, or the cached snapshot of a hub id), or, only when
    ``local_files_only`` is False and the id is not cached, the hub id itself for ``from_pretrained`` to fetch.
    Raises ``ModelNotFoundError`` (one line) for a missing path, a file that is not a model directory, a malformed
    id, or an id that is not cached while offline. ``config_key`` is the setting named in the fix-it hint.
    """
    raw = os.fspath(id_or_path).strip()
    if not raw:
        raise ModelNotFoundError(f"empty model id; {_how_to_fix(config_key)}")
    if isinstance(id_or_path, Path) or _looks_local(raw):
        path = Path(raw).expanduser()
        if not path.exists():
            raise ModelNotFoundError(
                f"model path {raw} does not exist; pass an existing model directory with "
                f"--set {config_key}=/path/to/dir "
                f"(or create one with `idforge models make-tiny {raw}`)"
            )
        if not path.is_dir():
            raise ModelNotFoundError(
                f"model path {raw} is a file, not a model directory (save_pretrained layout); "
                f"pass the directory that holds it with --set {config_key}=/path/to/dir"
            )
        return path.resolve()

    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HFValidationError
    from huggingface_hub.utils import validate_repo_id

    try:
        validate_repo_id(raw)
    except HFValidationError as exc:
        raise ModelNotFoundError(
            f"model {raw!r} is neither an existing directory nor a valid hub id ({_first_line(exc)}); "
            f"{_how_to_fix(config_key)}"
        ) from exc
    try:
        # Cache only: never touches the network, so it cannot hang offline.
        snapshot = snapshot_download(raw, revision=revision, cache_dir=cache_dir, local_files_only=True)
        return Path(snapshot)
    except _LOAD_ERRORS as exc:
        if not local_files_only:
            log.info("model %s is not cached; from_pretrained will try the hub", raw)
            return raw
        raise ModelNotFoundError(
            f"model {raw!r} is not a local directory and not in the Hugging Face cache, and no hub is reachable "
            f"from here (local_files_only); {_how_to_fix(config_key)}"
        ) from exc


def _read_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ModelNotFoundError(f"cannot read {path}: {_first_line(exc)}") from exc


def _check_dtype(dtype: str) -> None:
    if dtype not in DTYPES:
        raise ConfigError(f"dtype={dtype!r} is not one of {', '.join(DTYPES)}; set model.dtype to one of them")


def _torch_dtype(dtype: str) -> torch.dtype:
    _check_dtype(dtype)
    import torch

    return getattr(torch, dtype)


def _check_kind(kind: str) -> None:
    if kind not in PIPELINE_KINDS:
        allowed = ", ".join(PIPELINE_KINDS)
        raise ConfigError(f"model kind={kind!r} is not one of {allowed}; set model.kind to one of them")


def pipeline_kind(model_dir: str | os.PathLike[str], kind: str = "auto", label: str | None = None) -> str:
    """``"sd"`` or ``"sdxl"``: the family of the diffusers pipeline directory, checked against ``kind``.

    ``kind="auto"`` reads ``_class_name`` from ``model_index.json``; an explicit ``sd15``/``sd21``/``sdxl`` must agree
    with it. Raises ``ModelNotFoundError`` when the directory is not a pipeline, ``ConfigError`` on a mismatch.
    """
    _check_kind(kind)
    label = label or os.fspath(model_dir)
    index = Path(model_dir) / "model_index.json"
    if not index.is_file():
        raise ModelNotFoundError(
            f"model {label} has no model_index.json, so it is not a diffusers pipeline directory; "
            "point model.base at one (StableDiffusionPipeline.save_pretrained layout) "
            "or run `idforge models make-tiny DIR`"
        )
    class_name = str(_read_json(index).get("_class_name", ""))
    if class_name.startswith("StableDiffusionXL"):
        family = "sdxl"
    elif class_name.startswith("StableDiffusion"):
        family = "sd"
    else:
        raise ConfigError(
            f"model {label} is a {class_name or 'pipeline without _class_name'}, not a Stable Diffusion (1.x/2.x/XL) "
            "pipeline; point model.base at an SD1.5, SD2.1 or SDXL model"
        )
    wanted = {"auto": family, "sd15": "sd", "sd21": "sd", "sdxl": "sdxl"}[kind]
    if wanted != family:
        raise ConfigError(
            f"model.kind={kind} but model {label} is a {class_name}; set model.kind=auto or "
            f"{'sdxl' if family == 'sdxl' else 'sd15'}"
        )
    return family


def load_pipeline(
    id_or_path: str | os.PathLike[str],
    kind: str = "auto",
    dtype: str = "float32",
    device: str = "cpu",
    local_files_only: bool = True,
    revision: str | None = None,
    cache_dir: str | os.PathLike[str] | None = None,
) -> Any:
    """A ``StableDiffusionPipeline`` (sd15/sd21) or ``StableDiffusionXLPipeline`` (sdxl) via ``from_pretrained``.

    ``kind="auto"`` picks the class from ``model_index.json``. The safety checker is not loaded: evaluation scores
    every image, and a blacked-out image would silently corrupt identity metrics. Raises ``ModelNotFoundError``
    (one line) when the model cannot be found or loaded, ``ConfigError`` for a bad kind/dtype.
    """
    quiet_known_notices()
    label = os.fspath(id_or_path)
    _check_kind(kind)
    _check_dtype(dtype)
    # Resolve before importing torch/diffusers: a missing model fails in milliseconds.
    source = resolve_model(id_or_path, local_files_only=local_files_only, revision=revision, cache_dir=cache_dir)
    torch_dtype = _torch_dtype(dtype)
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

    if isinstance(source, Path):
        family = pipeline_kind(source, kind, label=label)
    else:  # a hub id from_pretrained will fetch (local_files_only=False): trust an explicit kind, default to SD
        family = "sdxl" if kind == "sdxl" else "sd"
    cls = StableDiffusionXLPipeline if family == "sdxl" else StableDiffusionPipeline
    extra: dict[str, Any] = {}
    if cls is StableDiffusionPipeline:
        extra = {"safety_checker": None, "requires_safety_checker": False}
    try:
        pipe = cls.from_pretrained(
            source,
            dtype=torch_dtype,
            local_files_only=local_files_only,
            revision=None if isinstance(source, Path) else revision,
            cache_dir=cache_dir,
            **extra,
        )
    except IdforgeError:
        raise
    except _LOAD_ERRORS as exc:
        raise ModelNotFoundError(
            f"cannot load {cls.__name__} from {label}: {_first_line(exc)}; {_how_to_fix('model.base')}"
        ) from exc
    log.info("loaded %s from %s (%s, %s)", cls.__name__, label, dtype, device)
    return pipe.to(device)


def freeze_pipeline(pipe: Any) -> Any:
    """Freeze the base model: ``requires_grad=False`` and eval mode on the UNet, VAE and text encoders, so a
    backward pass through them leaves no ``.grad`` (and allocates none) on any base weight. Returns ``pipe``."""
    for name in ("unet", "vae", "text_encoder", "text_encoder_2"):
        module = getattr(pipe, name, None)
        if module is not None:
            module.requires_grad_(False).eval()
    return pipe


@dataclass
class Components:
    """The pieces a training loop drives separately. ``text_encoder_2``/``tokenizer_2`` are None for SD1.x/2.x.

    ``scheduler`` is the inference scheduler saved with the model; ``noise_scheduler`` a ``DDPMScheduler`` over the
    same noise schedule, for adding noise and computing targets in training.
    """

    kind: str  # "sd" | "sdxl"
    unet: Any
    vae: Any
    text_encoder: Any
    tokenizer: Any
    scheduler: Any
    noise_scheduler: Any
    text_encoder_2: Any = None
    tokenizer_2: Any = None

    @property
    def vae_scale_factor(self) -> int:
        """Pixels per latent cell along one side (8 for SD and the tiny models)."""
        return 2 ** (len(self.vae.config.block_out_channels) - 1)


def load_components(
    id_or_path: str | os.PathLike[str],
    kind: str = "auto",
    dtype: str = "float32",
    device: str = "cpu",
    local_files_only: bool = True,
    revision: str | None = None,
    cache_dir: str | os.PathLike[str] | None = None,
) -> Components:
    """UNet, VAE, text encoder(s), tokenizer(s) and schedulers of a pipeline, loaded as :func:`load_pipeline` does."""
    quiet_known_notices()
    from diffusers import DDPMScheduler, StableDiffusionXLPipeline

    pipe = load_pipeline(
        id_or_path, kind=kind, dtype=dtype, device=device, local_files_only=local_files_only, revision=revision,
        cache_dir=cache_dir,
    )  # fmt: skip
    return Components(
        kind="sdxl" if isinstance(pipe, StableDiffusionXLPipeline) else "sd",
        unet=pipe.unet,
        vae=pipe.vae,
        text_encoder=pipe.text_encoder,
        tokenizer=pipe.tokenizer,
        scheduler=pipe.scheduler,
        noise_scheduler=DDPMScheduler.from_config(pipe.scheduler.config),
        text_encoder_2=getattr(pipe, "text_encoder_2", None),
        tokenizer_2=getattr(pipe, "tokenizer_2", None),
    )


class ClipBundle(NamedTuple):
    """A CLIP model in eval mode, its tokenizer and its image processor (unpacks as a 3-tuple)."""

    model: Any  # transformers.CLIPModel
    tokenizer: Any  # transformers.CLIPTokenizer
    image_processor: Any  # transformers.CLIPImageProcessor: PIL/np images -> (B, 3, S, S) normalised pixel_values


def load_clip(
    id_or_path: str | os.PathLike[str],
    dtype: str = "float32",
    device: str = "cpu",
    local_files_only: bool = True,
    revision: str | None = None,
    cache_dir: str | os.PathLike[str] | None = None,
) -> ClipBundle:
    """``CLIPModel``, ``CLIPTokenizer`` and ``CLIPImageProcessor`` from one directory or hub id (all three files).

    Raises ``ModelNotFoundError`` (one line, naming ``model.clip``) when any of them cannot be found or loaded.
    """
    quiet_known_notices()
    label = os.fspath(id_or_path)
    _check_dtype(dtype)
    source = resolve_model(
        id_or_path, local_files_only=local_files_only, revision=revision, cache_dir=cache_dir, config_key="model.clip"
    )
    torch_dtype = _torch_dtype(dtype)
    if isinstance(source, Path) and not (source / "config.json").is_file():
        raise ModelNotFoundError(
            f"CLIP model {label} has no config.json, so it is not a CLIPModel directory; {_how_to_fix('model.clip')}"
        )
    from transformers import CLIPImageProcessor, CLIPModel, CLIPTokenizer

    kwargs: dict[str, Any] = {"local_files_only": local_files_only, "cache_dir": cache_dir}
    if not isinstance(source, Path):
        kwargs["revision"] = revision
    try:
        model = CLIPModel.from_pretrained(source, dtype=torch_dtype, **kwargs)
        tokenizer = CLIPTokenizer.from_pretrained(source, **kwargs)
        processor = CLIPImageProcessor.from_pretrained(source, **kwargs)
    except IdforgeError:
        raise
    except _LOAD_ERRORS as exc:
        raise ModelNotFoundError(
            f"cannot load CLIP from {label}: {_first_line(exc)}; {_how_to_fix('model.clip')}"
        ) from exc
    log.info("loaded CLIPModel from %s (%s, %s)", label, dtype, device)
    return ClipBundle(model.to(device).eval(), tokenizer, processor)


def _count(module: Any) -> str:
    n = sum(p.numel() for p in module.parameters())
    return f"{n / 1e6:.2f}M params" if n >= 1e5 else f"{n} params"


def describe_model(id_or_path: str | os.PathLike[str], kind: str = "pipeline") -> str:
    """Load the model the way the stages do and summarise it (a few lines). ``kind``: pipeline | clip | sd15 | ...

    Raises ``ModelNotFoundError``/``ConfigError`` like the loaders when it cannot be loaded.
    """
    if kind not in DESCRIBE_KINDS:
        allowed = ", ".join(DESCRIBE_KINDS)
        raise ConfigError(f"kind={kind!r} is not one of {allowed}; pass --kind pipeline or --kind clip")
    label = os.fspath(id_or_path)
    if kind == "clip":
        model, tokenizer, processor = load_clip(id_or_path)
        vc, tc = model.config.vision_config, model.config.text_config
        return "\n".join(
            [
                f"{label}: {type(model).__name__} ({_count(model)})",
                f"  vision: {vc.image_size}px, patch {vc.patch_size}, hidden {vc.hidden_size}, "
                f"{vc.num_hidden_layers} layers",
                f"  text: vocab {len(tokenizer)}, max length {tokenizer.model_max_length}, hidden {tc.hidden_size}",
                f"  projection dim: {model.config.projection_dim}; image processor: {type(processor).__name__}",
            ]
        )
    pipe = load_pipeline(id_or_path, kind="auto" if kind == "pipeline" else kind)
    unet = pipe.unet
    size = unet.config.sample_size * pipe.vae_scale_factor
    lines = [
        f"{label}: {type(pipe).__name__}",
        f"  unet: {_count(unet)}, cross_attention_dim {unet.config.cross_attention_dim}, "
        f"{len(unet.attn_processors)} attention processors, default {size}x{size} px",
        f"  vae: {_count(pipe.vae)}, scale factor {pipe.vae_scale_factor}, "
        f"latent channels {pipe.vae.config.latent_channels}",
    ]
    for name in ("text_encoder", "text_encoder_2"):
        enc = getattr(pipe, name, None)
        if enc is not None:
            lines.append(f"  {name}: {type(enc).__name__} ({_count(enc)}), hidden {enc.config.hidden_size}")
    lines.append(f"  tokenizer: vocab {len(pipe.tokenizer)}; scheduler: {type(pipe.scheduler).__name__}")
    return "\n".join(lines)
