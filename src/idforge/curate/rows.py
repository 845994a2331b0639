"""Typed rows of the manifest: one :class:`ManifestRow` per input file (rejected files) and per detected face, and
the :class:`AcceptedFace` the dataset-level stages (matte, dedup, grouping) work on.

:func:`file_rows` turns one file's per-file record (``curate/process.py``) into its rows; it is pure, so any engine
(the local process pool, Ray Data actors) and a retried file produce the same rows.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any


@dataclass
class ManifestRow:
    """One manifest row; the fields are the manifest schema's columns, in order (``curate/manifest.py``)."""

    source: str
    rel: str
    sha256: str
    status: str
    reason: str
    detail: str = ""
    face_index: int = -1
    bbox: list[float] | None = None
    landmarks5: list[list[float]] | None = None
    det_score: float | None = None
    size_px: float | None = None
    sharpness: float | None = None
    yaw_deg: float | None = None
    roll_deg: float | None = None
    width: int | None = None
    height: int | None = None
    format: str = ""
    identity: str = ""
    label: str = ""
    duplicate_of: str = ""
    aligned: str = ""
    aligned_ffhq: str = ""
    mask: str = ""
    person_mask: str = ""
    matted: str = ""
    embedding_row: int = -1
    caption: str = ""  # the photo's own caption (captions.csv / sidecar .txt), "" when none
    photo: str = ""  # an accepted face's upright photo (as the detector saw it), for prepare's photo target

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


MANIFEST_COLUMNS = tuple(f.name for f in fields(ManifestRow))


@dataclass
class AcceptedFace:
    """A face that passed the gates: its manifest row plus what the dataset-level stages need.

    Attributes:
        row: the face's manifest row (updated in place by matte, dedup and grouping).
        key: the per-file cache key of its file (``<sha256>-<config digest>``).
        entry: the per-file cache entry holding its crops (None where an engine wrote them elsewhere).
        stem: ``<sha16>_<face index>``, the file-name stem of its crops in the dataset.
        phash: 64-bit perceptual hash of its FFHQ-style crop.
        emb_index: row of its embedding in its file's ``emb.npy``.
    """

    row: ManifestRow
    key: str
    stem: str
    phash: int
    emb_index: int
    entry: Path | None = field(default=None, compare=False)

    @property
    def matte_key(self) -> str:
        return f"{self.key}_{self.row.face_index}"


def crop_paths(stem: str, ffhq_size: int) -> dict[str, str]:
    """Dataset-relative paths of one accepted face's files (the manifest's path columns)."""
    return {
        "aligned": f"crops/{stem}_112.png",
        "aligned_ffhq": f"crops/{stem}_{ffhq_size}.png",
        "mask": f"masks/{stem}_face.png",
        "person_mask": f"masks/{stem}_person.png",
        "matted": f"matted/{stem}.png",
    }


def photo_path(sha256: str) -> str:
    """Dataset-relative path of a file's upright photo (one per file, shared by its faces)."""
    return f"photos/{sha256[:16]}.jpg"


def file_rows(summary: dict[str, Any], record: dict[str, Any], label: str, ffhq_size: int,
              entry: Path | None = None) -> tuple[list[ManifestRow], list[AcceptedFace]]:
    """The rows of one file (its file row when rejected, else one per detected face) and its accepted faces.

    Args:
        summary: what ``process.run_task`` returned (``source``, ``rel``, ``sha256``, ``key``).
        record: the file's per-file record (``result.json``).
        label: the file's label ('' when unlabelled); only its main (largest, index 0) face carries it.
    """
    base = dict(source=summary["source"], rel=summary["rel"], sha256=summary["sha256"],
                detail=record.get("detail", ""), width=record.get("width"), height=record.get("height"),
                format=record.get("format", ""))
    if record["status"] == "rejected":
        return [ManifestRow(**base, status="rejected", reason=record["reason"], label=label)], []
    rows: list[ManifestRow] = []
    accepted: list[AcceptedFace] = []
    for f in record["faces"]:
        bbox = f.get("bbox")
        i = int(f["face_index"])
        row = ManifestRow(
            **base, status="rejected" if f["reason"] else "accepted", reason=f["reason"], face_index=i,
            bbox=[round(v, 3) for v in bbox] if bbox else None, landmarks5=f.get("landmarks5"),
            det_score=f.get("det_score"), size_px=f.get("size_px"), sharpness=f.get("sharpness"),
            yaw_deg=f.get("yaw_deg"), roll_deg=f.get("roll_deg"), label=label if i == 0 else "",
        )
        rows.append(row)
        if not f["reason"]:
            stem = f"{summary['sha256'][:16]}_{i}"
            paths = crop_paths(stem, ffhq_size)
            row.aligned, row.aligned_ffhq, row.mask = paths["aligned"], paths["aligned_ffhq"], paths["mask"]
            row.photo = photo_path(summary["sha256"])
            accepted.append(AcceptedFace(row=row, key=summary["key"], stem=stem, phash=int(f["phash"], 16),
                                         emb_index=int(f["emb_index"]), entry=entry))
    return rows, accepted
