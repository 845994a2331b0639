"""Small curated datasets in the ``idforge curate`` output schema, for tests, demos and benchmarks of training.

``write_curated_synthetic`` draws "faces" whose colours and proportions depend on the identity, with identity
embeddings clustered per identity: no face model and no photo needed (benchmarks, fast tests). Real photos go
through ``idforge curate`` instead.

It writes what ``idforge.curate`` writes (``idforge.curate.manifest``): ``manifest.parquet`` (accepted rows: source,
sha256, status, reason, face_index, bbox, landmarks5, det_score, identity, aligned (ArcFace 112 crop), aligned_ffhq
(512 crop), mask (face mask in the 512 crop's frame), embedding_row), ``identities.parquet``, ``embeddings.npy``
(N, D) float32 L2-normalised, ``crops/`` and ``masks/``.
"""

from __future__ import annotations

import hashlib
import io
import os
from pathlib import Path
from typing import Any

import numpy as np

from idforge.errors import DataError
from idforge.io.atomic import atomic_path, atomic_write_bytes


def _png(arr: np.ndarray) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


def _write_tables(out: Path, rows: list[dict[str, Any]], embeddings: np.ndarray) -> Path:
    import pandas as pd

    from idforge.curate.manifest import manifest_schema, write_table

    manifest = pd.DataFrame(rows)
    ids = manifest.groupby("identity", sort=True)
    identities = pd.DataFrame({
        "identity": list(ids.groups),
        "members": [len(g) for _, g in ids],
        "centroid_row": [int(g["embedding_row"].iloc[0]) for _, g in ids],
        "label": list(ids.groups),
        "embedding_dim": [int(embeddings.shape[1])] * len(ids.groups),
    })
    # every column curation writes (null where a synthetic face has no value), so readers asking for all find them
    with atomic_path(out / "manifest.parquet") as tmp:
        write_table([{name: row.get(name) for name in manifest_schema().names} for row in rows], manifest_schema(),
                    tmp)
    with atomic_path(out / "identities.parquet") as tmp:
        identities.to_parquet(tmp, index=False)
    buf = io.BytesIO()
    np.save(buf, embeddings.astype(np.float32))
    atomic_write_bytes(out / "embeddings.npy", buf.getvalue())
    return out


def _draw_face(rng: np.random.Generator, palette: dict[str, np.ndarray], size: int) -> tuple[np.ndarray, np.ndarray]:
    """An RGB uint8 (size, size, 3) drawn face and its 5 landmarks (source pixels), varying pose/light per call."""
    import cv2

    from idforge.faces.align import template_for

    img = np.empty((size, size, 3), dtype=np.uint8)
    img[:] = np.clip(palette["background"] + rng.normal(0, 8, 3), 0, 255)
    # the template positions, jittered by a small similarity transform (pose) so alignment has work to do
    angle = rng.normal(0, 6) * np.pi / 180
    scale = 1 + rng.normal(0, 0.05)
    shift = rng.normal(0, 0.02 * size, 2)
    rot = scale * np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]])
    centre = np.array([size / 2, size / 2])
    kps = (template_for(size) - centre) @ rot.T + centre + shift
    eye_c = (kps[0] + kps[1]) / 2
    mouth_c = (kps[3] + kps[4]) / 2
    face_c = (eye_c + mouth_c) / 2
    eye_dist = np.linalg.norm(kps[1] - kps[0])
    axes = (int(eye_dist * palette["width"]), int(eye_dist * palette["height"]))
    deg = float(np.degrees(angle))
    light = rng.uniform(0.85, 1.15)
    c = lambda k: tuple(int(v) for v in np.clip(palette[k] * light, 0, 255))  # noqa: E731
    hair_c = (int(face_c[0]), int(face_c[1] - axes[1] * 0.35))
    cv2.ellipse(img, hair_c, (int(axes[0] * 1.1), int(axes[1] * 0.9)), deg, 0, 360, c("hair"), -1)
    cv2.ellipse(img, (int(face_c[0]), int(face_c[1])), axes, deg, 0, 360, c("skin"), -1)
    r = max(int(eye_dist * 0.12), 1)
    for p in kps[:2]:
        cv2.circle(img, (int(p[0]), int(p[1])), r, c("eyes"), -1)
    cv2.line(img, tuple(int(v) for v in kps[3]), tuple(int(v) for v in kps[4]), c("mouth"), max(r // 2, 1))
    noise = rng.normal(0, 4, img.shape)
    return np.clip(img + noise, 0, 255).astype(np.uint8), kps.astype(np.float32)


def _in_canvas(img: np.ndarray, kps: np.ndarray, aspect: float, rng: np.random.Generator
               ) -> tuple[np.ndarray, np.ndarray]:
    """The drawn photo placed at a random offset on a wider (aspect > 1) or taller canvas of its background."""
    h, w = img.shape[:2]
    ch, cw = (h, max(w, round(w * aspect))) if aspect >= 1 else (max(h, round(h / aspect)), w)
    canvas = np.empty((ch, cw, 3), np.float64)
    canvas[:] = img[:4, :4].reshape(-1, 3).mean(0)
    canvas = np.clip(canvas + rng.normal(0, 4, canvas.shape), 0, 255).astype(np.uint8)
    ox, oy = int(rng.integers(0, cw - w + 1)), int(rng.integers(0, ch - h + 1))
    canvas[oy:oy + h, ox:ox + w] = img
    return canvas, (kps + np.array([ox, oy], dtype=np.float32)).astype(np.float32)


def write_curated_synthetic(out_dir: str | os.PathLike[str], identities: int = 4, images_per_identity: int = 3,
                            size: int = 512, embedding_dim: int = 512, seed: int = 0,
                            photo_aspects: list[float] | None = None) -> Path:
    """A synthetic curated dataset: ``identities`` x ``images_per_identity`` drawn faces.

    Each identity has its own colours and face proportions (what the images share) and a random unit embedding
    direction; each image adds pose, light and pixel noise, and its embedding is that direction plus noise
    (cosine ~0.9 within an identity, ~0 across). Deterministic per ``seed``. ``photo_aspects`` (cycled over the
    images) places each drawn photo on a canvas of that width/height, so photo targets fall into several buckets.
    """
    import cv2

    from idforge.faces.align import align_face, alignment_matrix
    from idforge.faces.masks import ellipse_mask

    if identities < 1 or images_per_identity < 1:
        raise DataError("need at least one identity with one image")
    rng = np.random.default_rng(seed)
    out = Path(out_dir)
    (out / "crops").mkdir(parents=True, exist_ok=True)
    (out / "masks").mkdir(parents=True, exist_ok=True)
    rows, embeddings = [], []
    for i in range(identities):
        palette = {k: rng.uniform(20, 235, 3) for k in ("background", "skin", "hair", "eyes", "mouth")}
        palette.update(width=rng.uniform(0.9, 1.3), height=rng.uniform(1.2, 1.7))
        direction = rng.normal(size=embedding_dim)
        direction /= np.linalg.norm(direction)
        identity = f"id{i:02d}"
        for j in range(images_per_identity):
            img, kps = _draw_face(rng, palette, size)
            if photo_aspects:
                img, kps = _in_canvas(img, kps, photo_aspects[(i * images_per_identity + j) % len(photo_aspects)], rng)
            data = _png(img)
            sha = hashlib.sha256(data).hexdigest()
            stem = f"{identity}_{j}"
            atomic_write_bytes(out / "photos" / f"{stem}.png", data)
            c112 = align_face(img, kps, 112)
            c512 = align_face(img, kps, 512, border="reflect")
            m = alignment_matrix(kps, 512)
            eye = np.linalg.norm(kps[1] - kps[0]) * np.hypot(*m[:, 0])
            centre = ((kps[0] + kps[1] + kps[3] + kps[4]) / 4) @ m[:, :2].T + m[:, 2]
            half = np.array([eye * palette["width"], eye * palette["height"]])
            mask = ellipse_mask((512, 512), (*(centre - half), *(centre + half)))
            mask = cv2.GaussianBlur(mask, (0, 0), 3)
            atomic_write_bytes(out / "crops" / f"{stem}_112.png", _png(c112))
            atomic_write_bytes(out / "crops" / f"{stem}_512.png", _png(c512))
            atomic_write_bytes(out / "masks" / f"{stem}_face.png", _png(mask))
            e = direction + rng.normal(scale=0.5 / np.sqrt(embedding_dim), size=embedding_dim)  # |noise| ~ 0.5
            embeddings.append(e / np.linalg.norm(e))
            rows.append({
                "source": f"photos/{stem}.png", "sha256": sha, "status": "accepted", "reason": "", "face_index": 0,
                "bbox": [float(v) for v in (*kps.min(0) - 40, *kps.max(0) + 40)], "landmarks5": kps.tolist(),
                "det_score": 0.99, "identity": identity,
                "aligned": f"crops/{stem}_112.png", "aligned_ffhq": f"crops/{stem}_512.png",
                "mask": f"masks/{stem}_face.png", "embedding_row": len(rows), "photo": f"photos/{stem}.png",
                "width": int(img.shape[1]), "height": int(img.shape[0]),
            })
    return _write_tables(out, rows, np.stack(embeddings))
