"""``curate_dataset``: raw photos -> audited, aligned, identity-grouped dataset (stages composed in order).

Layout of the dataset directory::

    manifest.parquet    one row per input file (rejected files) and per detected face (see curate/manifest.py)
    embeddings.npy      (N, D) float32 L2-normalised identity embeddings (D = 512 insightface, 128 opencv)
    identities.parquet  one row per identity with >= curate.min_images_per_identity accepted images
    crops/              <sha16>_<face>_112.png (ArcFace) and <sha16>_<face>_<S>.png (FFHQ-style, S = align.ffhq_size)
    masks/              <sha16>_<face>_face.png (face region) and <sha16>_<face>_person.png (person matte), S x S
    matted/             <sha16>_<face>.png: the FFHQ-style crop over neutral grey
    photos/             <sha16>.jpg: the upright photo of each file with an accepted face (prepare's photo target)
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
from pathlib import Path
from typing import Any

from idforge.curate.captions import caption_files, read_captions
from idforge.curate.config import CurateConfig
from idforge.curate.report import CurateReport
from idforge.errors import DataError
from idforge.io.atomic import replace_dir
from idforge.io.space import check_free_space, curated_file_bytes

log = logging.getLogger(__name__)


def _split_cfg(cfg) -> tuple[CurateConfig, Any]:
    if cfg is None:
        return CurateConfig(), None
    if isinstance(cfg, CurateConfig):
        return cfg, None
    return cfg.curate, getattr(cfg, "storage", None)


def work_dir(ccfg: CurateConfig) -> Path:
    return Path(ccfg.work_dir).expanduser() if ccfg.work_dir else Path.home() / ".cache" / "idforge" / "curate"


def list_inputs(root: Path) -> tuple[list[str], int]:
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
    captions = caption_files(rels)  # captions.csv / a photo's sidecar: captions, not photos
    return sorted(r for r in rels if r not in captions), hidden


def source_of(input_uri: str, root: Path, rel: str) -> str:
    from idforge.io.uri import is_s3_uri, join_uri

    if is_s3_uri(input_uri):
        return join_uri(input_uri, rel)
    if root.is_file():
        return str(input_uri)
    return str(Path(str(input_uri)) / rel)


def check_local_output(input: str, output: str, root: Path | None) -> Path:
    """The local output folder, after refusing an output inside the input (``root``: the local input, None for
    S3), an input inside the output, and an existing folder that is not a curated dataset."""
    from idforge.curate.manifest import is_curated

    final = Path(output).expanduser()
    if root is not None:
        if root.is_dir() and final.resolve().is_relative_to(root.resolve()):
            raise DataError(f"curate output {output} lies inside the input {input}; choose a folder outside it")
        if root.resolve().is_relative_to(final.resolve()):
            raise DataError(f"curate input {input} lies inside the output {output}, which is replaced on success; "
                            "choose an output folder outside the input")
    if final.exists() and not is_curated(final) and (final.is_file() or any(final.iterdir())):
        # The output is replaced as a whole: never replace something that is not a curated dataset.
        raise DataError(f"curate output {output} exists and is not a curated dataset; give a new or empty folder")
    return final


def read_label_map(labels: str | None, work: Path, storage_cfg) -> dict[str, str]:
    """{key: identity} of the labels CSV (local or ``s3://``), {} without one."""
    if not labels:
        return {}
    from idforge.curate.group import read_labels
    from idforge.io.storage import localize
    from idforge.io.uri import is_s3_uri

    # labels may live beside the photos on S3: localize() returns local paths unchanged
    local_labels = localize(str(labels), work / "labels", storage_cfg) if is_s3_uri(str(labels)) else labels
    return read_labels(local_labels)


def check_matte(ccfg: CurateConfig) -> None:
    if ccfg.matte.backend == "mediapipe":
        from idforge.curate.matte import check_matte_env, matte_python

        check_matte_env(matte_python(ccfg.matte))  # fail before the long part, with the fix in the message


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
    from idforge.io.lock import output_lock
    from idforge.io.storage import localize, open_storage
    from idforge.io.uri import is_s3_uri

    ccfg, storage_cfg = _split_cfg(cfg)
    if ccfg.engine == "ray":
        from idforge.curate.ray_engine import curate_on_ray

        with output_lock(output, "curate", storage_cfg):  # a file lock locally, the prefix's lease on s3://
            return curate_on_ray(input, output, ccfg, storage_cfg, labels)
    t_start = time.perf_counter()
    work = work_dir(ccfg)
    root = localize(input, work / "inputs", storage_cfg, progress=ccfg.progress)
    s3_out = is_s3_uri(str(output))
    if s3_out:
        final = work / "outputs" / hashlib.sha256(str(output).encode()).hexdigest()[:16]
    else:
        final = check_local_output(input, output, root)
    rels, hidden = list_inputs(root)
    if not rels:
        raise DataError(f"curate input {input} holds no files; point --input at a folder of photos")
    captions = read_captions(root, rels)
    label_map = read_label_map(labels, work, storage_cfg)
    check_matte(ccfg)
    # One writer: the .partial sweep and the swap below are this run's alone; for an s3:// output the lease on the
    # prefix covers its local working copy (one per output URI) and the upload, whose manifest goes last.
    with output_lock(output if s3_out else final, "curate", storage_cfg):
        report = _curate_locked(input, output, ccfg, storage_cfg, root, final, rels, hidden, captions, label_map,
                                t_start)
        if s3_out:
            open_storage(output, storage_cfg).upload_dir(final, str(output), progress=ccfg.progress, prune=True)
    log.info("curated %d files into %s: %d accepted faces, %d identities", report.files, output,
             report.faces_accepted, report.identities)
    return report


def _curate_locked(input: str, output: str, ccfg: CurateConfig, storage_cfg, root: Path, final: Path,
                   rels: list[str], hidden: int, captions: dict[str, str], label_map: dict[str, str],
                   t_start: float) -> CurateReport:
    """The local engine's per-file and dataset stages into ``final``, under the output's lock."""
    from idforge.curate.process import FileTask, config_digest, model_identity, run_tasks

    models = model_identity(ccfg)
    digest = config_digest(ccfg, models)
    partial = final.with_name(f".{final.name}.partial")
    cache = partial / "cache"
    for old in final.parent.glob(f".{final.name}.old-*"):  # a run killed inside replace_dir left it
        shutil.rmtree(old, ignore_errors=True)
    for sub in ("crops", "masks", "matted", "photos"):
        shutil.rmtree(partial / sub, ignore_errors=True)
    cache.mkdir(parents=True, exist_ok=True)
    reuse = final / "cache" if (final / "cache").is_dir() else None
    check_free_space(partial, len(rels), curated_file_bytes(ccfg.align.ffhq_size, ccfg.decode.max_side), "curate")
    tasks = [FileTask(i, str(root / r) if root.is_dir() else str(root), r, source_of(str(input), root, r))
             for i, r in enumerate(rels)]
    log.info("curating %d files from %s with %s (%d worker(s))", len(tasks), input, ccfg.backend, ccfg.workers)
    t0 = time.perf_counter()
    results = run_tasks(tasks, ccfg, digest, cache, reuse, progress=ccfg.progress)
    timings: dict[str, float] = {"per_file_wall": time.perf_counter() - t0}
    for res in results:
        for k, v in res["timings"].items():
            timings[k] = timings.get(k, 0.0) + v

    report = _assemble(partial, results, ccfg, label_map, timings, models, captions)
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
    return report


def _assemble(out: Path, results: list[dict], ccfg: CurateConfig, label_map: dict[str, str],
              timings: dict[str, float], models: dict[str, Any], captions: dict[str, str] | None = None
              ) -> CurateReport:
    """The dataset-level stages over the per-file results (``curate/stages.py``); writes into ``out``."""
    from idforge.curate import stages

    got = stages.collect(out, results, ccfg, label_map)
    for row in got.rows:  # each photo's own caption (captions.csv / sidecar .txt)
        row.caption = (captions or {}).get(row.rel, "")
    with stages.timed(timings, "matte"):
        stages.matte(out, got.faces, ccfg)
    ident_rows, metrics = stages.dedup_and_group(got.faces, got.embeddings, ccfg, timings)
    with stages.timed(timings, "write_tables"):
        stages.write_tables(out, got.rows, ident_rows, got.embeddings)
    return stages.build_report(got.rows, ident_rows, ccfg, got.dim, models, timings, metrics, got.cached_files)
