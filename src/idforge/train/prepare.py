"""The ``prepare`` stage: cache what every training epoch would otherwise recompute.

From a curated dataset (``manifest.parquet`` accepted rows: ``aligned`` ArcFace 112 crop, ``aligned_ffhq`` FFHQ-style
crop, ``mask`` face mask in the FFHQ crop's frame, ``matted``, ``embedding_row``; ``identities.parquet``;
``embeddings.npy``) it writes, under ``output_dir``::

    items/<k[:2]>/<k>.safetensors   one file per accepted face, named by its content key k (below):
        latents            (4, h, w)   VAE latents of the target image, x scaling_factor: the aligned crop at the
                                       training resolution (``target: aligned``), or the photo around the face in its
                                       aspect bucket (``target: photo``, ``train/photo_target.py``)
        latents_flip       (4, h, w)   the same for the horizontally flipped crop (when ``flip``)
        face_embed         (Dface,)    float32 identity embedding from curation (L2-normalised)
        clip_image_embed   (Dclip,)    projected pooled CLIP image embedding of the aligned face
        clip_patch_tokens  (P, Dvis)   CLIP vision hidden states (``clip_hidden_layer``), class token first
        ref_pixels         (3,112,112) uint8 ArcFace-aligned crop
        target_kps         (5, 2)      float32 landmarks in pixels of the target image (ArcFace order)
        face_mask          (1, h, w)   face region at latent resolution in [0, 1] (when curation wrote masks), moved
                                       from the aligned crop's frame into the target's
    text/<t>.safetensors            token ids and encoder states of every caption (template x class noun)
    index.parquet                   one row per item: key, identity, class noun, source, file, bucket_h/bucket_w
                                    (the target's pixel size: one square for ``aligned``, the buckets for ``photo``)
    prepared.json                   fingerprints, shapes, captions, counts

An item's key hashes its inputs (the image, crop, mask and embedding bytes), the base model's and CLIP model's
fingerprints and the settings that change it; the caption file's key hashes the templates, class nouns and model.
So a second run with the same inputs computes and writes nothing, and a changed input recomputes only its item.
Every file is written atomically; an interrupted run leaves only complete, content-addressed files behind.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import TYPE_CHECKING, Any

import numpy as np

from idforge.errors import DataError
from idforge.io.atomic import atomic_path, atomic_write_text
from idforge.io.space import check_free_space, clear_disk_full
from idforge.train.clip_features import clip_record
from idforge.train.config import PrepareConfig

if TYPE_CHECKING:
    import pandas as pd
    import torch

log = logging.getLogger(__name__)

FORMAT = "idforge.prepared/1"
# Bump when what an item holds or how it is computed changes: every key changes with it.
ITEM_VERSION = 1
TEXT_VERSION = 1
# ArcFace landmark order: left eye, right eye, nose, left mouth, right mouth. A mirror image swaps the sides.
FLIP_KPS_ORDER = [1, 0, 2, 4, 3]


@dataclass
class PreparedIndex:
    """What ``prepare_dataset`` produced (and did): read the items back with ``PreparedDataset``."""

    output_dir: Path
    items: pd.DataFrame
    info: dict[str, Any]
    computed: int = 0  # items encoded by this run
    reused: int = 0  # items found in the cache
    text_computed: bool = False
    pruned: int = 0
    noop: bool = False  # nothing was computed or written

    @property
    def fingerprint(self) -> str:
        return str(self.info["fingerprint"])

    def summary(self) -> str:
        state = "up to date (no-op)" if self.noop else f"{self.computed} encoded, {self.reused} cached"
        return (f"prepared {len(self.items)} images of {self.items['identity'].nunique()} identities into "
                f"{self.output_dir}: {state}; captions {'encoded' if self.text_computed else 'cached'}"
                + (f"; pruned {self.pruned} stale items" if self.pruned else ""))


# ----------------------------------------------------------------------------------------------------------------
# hashing


def _sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            h.update(block)
    return h.hexdigest()


def _sha256_json(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()


def model_fingerprint(id_or_path: str | os.PathLike[str], full_hash_limit: int = 64 << 20, *,
                      local_files_only: bool = True, config_key: str = "model.base") -> str:
    """A content fingerprint of a model directory (or the id itself when it is not a local directory).

    Config/tokenizer files and weight files up to ``full_hash_limit`` bytes are hashed whole; larger weight files
    by size plus their first and last MiB (hashing gigabytes on every run would cost more than it protects).
    """
    path = Path(os.path.expanduser(str(id_or_path)))
    if not path.is_dir():
        from idforge.diffusion.loading import resolve_model

        # ModelNotFoundError (one line) when offline and not cached
        resolved = resolve_model(str(id_or_path), local_files_only=local_files_only, config_key=config_key)
        if not isinstance(resolved, Path) or not Path(resolved).is_dir():
            return _sha256_json({"id": str(id_or_path)})
        path = Path(resolved)
    h = hashlib.sha256()
    for f in sorted(p for p in path.rglob("*") if p.is_file() and not p.name.startswith(".")):
        rel = f.relative_to(path).as_posix()
        size = f.stat().st_size
        h.update(f"{rel}\0{size}\0".encode())
        if size <= full_hash_limit:
            h.update(_sha256_file(f).encode())
        else:
            with open(f, "rb") as fh:
                h.update(fh.read(1 << 20))
                fh.seek(size - (1 << 20))
                h.update(fh.read(1 << 20))
    return h.hexdigest()


# ----------------------------------------------------------------------------------------------------------------
# reading the curated dataset


@dataclass
class _Row:
    """One accepted face of the curated dataset, with its files resolved and its input hash."""

    identity: str
    class_noun: str
    source: str
    sha256: str
    face_index: int
    crop512: Path
    crop112: Path | None
    mask: Path | None
    matted: Path | None
    landmarks5: np.ndarray | None  # (5, 2) in source pixels
    embedding: np.ndarray  # (D,) float32
    caption: str = ""  # the photo's own caption with its class noun (empty: the templates)
    bbox: tuple[float, float, float, float] | None = None  # face box in source pixels
    photo: Path | None = None  # the upright photo curation kept (prepare.target: photo)
    source_size: tuple[int, int] | None = None  # (width, height) of the upright source image
    input_hash: str = ""
    key: str = ""
    extra: dict[str, Any] = field(default_factory=dict)


def _resolve(root: Path, value: Any) -> Path | None:
    if _missing(value):
        return None
    p = Path(str(value))
    return p if p.is_absolute() else root / p


def _missing(value: Any) -> bool:
    return value is None or (isinstance(value, float) and np.isnan(value)) or (isinstance(value, str) and not value)


def _as_kps(value: Any) -> np.ndarray | None:
    """Manifest ``landmarks5`` (list of 5 pairs, or 10 numbers) -> (5, 2) float64, or None when absent/invalid."""
    if value is None or isinstance(value, float):
        return None
    try:
        flat = np.concatenate([np.asarray(v, dtype=np.float64).reshape(-1) for v in value])
    except (TypeError, ValueError):
        return None
    return flat.reshape(5, 2) if flat.size == 10 and np.all(np.isfinite(flat)) else None


def _as_box(value: Any) -> tuple[float, float, float, float] | None:
    """Manifest ``bbox`` (4 numbers) -> (x0, y0, x1, y1), or None when absent/invalid."""
    if value is None or isinstance(value, float):
        return None
    try:
        box = np.asarray(value, dtype=np.float64).reshape(-1)
    except (TypeError, ValueError):
        return None
    return tuple(float(v) for v in box) if box.size == 4 and np.all(np.isfinite(box)) else None  # type: ignore[return-value]


def read_curated(dataset_dir: str | os.PathLike[str], cfg: PrepareConfig) -> list[_Row]:
    """The accepted faces of a curated dataset, sorted by (identity, sha256, face index).

    Raises:
        DataError: a required file or column is missing, no face is accepted, an embedding row or crop is missing.
    """
    import pandas as pd

    from idforge.curate import manifest as mf

    root = Path(dataset_dir)
    manifest_path = mf.manifest_path(root)
    if not mf.is_curated(root):
        raise DataError(f"{manifest_path} does not exist: point --dataset at the output of `idforge curate`")
    need = {"status", "identity", "sha256", "embedding_row", "aligned", "aligned_ffhq"}
    have = mf.manifest_columns(root)
    missing = sorted(need - set(have))
    if missing:
        raise DataError(f"{manifest_path} lacks columns {missing}: re-run `idforge curate` to rewrite it")
    # the accepted rows only, and only the columns this reads
    wanted = need | {"source", "face_index", "mask", "matted", "landmarks5", "caption", "bbox", "photo", "width",
                     "height"}
    manifest = mf.read_manifest(root, columns=[c for c in have if c in wanted], accepted_only=True)
    emb_path = root / "embeddings.npy"
    if not emb_path.is_file():
        raise DataError(f"{emb_path} does not exist: re-run `idforge curate` on the photos")
    embeddings = np.load(emb_path, mmap_mode="r")
    nouns: dict[str, str] = {}
    ids_path = root / "identities.parquet"
    if ids_path.is_file():
        ident = pd.read_parquet(ids_path)
        id_col = next((c for c in ("identity", "id") if c in ident.columns), None)
        if id_col is not None and "class_noun" in ident.columns:
            nouns = {str(i): str(n) for i, n in zip(ident[id_col], ident["class_noun"], strict=True)
                     if isinstance(n, str) and n}

    acc = manifest[(manifest["status"] == "accepted") & manifest["identity"].notna()]
    if acc.empty:
        raise DataError(f"{manifest_path} has no accepted face with an identity: nothing to prepare "
                        "(check the curation report for the rejection reasons)")
    rows: list[_Row] = []
    for rec in acc.to_dict("records"):
        crop = _resolve(root, rec.get("aligned_ffhq"))
        if crop is None or not crop.is_file():
            raise DataError(f"aligned crop {crop} of {rec.get('source')} is missing: the dataset at {root} is "
                            "incomplete, re-run `idforge curate`")
        crop112 = _existing(_resolve(root, rec.get("aligned")))
        row_idx = rec["embedding_row"]
        if _missing(row_idx) or not 0 <= int(row_idx) < embeddings.shape[0]:
            raise DataError(f"embedding_row {row_idx} of {rec.get('source')} is outside {emb_path} "
                            f"({embeddings.shape[0]} rows): the dataset is inconsistent, re-run `idforge curate`")
        landmarks = _as_kps(rec.get("landmarks5"))
        identity = str(rec["identity"])
        photo = _existing(_resolve(root, rec.get("photo")))
        bbox = _as_box(rec.get("bbox"))
        if cfg.target == "photo" and (photo is None or bbox is None or landmarks is None):
            what = "photo" if photo is None else ("bbox" if bbox is None else "landmarks5")
            raise DataError(f"prepare.target 'photo' needs each face's photo, bbox and landmarks5, but {what} of "
                            f"{rec.get('source')} is missing in {manifest_path}: re-run `idforge curate` (this version "
                            "keeps the upright photos under photos/) or set prepare.target: aligned")
        size = (rec.get("width"), rec.get("height"))
        rows.append(_Row(
            identity=identity,
            class_noun=nouns.get(identity, cfg.class_noun),
            source=str(rec.get("source", crop.name)),
            sha256=str(rec["sha256"]),
            face_index=int(rec.get("face_index", 0) or 0),
            crop512=crop,
            crop112=crop112,
            mask=_existing(_resolve(root, rec.get("mask"))),
            matted=_existing(_resolve(root, rec.get("matted"))),
            landmarks5=landmarks,
            embedding=np.asarray(embeddings[int(row_idx)], dtype=np.float32),
            caption=with_class_noun(rec.get("caption"), nouns.get(identity, cfg.class_noun)),
            bbox=bbox,
            photo=photo,
            source_size=None if any(_missing(v) for v in size) else (int(size[0]), int(size[1])),
        ))
    rows.sort(key=lambda r: (r.identity, r.sha256, r.face_index))
    return rows


def _existing(p: Path | None) -> Path | None:
    return p if p is not None and p.is_file() else None


def _input_hash(row: _Row, cfg: PrepareConfig) -> str:
    """Hash of every input byte an item depends on."""
    image = row.matted if (cfg.image_source == "matted" and row.matted is not None) else row.crop512
    parts = {
        "sha256": row.sha256,
        "face_index": row.face_index,
        "image": _sha256_file(image),
        "crop512": _sha256_file(row.crop512),
        "crop112": _sha256_file(row.crop112) if row.crop112 else None,
        "mask": _sha256_file(row.mask) if row.mask else None,
        "embedding": hashlib.sha256(np.ascontiguousarray(row.embedding).tobytes()).hexdigest(),
        "landmarks5": None if row.landmarks5 is None else np.round(row.landmarks5, 4).tolist(),
    }
    if cfg.target == "photo":  # only then: the aligned target's keys stay what they were
        parts.update(photo=_sha256_file(row.photo) if row.photo else None, bbox=row.bbox,
                     source_size=row.source_size)
    return _sha256_json(parts)


# ----------------------------------------------------------------------------------------------------------------
# encoders (loaded only when something has to be computed)


@dataclass
class _Encoders:
    vae: Any
    text: Any  # has text_encoder, tokenizer (+ _2 for SDXL), for idforge.diffusion.text
    clip: Any | None
    clip_processor: Any | None
    device: Any
    resolution: int
    scaling_factor: float
    shift_factor: float | None
    vae_scale: int = 8  # pixels per latent


def _load_encoders(model: str, clip_model: str | None, cfg: PrepareConfig, device: str, dtype: str,
                   local_files_only: bool, need_clip: bool) -> _Encoders:
    import torch

    from idforge.diffusion.loading import load_clip, load_pipeline

    pipe = load_pipeline(model, kind="auto", dtype=dtype, device=device, local_files_only=local_files_only)
    for name in ("vae", "text_encoder", "text_encoder_2"):
        mod = getattr(pipe, name, None)
        if mod is not None:
            mod.eval().requires_grad_(False)
    vae_scale = 2 ** (len(pipe.vae.config.block_out_channels) - 1)
    sample = pipe.unet.config.sample_size
    native = int(sample if isinstance(sample, int) else sample[0]) * vae_scale
    text = SimpleNamespace(
        text_encoder=pipe.text_encoder, tokenizer=pipe.tokenizer,
        text_encoder_2=getattr(pipe, "text_encoder_2", None), tokenizer_2=getattr(pipe, "tokenizer_2", None),
    )
    clip = processor = None
    if need_clip:
        if not clip_model:
            raise DataError("prepare needs a CLIP model for the image features: set model.clip (a hub id or dir)")
        clip, _tokenizer, processor = load_clip(clip_model, dtype=dtype, device=device,
                                                local_files_only=local_files_only)
        clip.requires_grad_(False)
    return _Encoders(
        vae=pipe.vae, text=text, clip=clip, clip_processor=processor, device=torch.device(device),
        resolution=cfg.resolution or native,
        scaling_factor=float(pipe.vae.config.scaling_factor),
        shift_factor=getattr(pipe.vae.config, "shift_factor", None),
        vae_scale=vae_scale,
    )


def _item_bytes(enc: _Encoders, cfg: PrepareConfig) -> int:
    """Upper bound of one cached item's size at this model's latent size (``idforge.io.space``)."""
    from idforge.io.space import prepared_item_bytes

    vae_cfg = enc.vae.config
    tokens = dim = 0
    if enc.clip is not None:
        vis = getattr(enc.clip.config, "vision_config", enc.clip.config)
        dim = int(getattr(vis, "hidden_size", 0))
        tokens = (int(getattr(vis, "image_size", 0)) // max(int(getattr(vis, "patch_size", 1)), 1)) ** 2
    return prepared_item_bytes(enc.resolution, latent_channels=int(getattr(vae_cfg, "latent_channels", 4)),
                               vae_scale=2 ** (len(vae_cfg.block_out_channels) - 1),
                               dtype_bytes=2 if cfg.storage_dtype == "float16" else 4, flip=cfg.flip,
                               clip_tokens=tokens, clip_dim=dim)


def _pixels(images: Sequence[Any], size: int | tuple[int, int]) -> torch.Tensor:
    """PIL RGB images -> (B, 3, H, W) float in [-1, 1] at ``size`` (a side, or (height, width)); bicubic resize, as
    diffusers' training examples do (images already at the size pass unchanged)."""
    import torch
    from PIL import Image

    h, w = (size, size) if isinstance(size, int) else size
    arrs = [np.asarray(im.convert("RGB") if im.size == (w, h) else im.convert("RGB").resize((w, h), Image.BICUBIC),
                       dtype=np.float32) for im in images]
    x = torch.from_numpy(np.stack(arrs)).permute(0, 3, 1, 2)
    return x / 127.5 - 1.0


def _encode_latents(enc: _Encoders, pixels: torch.Tensor) -> torch.Tensor:
    """(B, 3, R, R) in [-1, 1] -> (B, 4, R/8, R/8) float32, scaled like the pipelines scale them."""
    import torch

    with torch.no_grad():
        dist = enc.vae.encode(pixels.to(enc.device, enc.vae.dtype)).latent_dist
        z = dist.mean.float()
    if enc.shift_factor is not None:
        z = z - enc.shift_factor
    return (z * enc.scaling_factor).cpu()


def _encode_clip(enc: _Encoders, images: Sequence[Any], layer: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Aligned face images -> ((B, Dclip) projected pooled embeddings, (B, P, Dvis) hidden states of ``layer``)."""
    import torch

    pixel_values = enc.clip_processor(images=[im.convert("RGB") for im in images], return_tensors="pt").pixel_values
    with torch.no_grad():
        out = enc.clip.vision_model(pixel_values=pixel_values.to(enc.device, enc.clip.dtype),
                                    output_hidden_states=True)
        pooled = enc.clip.visual_projection(out.pooler_output)
    return pooled.float().cpu(), out.hidden_states[layer].float().cpu()


def _read_mask(path: Path) -> np.ndarray:
    from PIL import Image

    with Image.open(path) as im:
        return np.asarray(im.convert("L"), dtype=np.float32) / 255.0


def _mask_tensor(mask: Path | np.ndarray, latent_hw: tuple[int, int]) -> torch.Tensor:
    """A mask (image file or (H, W) array in [0, 1]) -> (1, h, w) float in [0, 1] at latent resolution (area
    average keeps soft borders)."""
    import torch
    import torch.nn.functional as F

    m = _read_mask(mask) if isinstance(mask, Path) else np.asarray(mask, dtype=np.float32)
    t = torch.from_numpy(np.ascontiguousarray(m))[None, None]
    return F.interpolate(t, size=latent_hw, mode="area")[0].clamp(0, 1)


@dataclass(frozen=True)
class PhotoFrame:
    """Where one face's photo target comes from: ``box`` (x0, y0, x1, y1) in the kept photo's pixels (continuous),
    resized to ``bucket`` (height, width); ``target_from_source`` maps source pixels (the manifest's bbox and
    landmarks) to target pixels."""

    box: tuple[float, float, float, float]
    bucket: tuple[int, int]
    target_from_source: np.ndarray


def photo_frame(row: _Row, cfg: PrepareConfig, resolution: int) -> PhotoFrame:
    """The photo target's frame of one face (``train/photo_target.py``), buckets near ``resolution``^2."""
    from PIL import Image

    from idforge.train import photo_target as pt

    if row.photo is None or row.bbox is None or row.landmarks5 is None:
        raise DataError(f"{row.source} has no kept photo, bbox or landmarks: re-run `idforge curate`")
    with Image.open(row.photo) as im:  # the header only
        pw, ph = im.size
    sw, sh = row.source_size or (pw, ph)
    scale = sw / pw  # source pixels per kept-photo pixel (curation keeps it at most decode.max_side)
    buckets = pt.bucket_sides(resolution, cfg.bucket_step, cfg.bucket_aspect_range, cfg.bucket_area_tolerance)
    box, bucket, m = pt.photo_frame(row.bbox, row.landmarks5, sw, sh, cfg.context_factor, buckets)
    return PhotoFrame(tuple(v / scale for v in box), bucket, m)  # type: ignore[arg-type]


def target_size(row: _Row, cfg: PrepareConfig, resolution: int) -> tuple[int, int]:
    """(height, width) in pixels of a row's training target: the square, or its photo bucket."""
    if cfg.target == "photo":
        key = ("frame", resolution)  # computed once per row (it reads the photo's header)
        if key not in row.extra:
            row.extra[key] = photo_frame(row, cfg, resolution)
        return row.extra[key].bucket
    return resolution, resolution


def _target_kps(row: _Row, crop_side: int, resolution: int) -> np.ndarray:
    """(5, 2) landmarks in pixels of the training image (the aligned crop resized to ``resolution``)."""
    from idforge.faces.align import alignment_matrix, template_for, transform_points

    if row.landmarks5 is not None:
        pts = transform_points(row.landmarks5, alignment_matrix(row.landmarks5, crop_side))
    else:  # no source landmarks recorded: the aligned crop puts them on the template by construction
        pts = template_for(crop_side)
    # pixel centres: x_out + 0.5 = (x_in + 0.5) * R / S
    return ((np.asarray(pts, dtype=np.float64) + 0.5) * resolution / crop_side - 0.5).astype(np.float32)


def flip_kps(kps: np.ndarray | torch.Tensor, width: int) -> Any:
    """Landmarks of the horizontally mirrored image: x -> W - 1 - x, left/right points swapped."""
    out = kps[..., FLIP_KPS_ORDER, :].clone() if hasattr(kps, "clone") else np.array(kps)[..., FLIP_KPS_ORDER, :]
    out[..., 0] = (width - 1) - out[..., 0]
    return out


def _encode_items(enc: _Encoders, rows: Sequence[_Row], cfg: PrepareConfig) -> list[dict[str, torch.Tensor]]:
    """The tensors of each item (see the module docstring), in float32/uint8 before the storage cast."""
    import torch
    from PIL import Image

    def load(p: Path) -> Any:
        with Image.open(p) as im:
            return im.convert("RGB")

    from idforge.faces.align import alignment_matrix, transform_points

    res = enc.resolution
    photo = cfg.target == "photo"
    if photo and cfg.bucket_step % enc.vae_scale:
        raise DataError(f"prepare.bucket_step {cfg.bucket_step} is not a multiple of the VAE's {enc.vae_scale} "
                        "pixels per latent: use a multiple (64 for SD/SDXL)")
    sizes = [target_size(r, cfg, res) for r in rows]
    crops512 = [load(r.crop512) for r in rows]
    if photo:
        images = []
        for r, (h, w) in zip(rows, sizes, strict=True):
            with Image.open(r.photo) as im:
                images.append(im.convert("RGB").resize((w, h), Image.BICUBIC, box=r.extra[("frame", res)].box))
    else:
        images = [load(r.matted) if (cfg.image_source == "matted" and r.matted is not None) else c
                  for r, c in zip(rows, crops512, strict=True)]
    crops112 = [load(r.crop112) if r.crop112 else c.resize((112, 112), Image.BICUBIC)
                for r, c in zip(rows, crops512, strict=True)]
    clip_inputs = crops112 if cfg.clip_crop == "arcface" else crops512
    latents: list[Any] = [None] * len(rows)
    latents_flip: list[Any] = [None] * len(rows)
    # one VAE pass per target size: items of different buckets cannot share a batch tensor
    for size in sorted(set(sizes)):
        idx = [i for i, s in enumerate(sizes) if s == size]
        pixels = _pixels([images[i] for i in idx], size)
        z = _encode_latents(enc, pixels)
        zf = _encode_latents(enc, torch.flip(pixels, dims=[-1])) if cfg.flip else None
        for k, i in enumerate(idx):
            latents[i] = z[k]
            latents_flip[i] = None if zf is None else zf[k]
    pooled, patches = _encode_clip(enc, clip_inputs, cfg.clip_hidden_layer)
    out = []
    for i, row in enumerate(rows):
        if photo:
            frame = row.extra[("frame", res)]
            kps = transform_points(row.landmarks5, frame.target_from_source).astype(np.float32)
        else:
            kps = _target_kps(row, crops512[i].size[0], res)
        item = {
            "latents": latents[i],
            "face_embed": torch.from_numpy(row.embedding.copy()),
            "clip_image_embed": pooled[i],
            "clip_patch_tokens": patches[i],
            "ref_pixels": torch.from_numpy(np.asarray(crops112[i], dtype=np.uint8).copy()).permute(2, 0, 1),
            "target_kps": torch.from_numpy(kps),
        }
        if latents_flip[i] is not None:
            item["latents_flip"] = latents_flip[i]
        if row.mask is not None:
            latent_hw = tuple(latents[i].shape[-2:])
            if photo:  # the mask is drawn in the aligned crop: crop -> source -> target (``photo_target``)
                from idforge.train.photo_target import mask_to_target

                m = _read_mask(row.mask)
                moved = mask_to_target(m, alignment_matrix(row.landmarks5, m.shape[0]), frame.target_from_source,
                                       sizes[i])
                item["face_mask"] = _mask_tensor(moved, latent_hw)
            else:
                item["face_mask"] = _mask_tensor(row.mask, latent_hw)
        out.append(item)
    return out


def _encode_captions(enc: _Encoders, prompts: Sequence[str]) -> dict[str, torch.Tensor]:
    import torch

    from idforge.diffusion.text import encode_ids, tokenize

    ids_1, ids_2 = tokenize(enc.text, prompts)
    with torch.no_grad():
        cond = encode_ids(enc.text, ids_1, ids_2)
    out = {"input_ids": ids_1.long(), "text_embeds": cond.hidden.float().cpu()}
    if ids_2 is not None:
        out["input_ids_2"] = ids_2.long()
    if cond.pooled is not None:
        out["pooled_text_embeds"] = cond.pooled.float().cpu()
    return out


def _save(path: Path, tensors: dict[str, torch.Tensor], dtype: str, metadata: dict[str, str]) -> None:
    import torch
    from safetensors.torch import save_file

    cast = torch.float16 if dtype == "float16" else torch.float32
    # face embeddings and landmarks stay float32: they are small, and cosine similarities need the precision.
    keep = {"face_embed", "target_kps"}
    data = {k: (v.to(cast) if v.is_floating_point() and k not in keep else v).contiguous() for k, v in tensors.items()}
    with clear_disk_full(path, "prepare", "the items already written are kept and reused"), atomic_path(path) as tmp:
        save_file(data, str(tmp), metadata=metadata)


# ----------------------------------------------------------------------------------------------------------------
# the stage


def with_class_noun(caption: Any, noun: str) -> str:
    """A photo's own caption, with the identity's class noun put in front when the caption lacks it (IDAdapter's
    textual injection and every template caption name the person by it); "" for no caption."""
    import re

    text = " ".join(str(caption).split()) if isinstance(caption, str) else ""
    if not text:
        return ""
    if re.search(rf"\b{re.escape(noun)}\b", text, flags=re.IGNORECASE):
        return text
    return f"a {noun}, {text}"


def _captions(rows: Iterable[_Row], cfg: PrepareConfig) -> list[dict[str, str]]:
    """The template captions of every class noun, then each distinct photo caption (``kind`` tells them apart)."""
    rows = list(rows)
    nouns = sorted({r.class_noun for r in rows})
    templates = [{"class_noun": n, "template": t, "prompt": t.format(class_noun=n), "kind": "template"}
                 for n in nouns for t in cfg.caption_templates]
    own = sorted({(r.class_noun, r.caption) for r in rows if r.caption})
    return templates + [{"class_noun": n, "template": "", "prompt": c, "kind": "image"} for n, c in own]


def _reusable(path: Path) -> bool:
    """Whether a cached file can be reused: present and whole (header and size agree). A damaged one (a truncated
    copy, a garbled header) is deleted with a warning naming it, so this run encodes it again."""
    from idforge.train.item_file import safetensors_problem

    problem = safetensors_problem(path)
    if problem is None:
        return True
    if problem != "missing":
        log.warning("prepare: cached %s is damaged (%s): encoding it again", path, problem)
        path.unlink(missing_ok=True)
    return False


def item_path(output_dir: Path, key: str) -> Path:
    return output_dir / "items" / key[:2] / f"{key}.safetensors"


def prepare_dataset(dataset_dir: str | os.PathLike[str], model: str, output_dir: str | os.PathLike[str],
                    cfg: PrepareConfig | None = None, **kw: Any) -> PreparedIndex:
    """:func:`encode_dataset` under the one-writer lock of ``output_dir`` (``idforge.io.lock``): two prepares on
    one cache would encode into and prune each other's items. Raises DataError naming the holder when held.
    ``cfg.engine == "ray"``: :func:`idforge.train.prepare_ray.prepare_on_ray` (shards; ``output_dir`` may be s3://,
    which takes no lock: one writer per prefix is the caller's to ensure)."""
    from idforge.io.lock import output_lock

    if cfg is not None and cfg.engine == "ray":
        from idforge.io.uri import is_s3_uri
        from idforge.train.prepare_ray import prepare_on_ray

        if is_s3_uri(str(output_dir)):
            return prepare_on_ray(dataset_dir, model, output_dir, cfg, **kw)
        with output_lock(output_dir, "prepare"):
            return prepare_on_ray(dataset_dir, model, output_dir, cfg, **kw)
    with output_lock(output_dir, "prepare"):
        return encode_dataset(dataset_dir, model, output_dir, cfg, **kw)


def encode_dataset(
    dataset_dir: str | os.PathLike[str],
    model: str,
    output_dir: str | os.PathLike[str],
    cfg: PrepareConfig | None = None,
    *,
    clip_model: str | None = "openai/clip-vit-base-patch16",
    device: str = "auto",
    dtype: str = "float32",
    local_files_only: bool = True,
) -> PreparedIndex:
    """Cache VAE latents, CLIP features, face embeddings and caption embeddings of a curated dataset.

    Args:
        dataset_dir: output directory of ``idforge curate``.
        model: base model id or directory (``idforge.diffusion.loading.load_pipeline``).
        output_dir: where the cache goes (reused across runs: only changed items are recomputed).
        cfg: prepare settings; defaults when None.
        clip_model: CLIP model id or directory for the image features.
        device: "auto" (CUDA when available), "cpu" or "cuda".
        dtype: dtype of the encoders (the VAE runs in float32 by default: fp16 SDXL VAEs overflow).
    Returns:
        ``PreparedIndex`` with the item table and what was computed; ``noop`` when everything was cached.
    Raises:
        DataError: the curated dataset is missing or inconsistent. ModelNotFoundError: a model cannot be loaded.
    """
    import pandas as pd
    import torch

    cfg = cfg or PrepareConfig()
    out = Path(output_dir)
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    rows = read_curated(dataset_dir, cfg)
    model_fp = model_fingerprint(model, local_files_only=local_files_only)
    clip_fp = (model_fingerprint(clip_model, local_files_only=local_files_only, config_key="model.clip")
               if clip_model else None)
    for r in rows:
        r.input_hash = _input_hash(r, cfg)
        r.key = _sha256_json({"v": ITEM_VERSION, "in": r.input_hash, "model": model_fp, "clip": clip_fp,
                              "cfg": cfg.item_params()})[:40]
    captions = _captions(rows, cfg)
    own_rows = {(c["class_noun"], c["prompt"]): i for i, c in enumerate(captions) if c["kind"] == "image"}
    text_key = _sha256_json({"v": TEXT_VERSION, "captions": captions, "model": model_fp})[:40]
    text_file = out / "text" / f"{text_key}.safetensors"
    identities = sorted({r.identity for r in rows})
    index = pd.DataFrame({
        "key": [r.key for r in rows],
        "identity": [r.identity for r in rows],
        "identity_index": [identities.index(r.identity) for r in rows],
        "class_noun": [r.class_noun for r in rows],
        "source": [r.source for r in rows],
        "sha256": [r.sha256 for r in rows],
        "face_index": [r.face_index for r in rows],
        "file": [item_path(Path("."), r.key).as_posix() for r in rows],
        "caption_row": [own_rows.get((r.class_noun, r.caption), -1) for r in rows],
    })
    fingerprint = _sha256_json({"items": index[["key", "identity", "class_noun"]].values.tolist(), "text": text_key})
    info_path = out / "prepared.json"
    todo = [r for r in rows if not _reusable(item_path(out, r.key))]
    need_text = not _reusable(text_file)
    if not todo and not need_text and info_path.is_file() and (out / "index.parquet").is_file():
        previous = json.loads(info_path.read_text())
        if previous.get("fingerprint") == fingerprint:
            log.info("prepare: %s is up to date (%d items)", out, len(rows))
            return PreparedIndex(out, pd.read_parquet(out / "index.parquet"), previous, reused=len(rows), noop=True)

    enc = None
    if todo or need_text:
        enc = _load_encoders(model, clip_model, cfg, device, dtype, local_files_only, need_clip=bool(todo))
    if todo:  # before the long part: the items' size is known once the model's latent size is
        check_free_space(out, len(todo), _item_bytes(enc, cfg), "prepare", unit="items")
    if todo:
        from tqdm.auto import tqdm

        log.info("prepare: encoding %d of %d images at %dpx on %s", len(todo), len(rows), enc.resolution, device)
        with tqdm(total=len(todo), desc="prepare", unit="img", disable=None) as bar:
            for start in range(0, len(todo), cfg.batch_size):
                chunk = todo[start:start + cfg.batch_size]
                for row, tensors in zip(chunk, _encode_items(enc, chunk, cfg), strict=True):
                    meta = {"identity": row.identity, "source": row.source, "input_hash": row.input_hash,
                            "resolution": str(enc.resolution), "target": cfg.target,
                            "bucket": "x".join(map(str, tensors["latents"].shape[-2:]))}
                    _save(item_path(out, row.key), tensors, cfg.storage_dtype, meta)
                bar.update(len(chunk))
    if need_text:
        assert enc is not None
        _save(text_file, _encode_captions(enc, [c["prompt"] for c in captions]), cfg.storage_dtype,
              {"prompts": json.dumps([c["prompt"] for c in captions])})

    sample, resolution = _read_shapes(item_path(out, rows[0].key))
    sizes = [target_size(r, cfg, resolution) for r in rows]
    index["bucket_h"] = [h for h, _ in sizes]
    index["bucket_w"] = [w for _, w in sizes]
    buckets: dict[str, int] = {}
    for h, w in sizes:
        buckets[f"{h}x{w}"] = buckets.get(f"{h}x{w}", 0) + 1
    # shapes: of the first item (other buckets differ in latents' and face_mask's h, w)
    info = {
        **prepared_info(fingerprint, dataset_dir, model, model_fp, clip_model, clip_fp, cfg, resolution, sample,
                        text_file.relative_to(out).as_posix(), captions, identities, len(rows)),
        "target": cfg.target,
        "buckets": dict(sorted(buckets.items())),  # "HxW" (target pixels) -> items
    }
    with atomic_path(out / "index.parquet") as tmp:
        index.to_parquet(tmp, index=False)
    atomic_write_text(info_path, json.dumps(info, indent=2, sort_keys=True))
    pruned = _prune(out, set(index["key"]), text_file) if cfg.prune else 0
    log.info("prepare: %d items (%d encoded), captions %s", len(rows), len(todo), "encoded" if need_text else "cached")
    return PreparedIndex(out, index, info, computed=len(todo), reused=len(rows) - len(todo),
                         text_computed=need_text, pruned=pruned)


def prepared_info(fingerprint: str, dataset_dir: Any, model: Any, model_fp: str, clip_model: str | None,
                  clip_fp: str | None, cfg: PrepareConfig, resolution: int, shapes: dict[str, list[int]],
                  text_file: str, captions: list[dict[str, str]], identities: list[str], num_items: int
                  ) -> dict[str, Any]:
    """The fields of ``prepared.json`` every prepare engine writes (each adds its own layout's)."""
    return {
        "format": FORMAT,
        "fingerprint": fingerprint,
        "dataset": str(Path(dataset_dir)),
        "model": str(model),
        "model_fingerprint": model_fp,
        "clip_model": clip_model,
        "clip_fingerprint": clip_fp,
        # what generation must compute the same way (idforge.train.clip_features)
        "clip_features": clip_record(clip_model, cfg.clip_hidden_layer, cfg.clip_crop) if clip_model else None,
        "config": cfg.model_dump(mode="json"),
        "resolution": resolution,
        "shapes": shapes,
        "text_file": text_file,
        "captions": captions,
        "identities": identities,
        "num_items": num_items,
        "num_identities": len(identities),
    }


def _read_shapes(path: Path) -> tuple[dict[str, list[int]], int]:
    """Tensor shapes of a cached item and the training resolution it was encoded at."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as fh:
        shapes = {k: list(fh.get_slice(k).get_shape()) for k in fh.keys()}
        return shapes, int((fh.metadata() or {})["resolution"])


def _prune(out: Path, keep: set[str], text_file: Path) -> int:
    """Delete item and caption files the current index does not reference (content from older inputs)."""
    n = 0
    for f in (out / "items").glob("*/*.safetensors"):
        if f.stem not in keep:
            f.unlink()
            n += 1
    for f in (out / "text").glob("*.safetensors"):
        if f != text_file:
            f.unlink()
    return n
