"""Reference photos of identities: find them, align their faces, and turn them into a method's ``IdentityRefs``.

Generation (the method's conditioning), evaluation (the reference embeddings) and the registered model's
``predict`` all go through here, with the same face code curation uses (``idforge.faces``).

Where references come from (``discover_references``):
- a curated dataset directory (``manifest.parquet``): accepted rows grouped by ``identity``, images from the
  aligned-crop column;
- a folder of ``<identity>/`` sub-folders of photos;
- a folder of photos (one identity, named after the folder), or one photo file.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from idforge.errors import DataError
from idforge.io.identity import check_identity

if TYPE_CHECKING:  # pragma: no cover
    from idforge.faces import FaceAnalyzer
    from idforge.methods.types import IdentityRefs

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".webp", ".bmp"}


def read_rgb(path: str | os.PathLike[str]) -> np.ndarray:
    """(H, W, 3) uint8 RGB of an image file (EXIF orientation applied)."""
    from PIL import Image, ImageOps

    try:
        with Image.open(path) as im:
            return np.asarray(ImageOps.exif_transpose(im).convert("RGB"))
    except (OSError, ValueError) as exc:
        raise DataError(f"reference image {path} cannot be read: {exc}") from None


def _images_in(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)


# A folder of face crops already aligned to our templates (generate writes one beside its images).
PREALIGNED_MARKER = ".prealigned"


def _aligned_column(manifest: Any) -> str:
    # the FFHQ-style 512 crop first: CLIP-I, LPIPS and the report want the larger face; the 112 ArcFace crop
    # is derived from it exactly (same landmarks, other template)
    for col in ("aligned_ffhq", "aligned"):
        if col in manifest.columns and manifest[col].astype(str).str.len().gt(0).any():
            return col
    raise DataError(f"curated manifest has no aligned-crop column (looked for aligned_ffhq, aligned); "
                    f"columns: {', '.join(manifest.columns)}")


def references_prealigned(path: str | os.PathLike[str]) -> bool:
    """True when ``path`` holds template-aligned crops (a curated dataset, or a folder with the marker file)."""
    root = Path(path)
    from idforge.curate.manifest import is_curated

    return is_curated(root) or (root / PREALIGNED_MARKER).is_file()


def discover_references(
    path: str | os.PathLike[str], identities: Sequence[str] | None = None
) -> dict[str, list[Path]]:
    """identity -> reference image files, sorted by identity then file; ``identities`` selects a subset.

    Raises:
        DataError: nothing usable at ``path``, or a requested identity is not there.
    """
    from idforge.curate.manifest import is_curated, manifest_columns, read_manifest

    root = Path(path)
    found: dict[str, list[Path]] = {}
    if is_curated(root):
        have = manifest_columns(root)
        cols = [c for c in ("identity", "aligned_ffhq", "aligned") if c in have]
        m = read_manifest(root, columns=cols, accepted_only="status" in have)
        col = _aligned_column(m)
        m = m[m["identity"].notna() & (m["identity"].astype(str) != "") & m[col].notna() & (m[col].astype(str) != "")]
        for ident, grp in m.groupby("identity", sort=True):
            found[str(ident)] = [p if p.is_absolute() else root / p for p in map(Path, sorted(grp[col].astype(str)))]
    elif root.is_dir():
        subdirs = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".") and _images_in(p))
        if subdirs:
            found = {d.name: _images_in(d) for d in subdirs}
        elif _images_in(root):
            found = {root.name: _images_in(root)}
    elif root.is_file() and root.suffix.lower() in IMAGE_SUFFIXES:
        found = {root.stem: [root]}
    for ident in found:  # each names output folders and artifact lookups: one rule for all of them
        check_identity(ident, f"references {root}")
    if not found:
        raise DataError(
            f"references {root}: no identities found; give a curated dataset dir (manifest.parquet), "
            "a folder of <identity>/ photo folders, a folder of photos, or one photo"
        )
    if identities:
        missing = [i for i in identities if i not in found]
        if missing:
            raise DataError(f"references {root}: identities {missing} not found; available: {', '.join(found)}")
        found = {i: found[i] for i in identities}
    return found


@dataclass
class ReferenceFaces:
    """Aligned faces of one identity's reference photos.

    crops112: (K, 112, 112, 3) uint8 ArcFace-aligned; crops512: (K, 512, 512, 3) uint8 FFHQ-style aligned;
    sources: the K photos the faces came from (photos without a detectable face are left out and logged).
    """

    identity: str
    crops112: np.ndarray
    crops512: np.ndarray
    sources: list[str]


def align_references(
    identity: str,
    images: Sequence[np.ndarray],
    analyzer: "FaceAnalyzer",
    sources: Sequence[str] | None = None,
    prealigned: bool = False,
) -> ReferenceFaces:
    """Detect the largest face in each photo and align it (112 ArcFace + 512 FFHQ templates).

    A 112x112 image is taken as an ArcFace-aligned crop; with ``prealigned`` any square image is taken as a crop
    aligned to our template of its size (curated datasets, generate's ``refs/``), so no detector runs on it.

    Raises:
        DataError: no reference photo has a detectable face.
    """
    from idforge.faces.align import align_face, template_for

    sources = list(sources) if sources is not None else [f"{identity}[{i}]" for i in range(len(images))]
    c112, c512, kept = [], [], []
    for img, src in zip(images, sources, strict=True):
        h, w = img.shape[:2]
        if (h, w) == (112, 112) or (prealigned and h == w):
            # the landmarks are where the template put them: re-warp to both templates (exact, no detector)
            kps = template_for(h).astype(np.float32)
            c112.append(img if h == 112 else align_face(img, kps, size=112))
            c512.append(img if h == 512 else align_face(img, kps, size=512, border="reflect"))
            kept.append(src)
            continue
        faces = analyzer.detect(img)
        if not faces:
            log.warning("reference %s: no face detected, skipped", src)
            continue
        face = max(faces, key=lambda f: f.area)
        c112.append(align_face(img, face.kps, size=112))
        c512.append(align_face(img, face.kps, size=512, border="reflect"))
        kept.append(src)
    if not c112:
        raise DataError(f"identity {identity!r}: none of its {len(sources)} reference photos has a detectable face")
    return ReferenceFaces(identity, np.stack(c112), np.stack(c512), kept)


def load_reference_faces(
    refs: dict[str, list[Path]], analyzer: "FaceAnalyzer", prealigned: bool = False
) -> dict[str, ReferenceFaces]:
    """Read and align every identity's reference photos."""
    return {
        ident: align_references(ident, [read_rgb(p) for p in paths], analyzer, [str(p) for p in paths], prealigned)
        for ident, paths in refs.items()
    }


def clip_image_features(clip: Any, images: Sequence[np.ndarray], hidden_layer: int = -2,
                        batch_size: int = 16) -> tuple["Any", "Any"]:
    """CLIP features of face crops, as the prepare stage computes them for training.

    Returns ((N, Dclip) projected pooled embeddings, (N, P, Dvis) vision hidden states of ``hidden_layer``,
    class token first), float32 on CPU.
    """
    import torch

    model, _, processor = (clip.model, clip.tokenizer, clip.image_processor) if hasattr(clip, "model") else clip
    device = next(model.parameters()).device
    pooled, patches = [], []
    for i in range(0, len(images), batch_size):
        px = processor(images=list(images[i : i + batch_size]), return_tensors="pt").pixel_values
        with torch.inference_mode():
            out = model.vision_model(pixel_values=px.to(device, model.dtype), output_hidden_states=True)
            pooled.append(model.visual_projection(out.pooler_output).float().cpu())
            patches.append(out.hidden_states[hidden_layer].float().cpu())
    return torch.cat(pooled), torch.cat(patches)


def identity_refs(
    faces: ReferenceFaces,
    analyzer: "FaceAnalyzer",
    clip: Any | None = None,
    *,
    clip_crop: str = "ffhq",
    clip_hidden_layer: int = -2,
    class_noun: str = "person",
) -> "IdentityRefs":
    """A method's ``IdentityRefs`` from aligned reference faces: identity embeddings from ``analyzer`` (the
    conditioning face model), CLIP features when ``clip`` is given (else those fields stay None and a method that
    needs them says so), ArcFace crops as float [0, 1]."""
    import torch

    from idforge.methods.types import IdentityRefs

    face_embeds = torch.from_numpy(analyzer.embed_aligned(faces.crops112)).float()
    crops = torch.from_numpy(faces.crops112.copy()).permute(0, 3, 1, 2).float().div(255.0)
    clip_embeds = clip_patches = None
    if clip is not None:
        src = faces.crops512 if clip_crop == "ffhq" else faces.crops112
        clip_embeds, clip_patches = clip_image_features(clip, list(src), clip_hidden_layer)
    return IdentityRefs(
        face_embeds=face_embeds,
        clip_image_embeds=clip_embeds,
        clip_patch_tokens=clip_patches,
        face_crops=crops,
        class_noun=class_noun,
    )
