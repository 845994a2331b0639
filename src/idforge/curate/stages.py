"""The dataset-level stages of curation, over typed rows (``curate/rows.py``), in the order ``curate/run.py``
composes them: collect the per-file results -> matte -> dedup and group (one similarity graph) -> tables.

Each stage is a function any engine calls (the local process pool and the Ray Data engine); :func:`timed` is the
one place stage wall-clock times are taken.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from idforge.curate.config import CurateConfig
from idforge.curate.report import CurateReport
from idforge.curate.rows import AcceptedFace, ManifestRow, crop_paths, file_rows


@contextlib.contextmanager
def timed(timings: dict[str, float], name: str) -> Iterator[None]:
    """Add the block's wall-clock seconds to ``timings[name]``."""
    t = time.perf_counter()
    try:
        yield
    finally:
        timings[name] = timings.get(name, 0.0) + time.perf_counter() - t


@dataclass
class Collected:
    """Every manifest row, the accepted faces among them (in manifest order) and their (F, D) embeddings."""

    rows: list[ManifestRow] = field(default_factory=list)
    faces: list[AcceptedFace] = field(default_factory=list)
    embeddings: np.ndarray = field(default_factory=lambda: np.zeros((0, 0), np.float32))
    cached_files: int = 0

    @property
    def dim(self) -> int:
        return int(self.embeddings.shape[1]) if len(self.faces) else 0


def link(src: Path, dst: Path) -> None:
    """Hard-link ``src`` to ``dst`` (free on one filesystem), else copy; an existing ``dst`` is kept."""
    if dst.exists():
        return
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


def label_of(label_map: dict[str, str], source: str, rel: str) -> str:
    from idforge.curate.group import label_for

    return label_for(label_map, source, rel) if label_map else ""


def collect(out: Path, results: list[dict], ccfg: CurateConfig, label_map: dict[str, str]) -> Collected:
    """Read each file's cache entry (sorted by relative path) into rows; link the accepted faces' crops and face
    masks from their cache entries into ``out``."""
    from idforge.curate.process import CROP112, CROP_FFHQ, FACE_MASK, PHOTO

    cache = out / "cache"
    for sub in ("crops", "masks", "matted", "photos"):
        (out / sub).mkdir(parents=True, exist_ok=True)
    got = Collected(cached_files=sum(1 for r in results if r["cached"]))
    emb_parts: list[np.ndarray] = []
    for res in sorted(results, key=lambda r: r["rel"]):
        entry = cache / res["key"]
        rec = res.get("record") or json.loads((entry / "result.json").read_text())  # inline: worker_crashed
        rows, faces = file_rows(res, rec, label_of(label_map, res["source"], res["rel"]), ccfg.align.ffhq_size,
                                entry)
        got.rows.extend(rows)
        if faces:
            emb = np.load(entry / "emb.npy")
        for face in faces:
            i = face.row.face_index
            link(entry / CROP112.format(i=i), out / face.row.aligned)
            link(entry / CROP_FFHQ.format(i=i), out / face.row.aligned_ffhq)
            link(entry / FACE_MASK.format(i=i), out / face.row.mask)
            link(entry / PHOTO, out / face.row.photo)
            face.row.embedding_row = len(got.faces)
            got.faces.append(face)
            emb_parts.append(emb[face.emb_index])
    if emb_parts:
        got.embeddings = np.stack(emb_parts).astype(np.float32)
    return got


def matte(out: Path, faces: list[AcceptedFace], ccfg: CurateConfig) -> None:
    """Person masks and grey-background composites for every cropped face.

    landmarks: both were made by the per-file workers (in parallel) and are linked from their cache entries.
    mediapipe: one batch subprocess per ``matte.batch_size`` crops writes mask and composite into the matte cache
    (keyed by the per-file key, face index and grey level). Anything missing (e.g. the grey level changed) is
    computed here on ``curate.workers`` threads.
    """
    from concurrent.futures import ThreadPoolExecutor

    import cv2

    from idforge.curate import matte as mt
    from idforge.curate.process import LANDMARK_MATTE, LANDMARK_MATTED

    backend, grey = ccfg.matte.backend, ccfg.matte.grey
    if backend == "none" or not faces:
        return
    mcache = out / "cache" / "matte" / backend
    mcache.mkdir(parents=True, exist_ok=True)
    src: list[tuple[Path, Path]] = []  # per face: (person mask, composite)
    for face in faces:
        i = face.row.face_index
        if backend == "landmarks":
            src.append((face.entry / LANDMARK_MATTE.format(i=i), face.entry / LANDMARK_MATTED.format(i=i, grey=grey)))
        else:
            src.append((mcache / f"{face.matte_key}.png", mcache / f"{face.matte_key}_g{grey}.png"))
    if backend == "mediapipe":
        todo = [(out / face.row.aligned_ffhq, m, c) for face, (m, c) in zip(faces, src, strict=True)
                if not (m.is_file() and c.is_file())]
        if todo:
            mt.run_mediapipe(mt.matte_python(ccfg.matte), todo, batch_size=ccfg.matte.batch_size, grey=grey)

    def place(k: int) -> None:
        row, (mask_src, comp_src) = faces[k].row, src[k]
        paths = crop_paths(faces[k].stem, ccfg.align.ffhq_size)
        row.person_mask, row.matted = paths["person_mask"], paths["matted"]
        link(mask_src, out / row.person_mask)
        if comp_src.is_file():
            link(comp_src, out / row.matted)
        else:  # a cached per-file entry made for another grey level or matte backend
            crop = cv2.imread(str(out / row.aligned_ffhq), cv2.IMREAD_COLOR)
            alpha = cv2.imread(str(mask_src), cv2.IMREAD_GRAYSCALE)
            comp = mt.composite(crop, alpha, grey)  # channel order does not matter to a blend
            cv2.imwrite(str(out / row.matted), comp, [cv2.IMWRITE_PNG_COMPRESSION, 1])

    with ThreadPoolExecutor(max_workers=max(1, ccfg.workers)) as pool:
        list(pool.map(place, range(len(faces))))
    if backend == "mediapipe":
        used = {p.name for pair in src for p in pair}
        for stale in mcache.iterdir():  # mattes of files no longer in the input, or of other per-file configs
            if stale.name not in used:
                stale.unlink()


def grouping_threshold(ccfg: CurateConfig) -> float:
    from idforge.curate.group import default_threshold

    t = ccfg.grouping.threshold
    return default_threshold(ccfg.backend) if t is None else t


def dedup_and_group(faces: list[AcceptedFace], emb: np.ndarray, ccfg: CurateConfig,
                    timings: dict[str, float]) -> tuple[list[dict[str, Any]], dict[str, float]]:
    """Stages 6-7 on the accepted faces (rows updated in place: identity, duplicates, too few images).

    One similarity graph (``curate/knn.py``) at the grouping threshold serves both: duplicates are judged on its
    edges, and the faces left are clustered on its subgraph. Returns the identities table's rows and the grouping
    metrics (pairwise precision/recall against the labels, when >= 2 faces are labelled).
    """
    from idforge.curate import dedup, group
    from idforge.curate.knn import knn_graph

    threshold = grouping_threshold(ccfg)
    with timed(timings, "dedup"):
        graph = knn_graph(emb, threshold) if faces else None
        dup_of = [-1] * len(faces)
        if ccfg.dedup.enabled and faces:
            keys = [(-(f.row.size_px or 0.0), f.row.source, f.row.face_index) for f in faces]
            dup_of = dedup.find_duplicates(emb, [f.phash for f in faces], keys, threshold,
                                           ccfg.dedup.phash_max_distance, ccfg.dedup.embedding_min_similarity,
                                           graph=graph)
    with timed(timings, "group"):
        kept = np.array([k for k in range(len(faces)) if dup_of[k] < 0], dtype=np.int64)
        metrics: dict[str, float] = {}
        if len(kept):
            clusters = group.cluster(emb[kept], threshold, ccfg.grouping.linkage, graph=graph.subgraph(kept))
            member_keys = [f"{faces[k].row.sha256}:{faces[k].row.face_index}" for k in kept]
            face_labels = [faces[k].row.label for k in kept]
            ids = group.assign_identities(clusters, member_keys, face_labels, ccfg.grouping.labels_mode)
            labelled = [j for j, lab in enumerate(face_labels) if lab]
            if len(labelled) >= 2:  # how well the embeddings alone recover the given labels
                p, r = group.pairwise_precision_recall([str(clusters[j]) for j in labelled],
                                                       [face_labels[j] for j in labelled])
                metrics.update(grouping_pairwise_precision=p, grouping_pairwise_recall=r)
            for k, ident in zip(kept.tolist(), ids, strict=True):
                faces[k].row.identity = ident
        for k, d in enumerate(dup_of):
            if d >= 0:
                row = faces[k].row
                row.identity, row.status, row.reason = faces[d].row.identity, "rejected", "duplicate"
                row.duplicate_of = faces[d].row.source
        members: dict[str, list[int]] = {}
        for k in kept.tolist():
            members.setdefault(faces[k].row.identity, []).append(k)
        ident_rows = []
        for ident in sorted(members):
            ks = members[ident]
            if len(ks) < ccfg.min_images_per_identity:
                for k in ks:
                    faces[k].row.status, faces[k].row.reason = "rejected", "too_few_images"
                continue
            mean = emb[ks].mean(0)
            centroid = ks[int(np.argmax(emb[ks] @ mean))]
            labs = Counter(faces[k].row.label for k in ks if faces[k].row.label)
            ident_rows.append({"identity": ident, "members": len(ks), "centroid_row": int(centroid),
                               "label": labs.most_common(1)[0][0] if labs else "",
                               "embedding_dim": int(emb.shape[1]) if len(faces) else 0})
    return ident_rows, metrics


def write_tables(out: Path, rows: list[ManifestRow], ident_rows: list[dict[str, Any]], emb: np.ndarray) -> None:
    """The manifest (sorted by relative path and face), the identities table and the embeddings."""
    from idforge.curate.manifest import IDENTITIES, identities_schema, write_manifest, write_table

    write_manifest([r.as_dict() for r in sorted(rows, key=lambda r: (r.rel, r.face_index))], out)
    write_table(ident_rows, identities_schema(), out / IDENTITIES)
    np.save(out / "embeddings.npy", emb)


def build_report(rows: list[ManifestRow], ident_rows: list[dict[str, Any]], ccfg: CurateConfig, dim: int,
                 models: dict[str, Any], timings: dict[str, float], metrics: dict[str, float],
                 cached_files: int) -> CurateReport:
    from idforge.faces.models import INSIGHTFACE_LICENCE, OPENCV_ZOO_LICENCE

    statuses = Counter(r.status for r in rows)
    licence = INSIGHTFACE_LICENCE if ccfg.backend == "insightface" else OPENCV_ZOO_LICENCE
    backend_info = {"backend": ccfg.backend, "embedding_dim": dim, "models": models, "licence": licence,
                    "grouping_threshold": grouping_threshold(ccfg), "matte": ccfg.matte.backend}
    return CurateReport(
        output="",
        rows=len(rows),
        counts={s: statuses.get(s, 0) for s in ("accepted", "rejected")},
        reasons=dict(sorted(Counter(r.reason for r in rows if r.status == "rejected").items())),
        identities=len(ident_rows),
        faces_accepted=statuses.get("accepted", 0),
        cached_files=cached_files,
        workers=ccfg.workers,
        timings={k: round(v, 4) for k, v in timings.items()},
        backend=backend_info,
        metrics=metrics,
    )
