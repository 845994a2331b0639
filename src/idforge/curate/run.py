"""``curate_dataset``: raw photos -> audited, aligned, identity-grouped dataset (stages composed in order).

Layout of the dataset directory::

    manifest.parquet    one row per input file (rejected files) and per detected face (see curate/manifest.py)
    embeddings.npy      (N, D) float32 L2-normalised identity embeddings (D = 512 insightface, 128 opencv)
    identities.parquet  one row per identity with >= curate.min_images_per_identity accepted images
    crops/              <sha16>_<face>_112.png (ArcFace) and <sha16>_<face>_<S>.png (FFHQ-style, S = align.ffhq_size)
    masks/              <sha16>_<face>_face.png (face region) and <sha16>_<face>_person.png (person matte), S x S
    matted/             <sha16>_<face>.png: the FFHQ-style crop over neutral grey
    report.json         counts by status and reason, timings, models
    cache/              per-file results keyed by content sha256 + config digest (what makes re-runs cheap)

The directory is built as ``.<name>.partial`` beside the output and renamed into place at the end, so readers never
see half a dataset; an interrupted run leaves the partial directory, whose cache the next run resumes from.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import time
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np

from idforge.curate.config import CurateConfig
from idforge.curate.report import CurateReport
from idforge.errors import DataError
from idforge.io.atomic import replace_dir

log = logging.getLogger(__name__)


def _split_cfg(cfg) -> tuple[CurateConfig, Any]:
    if cfg is None:
        return CurateConfig(), None
    if isinstance(cfg, CurateConfig):
        return cfg, None
    return cfg.curate, getattr(cfg, "storage", None)


def _work_dir(ccfg: CurateConfig) -> Path:
    return Path(ccfg.work_dir).expanduser() if ccfg.work_dir else Path.home() / ".cache" / "idforge" / "curate"


def _list_inputs(root: Path) -> tuple[list[str], int]:
    """Relative paths of every file under ``root`` (sorted) and how many hidden entries were skipped."""
    if root.is_file():
        return [root.name], 0
    if not root.is_dir():
        raise DataError(f"curate input {root} is neither a folder nor a file")
    rels, hidden = [], 0
    for dirpath, dirnames, filenames in os.walk(root):
        hidden += sum(d.startswith(".") for d in dirnames) + sum(f.startswith(".") for f in filenames)
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for f in filenames:
            if not f.startswith("."):
                rels.append(Path(dirpath, f).relative_to(root).as_posix())
    return sorted(rels), hidden


def _source_of(input_uri: str, root: Path, rel: str) -> str:
    from idforge.io.uri import is_s3_uri, join_uri

    if is_s3_uri(input_uri):
        return join_uri(input_uri, rel)
    if root.is_file():
        return str(input_uri)
    return str(Path(str(input_uri)) / rel)


def _link(src: Path, dst: Path) -> None:
    if dst.exists():
        return
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


def curate_dataset(input: str, output: str, cfg=None, labels: str | None = None) -> CurateReport:
    """Curate the photos at ``input`` (folder, file, or ``s3://`` prefix) into the dataset ``output`` (folder or
    ``s3://`` prefix).

    Args:
        cfg: an ``IdforgeConfig`` (its ``curate`` and ``storage`` sections are used), a ``CurateConfig``, or None.
        labels: optional CSV, local or ``s3://`` (columns ``identity`` and ``file``/``path``/``source``) naming the
            person in photos.
    Returns:
        the :class:`CurateReport` (also written as ``report.json``).
    Raises:
        DataError: the input holds no files, or the output lies inside the input. ConfigError: the matte
        environment is missing for ``matte.backend=mediapipe``. StorageError: an S3 location is unreachable.
    """
    from idforge.io.storage import localize, open_storage
    from idforge.io.uri import is_s3_uri

    ccfg, storage_cfg = _split_cfg(cfg)
    t_start = time.perf_counter()
    work = _work_dir(ccfg)
    root = localize(input, work / "inputs", storage_cfg, progress=ccfg.progress)
    s3_out = is_s3_uri(str(output))
    if s3_out:
        final = work / "outputs" / hashlib.sha256(str(output).encode()).hexdigest()[:16]
    else:
        final = Path(output).expanduser()
        if root.is_dir() and final.resolve().is_relative_to(root.resolve()):
            raise DataError(f"curate output {output} lies inside the input {input}; choose a folder outside it")
        if root.resolve().is_relative_to(final.resolve()):
            raise DataError(f"curate input {input} lies inside the output {output}, which is replaced on success; "
                            "choose an output folder outside the input")
        if final.exists() and not (final / "manifest.parquet").is_file() and (
            final.is_file() or any(final.iterdir())
        ):
            # The output is replaced as a whole: never replace something that is not a curated dataset.
            raise DataError(f"curate output {output} exists and is not a curated dataset; give a new or empty folder")
    rels, hidden = _list_inputs(root)
    if not rels:
        raise DataError(f"curate input {input} holds no files; point --input at a folder of photos")
    label_map = {}
    if labels:
        from idforge.curate.group import read_labels

        # labels may live beside the photos on S3: localize() returns local paths unchanged
        local_labels = localize(str(labels), work / "labels", storage_cfg) if is_s3_uri(str(labels)) else labels
        label_map = read_labels(local_labels)
    if ccfg.matte.backend == "mediapipe":
        from idforge.curate.matte import check_matte_env, matte_python

        check_matte_env(matte_python(ccfg.matte))  # fail before the long part, with the fix in the message

    from idforge.curate.process import FileTask, config_digest, model_identity, run_tasks

    models = model_identity(ccfg)
    digest = config_digest(ccfg, models)
    partial = final.with_name(f".{final.name}.partial")
    cache = partial / "cache"
    for sub in ("crops", "masks", "matted"):
        shutil.rmtree(partial / sub, ignore_errors=True)
    cache.mkdir(parents=True, exist_ok=True)
    reuse = final / "cache" if (final / "cache").is_dir() else None
    tasks = [FileTask(i, str(root / r) if root.is_dir() else str(root), r, _source_of(str(input), root, r))
             for i, r in enumerate(rels)]
    log.info("curating %d files from %s with %s (%d worker(s))", len(tasks), input, ccfg.backend, ccfg.workers)
    t0 = time.perf_counter()
    results = run_tasks(tasks, ccfg, digest, cache, reuse, progress=ccfg.progress)
    timings: dict[str, float] = {"per_file_wall": time.perf_counter() - t0}
    for res in results:
        for k, v in res["timings"].items():
            timings[k] = timings.get(k, 0.0) + v

    report = _assemble(partial, results, ccfg, label_map, timings, models)
    report.output = str(output)
    report.files = len(rels)
    report.config_digest = digest
    report.timings["total"] = time.perf_counter() - t_start
    report.hidden_files_skipped = hidden
    (partial / "report.json").write_text(json.dumps(report.to_dict(), indent=2, sort_keys=True))
    used = {res["key"] for res in results}
    for entry in cache.iterdir():  # drop stale entries (old configs, removed files) so the cache does not grow
        if entry.name != "matte" and entry.name not in used:
            shutil.rmtree(entry, ignore_errors=True)
    replace_dir(partial, final)
    if s3_out:
        open_storage(output, storage_cfg).upload_dir(final, str(output), progress=ccfg.progress)
    log.info("curated %d files into %s: %d accepted faces, %d identities", report.files, output,
             report.faces_accepted, report.identities)
    return report


def _assemble(out: Path, results: list[dict], ccfg: CurateConfig, label_map: dict[str, str],
              timings: dict[str, float], models: dict[str, Any]) -> CurateReport:
    """Stages 5-7 over the per-file results, then the tables. Writes into ``out``; returns the report."""
    from idforge.curate import dedup, group
    from idforge.curate.manifest import identities_schema, manifest_schema, write_table
    from idforge.curate.process import CROP112, CROP_FFHQ, FACE_MASK

    cache = out / "cache"
    size = ccfg.align.ffhq_size
    for sub in ("crops", "masks", "matted"):
        (out / sub).mkdir(parents=True, exist_ok=True)

    rows: list[dict[str, Any]] = []
    faces: list[dict[str, Any]] = []  # the rows of faces that passed the gates (they have embeddings)
    emb_parts: list[np.ndarray] = []
    for res in sorted(results, key=lambda r: r["rel"]):
        entry = cache / res["key"]
        rec = json.loads((entry / "result.json").read_text())
        base = {
            "source": res["source"], "rel": res["rel"], "sha256": res["sha256"], "detail": rec.get("detail", ""),
            "width": rec.get("width"), "height": rec.get("height"), "format": rec.get("format", ""),
            "label": group.label_for(label_map, res["source"], res["rel"]) if label_map else "",
        }
        if rec["status"] == "rejected":
            rows.append(_row(base, status="rejected", reason=rec["reason"]))
            continue
        emb = np.load(entry / "emb.npy") if (entry / "emb.npy").is_file() else None
        for f in rec["faces"]:
            row = _row(base, status="rejected" if f["reason"] else "accepted", reason=f["reason"], face=f)
            if f["face_index"] > 0:
                row["label"] = ""  # a file's label names its main (largest) face
            rows.append(row)
            if not f["reason"]:
                stem = f"{res['sha256'][:16]}_{f['face_index']}"
                i = f["face_index"]
                row["aligned"] = f"crops/{stem}_112.png"
                row["aligned_ffhq"] = f"crops/{stem}_{size}.png"
                row["mask"] = f"masks/{stem}_face.png"
                _link(entry / CROP112.format(i=i), out / row["aligned"])
                _link(entry / CROP_FFHQ.format(i=i), out / row["aligned_ffhq"])
                _link(entry / FACE_MASK.format(i=i), out / row["mask"])
                row["embedding_row"] = len(faces)
                row["_matte_key"] = f"{res['key']}_{i}"
                row["_stem"] = stem
                row["_phash"] = f["phash"]
                row["_entry"] = entry
                faces.append(row)
                emb_parts.append(emb[f["emb_index"]])
    dim = int(emb_parts[0].shape[0]) if emb_parts else 0
    emb_all = np.stack(emb_parts).astype(np.float32) if emb_parts else np.zeros((0, 0), np.float32)

    t = time.perf_counter()
    _matte(out, faces, ccfg)
    timings["matte"] = time.perf_counter() - t

    t = time.perf_counter()
    threshold = ccfg.grouping.threshold
    if threshold is None:
        threshold = group.default_threshold(ccfg.backend)
    dup_of = [-1] * len(faces)
    if ccfg.dedup.enabled and faces:
        hashes = [int(r["_phash"], 16) for r in faces]
        keys = [(-(r["size_px"] or 0.0), r["source"], r["face_index"]) for r in faces]
        dup_of = dedup.find_duplicates(emb_all, hashes, keys, threshold, ccfg.dedup.phash_max_distance,
                                       ccfg.dedup.embedding_min_similarity)
    timings["dedup"] = time.perf_counter() - t

    t = time.perf_counter()
    kept = [k for k in range(len(faces)) if dup_of[k] < 0]
    metrics: dict[str, float] = {}
    if kept:
        clusters = group.cluster(emb_all[kept], threshold, ccfg.grouping.linkage)
        member_keys = [f"{faces[k]['sha256']}:{faces[k]['face_index']}" for k in kept]
        face_labels = [faces[k]["label"] for k in kept]
        ids = group.assign_identities(clusters, member_keys, face_labels, ccfg.grouping.labels_mode)
        labelled = [j for j, lab in enumerate(face_labels) if lab]
        if len(labelled) >= 2:  # how well the embeddings alone recover the given labels
            p, r = group.pairwise_precision_recall([str(clusters[j]) for j in labelled],
                                                   [face_labels[j] for j in labelled])
            metrics.update(grouping_pairwise_precision=p, grouping_pairwise_recall=r)
        for k, ident in zip(kept, ids, strict=True):
            faces[k]["identity"] = ident
    for k, d in enumerate(dup_of):
        if d >= 0:
            faces[k].update(identity=faces[d]["identity"], status="rejected", reason="duplicate",
                            duplicate_of=faces[d]["source"])
    counts = Counter(faces[k]["identity"] for k in kept)
    small = {i for i, c in counts.items() if c < ccfg.min_images_per_identity}
    for k in kept:
        if faces[k]["identity"] in small:
            faces[k].update(status="rejected", reason="too_few_images")
    ident_rows = []
    for ident in sorted(i for i in counts if i not in small):
        members = [k for k in kept if faces[k]["identity"] == ident]
        mean = emb_all[members].mean(0)
        centroid = members[int(np.argmax(emb_all[members] @ mean))]
        labs = Counter(faces[k]["label"] for k in members if faces[k]["label"])
        ident_rows.append({"identity": ident, "members": len(members), "centroid_row": int(centroid),
                           "label": labs.most_common(1)[0][0] if labs else "", "embedding_dim": dim})
    timings["group"] = time.perf_counter() - t

    t = time.perf_counter()
    for row in faces:
        row.pop("_matte_key", None)
        row.pop("_stem", None)
        row.pop("_phash", None)
        row.pop("_entry", None)
    rows.sort(key=lambda r: (r["rel"], r["face_index"]))
    write_table(rows, manifest_schema(), out / "manifest.parquet")
    write_table(ident_rows, identities_schema(), out / "identities.parquet")
    np.save(out / "embeddings.npy", emb_all)
    timings["write_tables"] = time.perf_counter() - t

    statuses = Counter(r["status"] for r in rows)
    backend_info = {"backend": ccfg.backend, "embedding_dim": dim, "models": models,
                    "licence": _licence(ccfg.backend), "grouping_threshold": threshold,
                    "matte": ccfg.matte.backend}
    return CurateReport(
        output="",
        rows=len(rows),
        counts={s: statuses.get(s, 0) for s in ("accepted", "rejected")},
        reasons=dict(sorted(Counter(r["reason"] for r in rows if r["status"] == "rejected").items())),
        identities=len(ident_rows),
        faces_accepted=statuses.get("accepted", 0),
        cached_files=sum(1 for r in results if r["cached"]),
        workers=ccfg.workers,
        timings={k: round(v, 4) for k, v in timings.items()},
        backend=backend_info,
        metrics=metrics,
    )


def _licence(backend: str) -> str:
    from idforge.faces.models import INSIGHTFACE_LICENCE, OPENCV_ZOO_LICENCE

    return INSIGHTFACE_LICENCE if backend == "insightface" else OPENCV_ZOO_LICENCE


def _row(base: dict[str, Any], status: str, reason: str, face: dict[str, Any] | None = None) -> dict[str, Any]:
    f = face or {}
    bbox = f.get("bbox")
    return {
        **base,
        "status": status,
        "reason": reason,
        "face_index": int(f.get("face_index", -1)),
        "bbox": [round(v, 3) for v in bbox] if bbox else None,
        "landmarks5": f.get("landmarks5"),
        "det_score": f.get("det_score"),
        "size_px": f.get("size_px"),
        "sharpness": f.get("sharpness"),
        "yaw_deg": f.get("yaw_deg"),
        "roll_deg": f.get("roll_deg"),
        "identity": "",
        "duplicate_of": "",
        "aligned": "",
        "aligned_ffhq": "",
        "mask": "",
        "person_mask": "",
        "matted": "",
        "embedding_row": -1,
    }


def _matte(out: Path, faces: list[dict[str, Any]], ccfg: CurateConfig) -> None:
    """Person masks and grey-background composites for every cropped face.

    landmarks: both were made by the per-file workers (in parallel) and are linked from their cache entries.
    mediapipe: one batch subprocess per ``matte.batch_size`` crops writes mask and composite into the matte cache
    (keyed by the per-file key, face index and grey level). Anything missing (e.g. the grey level changed) is
    computed here on ``curate.workers`` threads.
    """
    from concurrent.futures import ThreadPoolExecutor

    import cv2

    from idforge.curate import matte
    from idforge.curate.process import LANDMARK_MATTE, LANDMARK_MATTED

    backend, grey = ccfg.matte.backend, ccfg.matte.grey
    if backend == "none" or not faces:
        return
    mcache = out / "cache" / "matte" / backend
    mcache.mkdir(parents=True, exist_ok=True)
    src: dict[int, tuple[Path, Path]] = {}  # face position -> (person mask, composite)
    for k, row in enumerate(faces):
        i = row["face_index"]
        if backend == "landmarks":
            entry = row["_entry"]
            src[k] = (entry / LANDMARK_MATTE.format(i=i), entry / LANDMARK_MATTED.format(i=i, grey=grey))
        else:
            src[k] = (mcache / f"{row['_matte_key']}.png", mcache / f"{row['_matte_key']}_g{grey}.png")
    if backend == "mediapipe":
        todo = [(out / faces[k]["aligned_ffhq"], m, c) for k, (m, c) in src.items()
                if not (m.is_file() and c.is_file())]
        if todo:
            matte.run_mediapipe(matte.matte_python(ccfg.matte), todo, batch_size=ccfg.matte.batch_size, grey=grey)

    def place(k: int) -> None:
        row, (mask_src, comp_src) = faces[k], src[k]
        stem = row["_stem"]
        row["person_mask"] = f"masks/{stem}_person.png"
        row["matted"] = f"matted/{stem}.png"
        _link(mask_src, out / row["person_mask"])
        if comp_src.is_file():
            _link(comp_src, out / row["matted"])
        else:  # a cached per-file entry made for another grey level or matte backend
            crop = cv2.imread(str(out / row["aligned_ffhq"]), cv2.IMREAD_COLOR)
            alpha = cv2.imread(str(mask_src), cv2.IMREAD_GRAYSCALE)
            comp = matte.composite(crop, alpha, grey)  # channel order does not matter to a blend
            cv2.imwrite(str(out / row["matted"]), comp, [cv2.IMWRITE_PNG_COMPRESSION, 1])

    with ThreadPoolExecutor(max_workers=max(1, ccfg.workers)) as pool:
        list(pool.map(place, range(len(faces))))
    if backend == "mediapipe":
        used = {p.name for pair in src.values() for p in pair}
        for stale in mcache.iterdir():  # mattes of files no longer in the input, or of other per-file configs
            if stale.name not in used:
                stale.unlink()
