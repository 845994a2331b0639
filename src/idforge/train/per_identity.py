"""The per-identity loop: train one identity of a curated dataset with a per-identity method.

One flat loop, readable top to bottom: load the base pipeline and the identity's images (VAE latents computed once),
attach the method, let it initialise from the identity, optimise its parameters for the recipe's steps, sample a few
images, and write the artifact. Each identity is one MLflow run (loss curve, final images, wall time split into
load (``base_load`` of it: the base pipeline, 0 on a shared worker) / train / sample / save) and leaves
``<output_dir>/<identity>/`` written atomically (temp dir then rename) with a ``DONE`` marker, plus
``<output_dir>/_status/<identity>.json`` (done or failed, with the error).

Artifact layout (``<output_dir>/<identity>/``): the method's weights (``method.safetensors`` or
``learned_embeds.safetensors``, plus format exports such as diffusers LoRA files), ``artifact.json`` (method,
placeholder words, identity phrase), ``finetune.json`` (identity, base model, recipe, timings, sampling arguments),
``samples/*.png`` (the logged images) and ``DONE``.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import time
import traceback
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from idforge.errors import DataError
from idforge.io.identity import check_identity, identity_path
from idforge.io.lock import holds_output_lock
from idforge.train.finetune_config import FinetuneConfig

if TYPE_CHECKING:
    import torch

    from idforge.config import TrackingConfig

log = logging.getLogger(__name__)

DONE = "DONE"
STATUS_DIR = "_status"


@dataclass
class FinetuneResult:
    """What one identity's run produced. ``status``: "done" | "failed" | "skipped" (already DONE)."""

    identity: str
    method: str
    status: str
    artifact_dir: str | None = None
    run_id: str | None = None
    timings: dict[str, float] = field(default_factory=dict)  # seconds: load, train, sample, save, total
    final_loss: float | None = None
    first_loss: float | None = None
    steps: int = 0
    error: str | None = None

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class IdentityData:
    """One identity's training data (N images).

    images:      (N, 3, R, R) float in [-1, 1], the aligned crops at training resolution R.
    masks:       (N, 1, R, R) float in [0, 1], face masks (1 = face).
    crops112:    (N, 3, 112, 112) float in [0, 1], ArcFace-aligned crops.
    face_embeds: (N, D) float32, L2-normalised identity embeddings.
    wplus:       (N, 3, 256, 256) float in [-1, 1], the FFHQ-aligned crop with a white background (person matte;
                 the face mask where curation made no matte): the W+ encoders' input (``e4e_input``).
    """

    identity: str
    images: torch.Tensor
    masks: torch.Tensor
    crops112: torch.Tensor
    face_embeds: torch.Tensor
    sources: list[str]
    wplus: torch.Tensor | None = None


def artifact_dir(output_dir: str | os.PathLike[str], identity: str) -> Path:
    return identity_path(output_dir, identity)


def is_done(output_dir: str | os.PathLike[str], identity: str) -> bool:
    return (artifact_dir(output_dir, identity) / DONE).is_file()


def read_status(output_dir: str | os.PathLike[str], identity: str) -> dict[str, Any] | None:
    p = identity_path(Path(output_dir) / STATUS_DIR, identity, ".json")
    return json.loads(p.read_text()) if p.is_file() else None


def _write_status(output_dir: Path, result: FinetuneResult) -> None:
    from idforge.io.atomic import atomic_write_text

    (output_dir / STATUS_DIR).mkdir(parents=True, exist_ok=True)
    atomic_write_text(identity_path(output_dir / STATUS_DIR, result.identity, ".json"),
                      json.dumps(result.to_json(), indent=2, sort_keys=True))


# ----------------------------------------------------------------------------------------------------------------
# data


def list_identities(dataset_dir: str | os.PathLike[str]) -> list[str]:
    """Identity ids of a curated dataset (``identities.parquet``, else the accepted manifest rows), sorted.

    Raises ``DataError`` when the directory is not a curated dataset.
    """
    import pandas as pd

    from idforge.curate.manifest import is_curated, read_manifest

    root = Path(dataset_dir)
    ids_path = root / "identities.parquet"
    if ids_path.is_file():
        ids = pd.read_parquet(ids_path, columns=["identity"])["identity"].unique()
        source = ids_path
    elif is_curated(root):
        ids = read_manifest(root, columns=["identity"], accepted_only=True)["identity"].dropna().unique()
        source = root / "manifest.parquet"
    else:
        ids, source = None, None
    if source is not None:
        # Each becomes a directory under the output (and is removed and replaced there): a name like '..' would
        # reach outside it. Datasets curated before names were checked are refused here too.
        return sorted(check_identity(str(i), f"{source}") for i in ids)
    raise DataError(f"{root} is not a curated dataset (no identities.parquet or manifest.parquet); "
                    "run idforge curate first")


def _read_image(path: Path, size: int, mode: str = "RGB") -> Any:
    import numpy as np
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as im:
            im = im.convert(mode)
            if im.size != (size, size):
                im = im.resize((size, size), Image.Resampling.BICUBIC if mode == "RGB" else Image.Resampling.BILINEAR)
            return np.asarray(im)
    except FileNotFoundError:
        raise DataError(f"curated file {path} is missing; re-run idforge curate for this dataset") from None
    except (UnidentifiedImageError, OSError) as exc:
        raise DataError(f"curated file {path} cannot be decoded ({exc}); re-run idforge curate") from None


def load_identity_data(dataset_dir: str | os.PathLike[str], identity: str, resolution: int,
                       max_images: int | None = None) -> IdentityData:
    """Read one identity's accepted rows (aligned crops, masks, embeddings) from a curated dataset.

    Raises ``DataError`` naming the identity or file when it is absent or unreadable.
    """
    import numpy as np
    import torch

    from idforge.curate.manifest import is_curated, manifest_columns, read_manifest

    root = Path(dataset_dir)
    if not is_curated(root):
        raise DataError(f"{root} has no manifest.parquet; run idforge curate first")
    need = {"sha256", "aligned", "embedding_row", "source"}
    have = manifest_columns(root)
    missing = sorted(need - set(have))
    if missing:
        raise DataError(f"{root} manifest lacks columns {missing}; re-run `idforge curate` to rewrite it")
    # only this identity's rows and the columns read here are materialised (the others are optional; aligned_ffhq
    # and person_mask make the W+ encoders' input)
    columns = [c for c in have if c in need | {"mask", "aligned_112", "aligned_ffhq", "person_mask"}]
    rows = read_manifest(root, columns=columns, filters=[("identity", "=", identity)], accepted_only=True)
    rows = rows.sort_values("sha256")
    if rows.empty:
        known = ", ".join(list_identities(root)[:10])
        raise DataError(f"identity {identity!r} has no accepted images in {root}; known identities: {known}")
    if max_images is not None:
        rows = rows.iloc[:max_images]
    emb_path = root / "embeddings.npy"
    if not emb_path.is_file():
        raise DataError(f"{root} has no embeddings.npy; run idforge curate first")
    embeddings = np.load(emb_path, mmap_mode="r")
    images, masks, crops, ffhq, mattes = [], [], [], [], []
    for _, row in rows.iterrows():
        images.append(_read_image(root / row["aligned"], resolution))
        mask_path = row.get("mask")
        if isinstance(mask_path, str) and mask_path:
            masks.append(_read_image(root / mask_path, resolution, mode="L"))
        else:
            masks.append(np.full((resolution, resolution), 255, np.uint8))
        c112 = row.get("aligned_112")
        crops.append(_read_image(root / c112, 112) if isinstance(c112, str) and c112
                     else _read_image(root / row["aligned"], 112))
        big = row.get("aligned_ffhq")
        if isinstance(big, str) and big:
            # e4e's input at its 256 px from the FFHQ-aligned crop (never the 112 crop upscaled)
            person = row.get("person_mask")
            matte = person if isinstance(person, str) and person else mask_path
            ffhq.append(_read_image(root / big, 256))
            mattes.append(_read_image(root / matte, 256, mode="L") if isinstance(matte, str) and matte
                          else np.full((256, 256), 255, np.uint8))
    img = torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).float() / 127.5 - 1
    msk = torch.from_numpy(np.stack(masks)).float()[:, None] / 255
    c = torch.from_numpy(np.stack(crops)).permute(0, 3, 1, 2).float() / 255
    emb = torch.from_numpy(np.asarray(embeddings[rows["embedding_row"].to_numpy()], dtype=np.float32))
    wplus = None
    if len(ffhq) == len(rows):
        from idforge.methods.e4e import e4e_input

        wplus = e4e_input(torch.from_numpy(np.stack(ffhq)).permute(0, 3, 1, 2).float() / 255,
                          torch.from_numpy(np.stack(mattes)).float()[:, None] / 255)
    return IdentityData(identity, img, msk, c, emb, [str(s) for s in rows["source"]], wplus)


# ----------------------------------------------------------------------------------------------------------------
# the loop


def _device(name: str) -> str:
    import torch

    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return name


def _native_resolution(pipe: Any) -> int:
    size = pipe.unet.config.sample_size
    size = size if isinstance(size, int) else size[0]
    return int(size * getattr(pipe, "vae_scale_factor", 8))


def _encode_latents(pipe: Any, images: torch.Tensor, batch: int = 8) -> torch.Tensor:
    """(N, 3, R, R) in [-1, 1] -> (N, 4, R/8, R/8) scaled latents (the posterior mean: deterministic)."""
    import torch

    vae = pipe.vae
    out = []
    with torch.no_grad():
        for i in range(0, images.shape[0], batch):
            x = images[i:i + batch].to(device=vae.device, dtype=vae.dtype)
            out.append(vae.encode(x).latent_dist.mean.float() * vae.config.scaling_factor)
    return torch.cat(out)


def _autocast(device: str, dtype: str) -> Any:
    import contextlib

    import torch

    if device == "cuda" and dtype != "float32":
        return torch.autocast("cuda", dtype=getattr(torch, dtype))
    return contextlib.nullcontext()


def recipe(method: Any, cfg: FinetuneConfig) -> dict[str, Any]:
    """The effective optimiser settings: the method's paper recipe, overridden by non-None ``cfg`` fields."""
    r = method.config.train.model_dump()
    for key in ("steps", "batch_size", "lr", "scale_lr", "weight_decay", "max_images"):
        value = getattr(cfg, key)
        if value is not None:
            r[key] = value
    r["effective_lr"] = r["lr"] * r["batch_size"] if r["scale_lr"] else r["lr"]
    return r


@holds_output_lock("finetune", lambda a: artifact_dir(a["output_dir"], a["identity"]))  # one identity's folder
def finetune_identity(
    method: str,
    identity: str,
    dataset_dir: str | os.PathLike[str],
    base_model: str | os.PathLike[str],
    output_dir: str | os.PathLike[str],
    cfg: FinetuneConfig | None = None,
    parent_run_id: str | None = None,
    tracking: TrackingConfig | None = None,
    base: LoadedBase | None = None,
) -> FinetuneResult:
    """Train ``identity`` of ``dataset_dir`` with per-identity ``method`` on ``base_model``; write its artifact.

    ``base``: a base pipeline already loaded by ``load_base`` (a long-lived worker's, see ``identity_worker``);
    None loads ``base_model`` for this identity alone. A shared base is left with the method detached, but the
    caller restores anything else the method changed (``identity_worker.BaseWorker`` does).

    Returns a ``FinetuneResult`` (status "done"). On error the MLflow run ends FAILED, ``_status/<identity>.json``
    records the error, no artifact directory is left behind, and the exception propagates.

    Raises:
        ConfigError: unknown method / bad method config; the method is not per-identity.
        DataError: the identity or its files are missing in the dataset.
        ModelNotFoundError: the base model cannot be loaded.
    """
    from idforge.errors import ConfigError
    from idforge.methods.personalized import register_per_identity_methods
    from idforge.methods.registry import method_class

    cfg = cfg or FinetuneConfig()
    out_root = Path(output_dir)
    out_root.mkdir(parents=True, exist_ok=True)
    register_per_identity_methods()
    cls = method_class(method)
    if getattr(cls, "regime", None) != "per-identity":
        raise ConfigError(f"method {method!r} is a population method; train it with idforge train, not finetune")
    check_identity(identity, "finetune --identity")
    result = FinetuneResult(identity=identity, method=method, status="failed")
    try:
        _run(cls, method, identity, Path(dataset_dir), base_model, out_root, cfg, parent_run_id, tracking, result,
             base)
    except BaseException as exc:
        result.status = "failed"
        result.error = f"{type(exc).__name__}: {exc}".splitlines()[0][:500]
        log.error("finetune %s/%s failed: %s", method, identity, result.error)
        log.debug("%s", traceback.format_exc())
        _write_status(out_root, result)
        raise
    _write_status(out_root, result)
    return result


@dataclass
class LoadedBase:
    """A frozen base pipeline on its device, loaded once and shared by the identities trained on it."""

    pipe: Any
    base_model: str
    device: str
    dtype: str
    resolution: int  # the training resolution (cfg.resolution or the model's native one)
    load_s: float


def load_base(base_model: str | os.PathLike[str], cfg: FinetuneConfig) -> LoadedBase:
    """Load ``base_model`` frozen (``freeze_pipeline``) on ``cfg.device`` in ``cfg.dtype``.

    Raises ``ModelNotFoundError`` when it cannot be loaded.
    """
    from idforge.diffusion.loading import freeze_pipeline, load_pipeline

    t0 = time.perf_counter()
    device = _device(cfg.device)
    pipe = freeze_pipeline(load_pipeline(base_model, dtype=cfg.dtype, device=device))
    pipe.set_progress_bar_config(disable=True)
    return LoadedBase(pipe, str(base_model), device, cfg.dtype, cfg.resolution or _native_resolution(pipe),
                      time.perf_counter() - t0)


def _run(cls: Any, method_name: str, identity: str, dataset_dir: Path, base_model: Any, out_root: Path,
         cfg: FinetuneConfig, parent_run_id: str | None, tracking: Any, result: FinetuneResult,
         base: LoadedBase | None = None) -> None:
    import torch

    from idforge.diffusion.text import tokenize
    from idforge.errors import ConfigError
    from idforge.io.atomic import atomic_write_text
    from idforge.methods.types import IdentityRefs, TrainBatch
    from idforge.track import start_run, tracking_uri
    from idforge.track.buffer import ResilientLogger

    if cfg.num_threads:
        torch.set_num_threads(cfg.num_threads)
    device = _device(cfg.device)
    if base is not None and (base.device, base.dtype, base.base_model) != (device, cfg.dtype, str(base_model)):
        raise ConfigError(f"the loaded base is {base.base_model} on {base.device} in {base.dtype}; this identity "
                          f"asks for {base_model} on {device} in {cfg.dtype}: load a base for these settings")
    # Every random draw of an identity (module init, training noise, dropout) starts from the same seed, so an
    # identity's artifact does not depend on what ran before it in this process (a shared worker's earlier
    # identities) -- the bit-exact guarantee of ``identity_worker`` rests on it.
    torch.manual_seed(cfg.seed)
    method = cls.from_config(cfg.method_config)
    rec = recipe(method, cfg)
    tags = {"idforge.stage": "finetune", "idforge.method": method_name, "idforge.identity": identity}
    t_start = time.perf_counter()
    with (start_run(tracking, run_name=f"{method_name}-{identity}", parent_run_id=parent_run_id, tags=tags) as run,
          contextlib.ExitStack() as before_run_ends):
        result.run_id = run.info.run_id if run is not None else None
        # metrics and params through a buffer: an MLflow outage delays them, it does not fail the identity
        tracker = _NoTracker() if run is None else ResilientLogger(run.info.run_id, tracking_uri(tracking))
        log_metrics = tracker.log_metrics
        before_run_ends.callback(tracker.close)  # what an outage held back is delivered first (also on failure)
        if run is not None:
            tracker.log_params({"method": method_name, "identity": identity, "base_model": str(base_model),
                                **{f"recipe.{k}": v for k, v in rec.items()}})
            from idforge.track import log_dataset

            log_dataset(dataset_dir, context="training", name="curated")
        # -- load --------------------------------------------------------------------------------------------
        t0 = time.perf_counter()
        t_base = 0.0  # the base load when this identity loads its own (a shared worker's is not per identity)
        if base is None:
            base = load_base(base_model, cfg)
            t_base = base.load_s
        pipe, resolution = base.pipe, base.resolution
        data = load_identity_data(dataset_dir, identity, resolution, rec["max_images"])
        latents = _encode_latents(pipe, data.images).to(device)
        lh, lw = latents.shape[-2:]
        masks = torch.nn.functional.interpolate(data.masks, size=(lh, lw), mode="area").to(device)
        if rec["flip_prob"] > 0:  # mirrored images encoded too (a flipped latent is not the latent of the mirror)
            latents_flip = _encode_latents(pipe, torch.flip(data.images, dims=[-1])).to(device)
            masks_flip = torch.flip(masks, dims=[-1])
        refs = IdentityRefs(face_embeds=data.face_embeds, face_crops=data.crops112, wplus_pixels=data.wplus,
                            class_noun=cfg.class_noun)
        method.attach(pipe)
        method.prepare_identity(refs.to(device), pipe)
        method.train()
        t_load = time.perf_counter() - t0
        # -- train -------------------------------------------------------------------------------------------
        t0 = time.perf_counter()
        params = method.trainable_parameters()
        opt = torch.optim.AdamW(params, lr=rec["effective_lr"], weight_decay=rec["weight_decay"], eps=rec["eps"])
        gen = torch.Generator("cpu").manual_seed(cfg.seed)
        templates = list(method.config.templates)
        n = data.images.shape[0]
        face = data.face_embeds.to(device)
        crops = data.crops112.to(device)
        wplus_px = data.wplus.to(device) if data.wplus is not None else None
        losses: list[float] = []
        with _autocast(device, cfg.dtype):
            for step in range(rec["steps"]):
                idx = torch.randint(0, n, (rec["batch_size"],), generator=gen)
                pick = torch.randint(0, len(templates), (rec["batch_size"],), generator=gen)
                prompts = [method.prompt(templates[int(i)], cfg.class_noun) for i in pick]
                ids, ids_2 = tokenize(pipe, prompts)
                lat, msk = latents[idx], masks[idx]
                wpx = wplus_px[idx] if wplus_px is not None else None
                if rec["flip_prob"] > 0:
                    flip = (torch.rand(rec["batch_size"], generator=gen) < rec["flip_prob"]).to(device)
                    lat = torch.where(flip[:, None, None, None], latents_flip[idx], lat)
                    msk = torch.where(flip[:, None, None, None], masks_flip[idx], msk)
                    if wpx is not None:  # the W+ encoder sees the same mirror as the target
                        wpx = torch.where(flip[:, None, None, None], torch.flip(wpx, dims=[-1]), wpx)
                batch = TrainBatch(latents=lat, input_ids=ids, input_ids_2=ids_2,
                                   face_embeds=face[idx][:, None], face_mask=msk, ref_pixels=crops[idx],
                                   wplus_pixels=wpx)
                out = method.training_loss(batch, pipe, generator=gen)
                opt.zero_grad(set_to_none=True)
                out["loss"].backward()
                opt.step()
                loss = float(out["loss"].detach())
                losses.append(loss)
                if step % cfg.log_every == 0 or step == rec["steps"] - 1:
                    log_metrics({f"train/{k}": float(v.detach()) for k, v in out.items()}, step=step)
        t_train = time.perf_counter() - t0
        # -- sample ------------------------------------------------------------------------------------------
        t0 = time.perf_counter()
        method.eval()
        prompts = [method.prompt(p, cfg.class_noun) for p in (cfg.sample_prompts or [method.config.sample_prompt])]
        sampling = {"seeds": list(cfg.sample_seeds), "num_inference_steps": cfg.sample_steps,
                    "scheduler": cfg.sample_scheduler}
        images = method.generate(pipe, prompts, method.sample_condition(pipe), **sampling)
        if run is not None:
            from idforge.track import log_image_grid

            log_image_grid(images, rows=len(prompts), cols=len(cfg.sample_seeds), artifact_file="samples/final.png")
        t_sample = time.perf_counter() - t0
        # -- save (temp dir, then one rename: a reader never sees a half-written identity) ---------------------
        t0 = time.perf_counter()
        final = artifact_dir(out_root, identity)
        tmp = out_root / f".{check_identity(identity)}.tmp-{os.getpid()}"
        if tmp.exists():
            shutil.rmtree(tmp)
        method.save_artifact(tmp, cfg.class_noun)
        (tmp / "samples").mkdir()
        for i, img in enumerate(images):
            img.save(tmp / "samples" / f"{i:03d}.png")
        t_save = time.perf_counter() - t0
        result.timings = {"load": t_load, "base_load": t_base, "train": t_train, "sample": t_sample, "save": t_save,
                          "total": time.perf_counter() - t_start}
        result.first_loss, result.final_loss, result.steps = losses[0], losses[-1], len(losses)
        meta = {"identity": identity, "method": method_name, "base_model": str(base_model), "recipe": rec,
                "class_noun": cfg.class_noun, "resolution": resolution, "sources": data.sources,
                "sample_prompts": prompts, "sampling": sampling, "timings": result.timings,
                "losses": losses, "run_id": result.run_id}
        atomic_write_text(tmp / "finetune.json", json.dumps(meta, indent=2))
        atomic_write_text(tmp / DONE, "")
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        result.timings["save"] = t_save = time.perf_counter() - t0
        result.timings["total"] = time.perf_counter() - t_start
        log_metrics({"time/load_s": t_load, "time/train_s": t_train, "time/sample_s": t_sample, "time/save_s": t_save,
                     "time/total_s": result.timings["total"], "final_loss": losses[-1]})
        if run is not None:
            from idforge.track import log_trained_model

            log_trained_model(sorted(p for p in final.iterdir() if p.is_file()), f"{method_name}-{identity}",
                              {"final_loss": losses[-1], "first_loss": losses[0], "step": len(losses)},
                              params={"identity": identity, "base_model": base_model})
        result.status = "done"
        result.artifact_dir = str(final)
        method.detach()
        log.info("finetuned %s/%s in %.1fs (loss %.4f -> %.4f): %s", method_name, identity,
                 result.timings["total"], losses[0], losses[-1], final)


class _NoTracker:
    """Tracking disabled: the logger's calls, doing nothing."""

    def log_metrics(self, metrics: Any, step: int | None = None) -> None:
        pass

    def close(self) -> None:
        pass


def load_finetuned(artifact: str | os.PathLike[str], pipe: Any, **overrides: Any) -> tuple[Any, dict[str, Any]]:
    """Attach the trained identity in ``artifact`` (a ``<output_dir>/<identity>`` dir) to ``pipe``.

    Returns (method, finetune.json). Generate with
    ``method.generate(pipe, [method.prompt(t, meta["class_noun"])], method.sample_condition(pipe), ...)``.

    Raises ``DataError`` when the directory has no ``DONE`` marker (an unfinished or failed identity).
    """
    from idforge.methods.personalized import load_artifact

    root = Path(artifact)
    if not (root / DONE).is_file():
        raise DataError(f"{root} is not a finished finetune artifact (no {DONE} marker); re-run idforge finetune")
    method, _ = load_artifact(root, pipe, **overrides)
    meta = json.loads((root / "finetune.json").read_text())
    return method, meta
