"""Curation settings (the ``curate:`` section of a config file).

Nested sections follow the stages: decode -> detect -> gates -> align -> matte -> dedup -> grouping. Everything
that changes what one input file produces (decode, detect, gates, align, backend, model_dir, min_face_px,
input_alignment) is part of the per-file cache key, so changing it re-processes the files; matte, dedup and
grouping are cheap and re-run.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from idforge.config_section import Section


class DecodeConfig(Section):
    """Stage 1: what inputs are accepted and how they are decoded."""

    formats: list[str] = Field(default_factory=lambda: ["JPEG", "MPO", "PNG", "WEBP"])
    # Decompression-bomb guard, checked from the header before any pixel is decoded.
    max_pixels: int = Field(default=80_000_000, gt=0)
    max_bytes: int = Field(default=100 * 1024 * 1024, gt=0)
    min_side: int = Field(default=32, gt=0)
    # Larger photos are decoded at reduced scale (JPEG DCT scaling, else resized) to at most this side; crops are
    # cut from the decoded image, coordinates in the manifest stay in source (EXIF-upright) pixels.
    max_side: int = Field(default=2048, ge=256)


class DetectConfig(Section):
    """Stage 2: detector threshold (None: the backend's default, insightface 0.5 / opencv 0.6)."""

    det_thresh: float | None = Field(default=None, ge=0.0, le=1.0)


class GatesConfig(Section):
    """Stage 3: quality gates (the minimum face size is ``curate.min_face_px``)."""

    min_det_score: float = Field(default=0.5, ge=0.0, le=1.0)
    # Variance of the Laplacian of the grey 112x112 aligned crop; lower is blurrier.
    min_sharpness: float = Field(default=25.0, ge=0.0)
    # Yaw estimated from the 5 landmarks (nose offset from the eye midline); 90 = profile.
    max_yaw_deg: float = Field(default=55.0, gt=0.0, le=90.0)
    # Several faces in one photo: keep the largest (others become `extra_face` rows), keep all, or reject the file.
    multi_face: Literal["largest", "all", "reject"] = "largest"


class AlignConfig(Section):
    """Stage 4: canonical crops (ArcFace 112 for embeddings; FFHQ-style for generative training)."""

    ffhq_size: int = Field(default=512, ge=128)
    # Border of the large crop: "reflect" avoids black wedges a generator would learn; "constant" fills with 0.
    ffhq_border: Literal["reflect", "constant"] = "reflect"


class MatteConfig(Section):
    """Stage 5: person matte of the FFHQ-style crop, composited on neutral grey.

    ``mediapipe`` runs selfie segmentation in its own venv (mediapipe 0.10.21 needs numpy<2 and protobuf<5, which
    the main environment cannot hold); create it with ``python -m idforge.curate.matte --create .venv-matte``.
    ``landmarks`` uses the face hull instead (no extra environment); ``none`` skips mattes.
    """

    backend: Literal["mediapipe", "landmarks", "none"] = "mediapipe"
    # The matte environment's interpreter; None: $IDFORGE_MATTE_PYTHON, else .venv-matte/bin/python under the CWD.
    python: str | None = None
    grey: int = Field(default=128, ge=0, le=255)
    batch_size: int = Field(default=64, ge=1)


class DedupConfig(Section):
    """Stage 6: near-duplicates are the same person in a near-identical image."""

    enabled: bool = True
    # Hamming distance of 64-bit perceptual hashes of the aligned FFHQ-style crops.
    phash_max_distance: int = Field(default=8, ge=0, le=64)
    # Cosine similarity above which two faces count as the same photo even when the hash differs (re-encodes).
    embedding_min_similarity: float = Field(default=0.95, ge=-1.0, le=1.0)


class GroupingConfig(Section):
    """Stage 7: identities from embeddings (cosine similarity graph), optionally seeded by labels.csv."""

    # None: the backend's default (insightface ArcFace 0.35, opencv SFace 0.40).
    threshold: float | None = Field(default=None, ge=-1.0, le=1.0)
    # connected: single linkage (any pair above threshold joins); average: average linkage (more conservative).
    linkage: Literal["average", "connected"] = "average"
    # labels.csv entries: "override" = a label always wins over clustering; unlabelled faces join the majority
    # label of their cluster. "seed" = labels only name clusters; clustering decides membership.
    labels_mode: Literal["override", "seed"] = "override"


class CurateConfig(Section):
    backend: Literal["insightface", "opencv"] = "insightface"
    # Directory of an insightface model pack (buffalo_l, antelopev2) or None for the embedded default.
    model_dir: str | None = None
    min_face_px: int = 64
    # How the inputs are framed. raw: photos (the detector alone). auto: photos or face-filling aligned crops
    # (a second detection on a padded canvas when the first finds nothing). arcface112 / ffhq: every input is a
    # crop aligned to that template (ArcFace 112x112 as WebFace/MS1M ship; FFHQ 512/1024): its landmarks are the
    # template's and no detector runs.
    input_alignment: Literal["auto", "raw", "arcface112", "ffhq"] = "raw"
    min_images_per_identity: int = 2
    # local: a process pool on this machine (per-file cache, resumable). ray: Ray Data over the files, an actor pool
    # of `workers` actors (face models loaded once per actor), results written straight to the output storage.
    engine: Literal["local", "ray"] = "local"
    # engine=ray: the Ray cluster to join (`ray.init(address=...)`, e.g. ray://head:10001 or auto); None: start a
    # local Ray with `workers` x `threads_per_worker` CPUs for this run.
    ray_address: str | None = None
    # engine=ray: files per actor call (the mediapipe matte runs once per call over its faces).
    ray_batch_files: int = Field(default=16, ge=1)
    # Process-pool size over input files (1 = in this process), or the Ray actor pool's size; models load once per
    # worker.
    workers: int = Field(default=1, ge=1)
    # Inference threads per worker; 1 keeps one worker per core from oversubscribing the machine.
    threads_per_worker: int = Field(default=1, ge=1)
    # Where S3 inputs are downloaded and S3 outputs are staged; None: ~/.cache/idforge/curate.
    work_dir: str | None = None
    progress: bool = True
    decode: DecodeConfig = Field(default_factory=DecodeConfig)
    detect: DetectConfig = Field(default_factory=DetectConfig)
    gates: GatesConfig = Field(default_factory=GatesConfig)
    align: AlignConfig = Field(default_factory=AlignConfig)
    matte: MatteConfig = Field(default_factory=MatteConfig)
    dedup: DedupConfig = Field(default_factory=DedupConfig)
    grouping: GroupingConfig = Field(default_factory=GroupingConfig)
