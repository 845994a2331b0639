"""The per-file part of curation (stages 1-4 and the identity embedding), run in a process pool.

One input file -> one cache entry ``<cache>/<sha256>-<config digest>/`` holding ``result.json`` (file status and
one record per detected face), ``emb.npy`` ((F, D) float32 embeddings of the faces that passed the gates) and the
crops and face masks of those faces as PNG. The entry appears atomically, so an interrupted run resumes where it
stopped, and a re-run with the same config reuses it (hard-linked from the previous dataset's cache).
"""

from __future__ import annotations

import errno
import hashlib
import json
import logging
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from idforge.curate.config import CurateConfig
from idforge.errors import StorageError

log = logging.getLogger(__name__)

# Bump when the per-file logic changes in a way that changes its outputs: old cache entries stop matching.
PROCESS_VERSION = 4  # 4: the upright photo (PHOTO) is kept for the photo training target
CROP112 = "f{i}_112.png"
CROP_FFHQ = "f{i}_ffhq.png"
FACE_MASK = "f{i}_mask.png"
LANDMARK_MATTE = "f{i}_lmatte.png"
LANDMARK_MATTED = "f{i}_lmatted_g{grey}.png"
# The decoded, EXIF-upright photo (at most decode.max_side, as the detector saw it) of a file with an accepted face:
# prepare's ``target: photo`` crops its training targets from it, so the dataset stays self-contained (the input
# may be an s3:// prefix or gone). JPEG q95: a tenth of a PNG's size at no visible loss for a diffusion target.
PHOTO = "photo.jpg"
PHOTO_JPEG_QUALITY = 95


@dataclass(frozen=True)
class FileTask:
    """One input file. ``source`` is the path/URI as the user gave it; ``rel`` the path under the input root."""

    index: int
    path: str
    rel: str
    source: str


def config_digest(cfg: CurateConfig, models: dict[str, Any]) -> str:
    """Digest of everything that changes one file's per-file outputs (config sections + model identity)."""
    per_file = cfg.model_dump(include={"backend", "model_dir", "min_face_px", "decode", "detect", "gates", "align",
                                       "input_alignment"})
    per_file.pop("model_dir", None)  # where the models live does not matter, what they are does (models below)
    blob = json.dumps({"v": PROCESS_VERSION, "cfg": per_file, "models": models}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def model_identity(cfg: CurateConfig) -> dict[str, Any]:
    """Names and content hashes of the backend's model files (part of the cache key)."""
    from idforge.faces.models import insightface_files, opencv_files

    files = insightface_files(cfg.model_dir) if cfg.backend == "insightface" else opencv_files(cfg.model_dir)
    out: dict[str, Any] = {"backend": cfg.backend}
    for role, path in vars(files).items():
        if path is not None:
            h = hashlib.sha256()
            with open(path, "rb") as fh:
                for chunk in iter(lambda: fh.read(1 << 20), b""):
                    h.update(chunk)
            out[role] = f"{Path(path).name}:{h.hexdigest()[:16]}"
    return out


def _write_png(path: Path, rgb_or_grey: np.ndarray) -> None:
    import cv2

    img = rgb_or_grey if rgb_or_grey.ndim == 2 else rgb_or_grey[..., ::-1]
    ok, buf = cv2.imencode(".png", img, [cv2.IMWRITE_PNG_COMPRESSION, 1])
    if not ok:
        raise OSError(f"PNG encoding failed for {path}")
    path.write_bytes(buf.tobytes())


def _write_jpeg(path: Path, rgb: np.ndarray) -> None:
    import cv2

    ok, buf = cv2.imencode(".jpg", rgb[..., ::-1], [cv2.IMWRITE_JPEG_QUALITY, PHOTO_JPEG_QUALITY])
    if not ok:
        raise OSError(f"JPEG encoding failed for {path}")
    path.write_bytes(buf.tobytes())


def failed_record(reason: str, detail: str) -> dict[str, Any]:
    """The record of a file whose per-file stages did not finish (``internal_error``, ``worker_crashed``)."""
    return {"status": "rejected", "reason": reason, "detail": detail, "faces": [], "timings": {}}


def analyse_file(data: bytes, cfg: CurateConfig, analyzer, entry: Path) -> dict[str, Any]:
    """Stages 1-4 + embedding for one file's bytes; writes crops/masks/emb.npy into ``entry``; returns the record.

    The record: ``status`` ("ok" | "rejected"), ``reason``, ``detail``, image facts, ``faces`` (one dict per
    detected face, each with its own ``reason``, "" when it passed) and ``timings`` (seconds per sub-stage).
    An unexpected exception in any stage (detect, align, embed, matte, writing crops) rejects this file as
    ``internal_error`` with the exception in ``detail`` instead of aborting the run (both engines call this).
    """
    try:
        return _analyse(data, cfg, analyzer, entry)
    except OSError as exc:
        if exc.errno in DISK_FULL:  # not this file's fault: every later file would fail the same way
            raise disk_full(entry, exc) from exc
        return _internal_error(entry, exc)
    except Exception as exc:  # noqa: BLE001 - one bad file must not abort the other thousands
        return _internal_error(entry, exc)


DISK_FULL = {errno.ENOSPC, errno.EFBIG, errno.EDQUOT}


def disk_full(path: Path, exc: OSError) -> StorageError:
    return StorageError(f"curate: writing {path} failed ({exc.strerror}): the disk or the file size limit is full; "
                        "free space there (or set curate.work_dir / the output elsewhere) and rerun: finished files "
                        "resume from the cache")


def _internal_error(entry: Path, exc: Exception) -> dict[str, Any]:
    log.warning("curate: internal error on one file (%s: %s); rejected as internal_error", type(exc).__name__, exc)
    for f in entry.iterdir():  # no half-written crops or embeddings survive into the cache entry
        f.unlink()
    return failed_record("internal_error", f"{type(exc).__name__}: {exc}")


def _analyse(data: bytes, cfg: CurateConfig, analyzer, entry: Path) -> dict[str, Any]:
    from idforge.curate.align import align
    from idforge.curate.decode import Rejected, decode_image
    from idforge.curate.detect import find_faces
    from idforge.curate.gates import gate_reason, measure

    timings: dict[str, float] = {}
    t, c = time.perf_counter(), time.process_time()

    def lap(name: str) -> None:
        # Wall seconds under the stage name, CPU seconds of this process under "cpu_<stage>" (the latter does
        # not grow when other jobs share the cores, so per-core throughput stays measurable on a busy machine).
        nonlocal t, c
        now, cnow = time.perf_counter(), time.process_time()
        timings[name] = timings.get(name, 0.0) + now - t
        timings[f"cpu_{name}"] = timings.get(f"cpu_{name}", 0.0) + cnow - c
        t, c = now, cnow

    record: dict[str, Any] = {"status": "ok", "reason": "", "detail": "", "faces": [], "timings": timings}
    try:
        dec = decode_image(data, cfg.decode)
    except Rejected as rej:
        lap("decode")
        record.update(status="rejected", reason=rej.reason, detail=rej.detail)
        return record
    record.update(format=dec.format, mode=dec.mode, width=dec.source_size[0], height=dec.source_size[1],
                  scale=dec.scale)
    lap("decode")
    faces = find_faces(analyzer, dec.rgb, cfg.input_alignment)
    lap("detect")
    if not faces:
        record.update(status="rejected", reason="no_face", detail="no face found by the detector")
        return record
    multi = cfg.gates.multi_face
    considered = [f for f in faces if f.size * dec.scale >= cfg.min_face_px and f.det_score >= cfg.gates.min_det_score]
    too_many = multi == "reject" and len(considered) > 1
    passing: list[tuple[int, Any]] = []
    for i, face in enumerate(faces):
        rec: dict[str, Any] = {
            "face_index": i,
            "bbox": [float(v) * dec.scale for v in face.bbox],
            "landmarks5": (face.kps.astype(np.float64) * dec.scale).round(3).tolist(),
            "det_score": round(float(face.det_score), 6),
        }
        if too_many:
            rec["reason"] = "too_many_faces"
        elif multi == "largest" and i > 0:
            rec["reason"] = "extra_face"
        else:
            aligned = align(dec.rgb, face, cfg.align)
            lap("align")
            q = measure(face, aligned.crop112, dec.scale)
            rec.update(size_px=round(q.size_px, 3), sharpness=round(q.sharpness, 3), yaw_deg=round(q.yaw_deg, 3),
                       roll_deg=round(q.roll_deg, 3))
            rec["reason"] = gate_reason(face, q, cfg)
            lap("gates")
            if not rec["reason"]:
                passing.append((i, aligned))
        record["faces"].append(rec)
    if passing:
        emb = analyzer.embed_aligned(np.stack([a.crop112 for _, a in passing]))
        lap("embed")
        np.save(entry / "emb.npy", emb)
        _write_jpeg(entry / PHOTO, dec.rgb)
        from idforge.curate.dedup import phash
        from idforge.curate.matte import composite, landmark_matte

        for row, (i, aligned) in enumerate(passing):
            record["faces"][i]["phash"] = f"{phash(aligned.crop_ffhq):016x}"
            _write_png(entry / CROP112.format(i=i), aligned.crop112)
            _write_png(entry / CROP_FFHQ.format(i=i), aligned.crop_ffhq)
            _write_png(entry / FACE_MASK.format(i=i), aligned.face_mask)
            # The landmark matte is cheap and always there (the fallback of any matte backend); its composite is
            # made here, in parallel, only when it is the one asked for (the grey level is in the file name).
            lmatte = landmark_matte(aligned.face_mask)
            _write_png(entry / LANDMARK_MATTE.format(i=i), lmatte)
            if cfg.matte.backend == "landmarks":
                grey = cfg.matte.grey
                _write_png(entry / LANDMARK_MATTED.format(i=i, grey=grey), composite(aligned.crop_ffhq, lmatte, grey))
            record["faces"][i]["emb_index"] = row
        lap("write_crops")
    return record


def _link_tree(src: Path, dst: Path) -> None:
    """Copy a cache entry by hard links (free on one filesystem), falling back to copies."""
    dst.mkdir(parents=True)
    for f in src.iterdir():
        try:
            os.link(f, dst / f.name)
        except OSError:
            shutil.copy2(f, dst / f.name)


def _publish(tmp: Path, entry: Path) -> None:
    """Rename a finished entry into place; if a worker with the same content (a duplicate file) won the race, its
    entry is identical, so ours is dropped."""
    try:
        os.replace(tmp, entry)
    except OSError:
        if not (entry / "result.json").is_file():
            raise
        shutil.rmtree(tmp, ignore_errors=True)


def entry_problem(entry: Path) -> str:
    """What is wrong with a cache entry ("" when it is whole): an unparsable ``result.json`` (a run killed while
    a disk filled, a truncated copy) or a crop / embedding file it names that is missing or empty."""
    try:
        rec = json.loads((entry / "result.json").read_text())
        if not isinstance(rec, dict) or "status" not in rec or not isinstance(rec.get("faces"), list):
            return "result.json is not a per-file record"
    except (OSError, ValueError) as exc:
        return f"result.json is unreadable ({type(exc).__name__}: {exc})"
    names = [n.format(i=f["face_index"]) for f in rec["faces"] if "emb_index" in f
             for n in (CROP112, CROP_FFHQ, FACE_MASK, LANDMARK_MATTE)]
    if names:
        names += ["emb.npy", PHOTO]
    for name in names:
        f = entry / name
        if not f.is_file() or f.stat().st_size == 0:
            return f"{name} is missing or empty"
    return ""


def _damaged(entry: Path, task: FileTask) -> bool:
    """True, with a warning naming the file, when the cache entry of ``task`` is damaged (it is then recomputed)."""
    problem = entry_problem(entry)
    if problem:
        log.warning("curate: cache entry %s of %s is damaged (%s); recomputing it", entry, task.source, problem)
    return bool(problem)


def run_task(task: FileTask, cfg: CurateConfig, analyzer, digest: str, cache: Path, reuse: Path | None) -> dict:
    """Process (or reuse) one file; returns a summary: task fields, sha256, cache ``key``, ``cached`` flag, and
    the record's ``timings``. The record itself lives in ``cache/key/result.json``."""
    t0 = time.perf_counter()
    data = Path(task.path).read_bytes()
    sha = hashlib.sha256(data).hexdigest()
    t_read = time.perf_counter() - t0
    key = f"{sha}-{digest}"
    entry = cache / key
    out = {"index": task.index, "path": task.path, "rel": task.rel, "source": task.source, "sha256": sha,
           "key": key, "cached": True, "timings": {"read": t_read}}
    if entry.is_dir():
        if (entry / "result.json").is_file() and not _damaged(entry, task):
            return out  # the same content appears twice in this input, or a resumed run already did it
        shutil.rmtree(entry, ignore_errors=True)
    if reuse is not None and (reuse / key).is_dir() and not _damaged(reuse / key, task):
        tmp = cache / f".{key}.{os.getpid()}.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        _link_tree(reuse / key, tmp)
        _publish(tmp, entry)
        return out
    tmp = cache / f".{key}.{os.getpid()}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        record = analyse_file(data, cfg, analyzer, tmp)
        record["sha256"] = sha
        (tmp / "result.json").write_text(json.dumps(record, sort_keys=True))
    except OSError as exc:
        shutil.rmtree(tmp, ignore_errors=True)  # no half-written entry is left for a later run to trust
        if exc.errno in DISK_FULL:
            raise disk_full(tmp, exc) from exc
        raise
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    _publish(tmp, entry)
    out["cached"] = False
    out["timings"].update(record["timings"])
    return out


# ----------------------------------------------------------------------------------------------------------------
# process-pool plumbing: each worker loads its analyzer once, in the initializer.

_WORKER: dict[str, Any] = {}  # per-worker-process state (set by _init_worker, only inside pool processes)


def _init_worker(cfg_json: str, digest: str, cache: str, reuse: str | None) -> None:
    import cv2

    cfg = CurateConfig.model_validate_json(cfg_json)
    cv2.setNumThreads(cfg.threads_per_worker)  # resizes/warps too: one worker per core, no oversubscription
    _WORKER.update(
        cfg=cfg, digest=digest, cache=Path(cache), reuse=Path(reuse) if reuse else None,
        analyzer=None, threads=cfg.threads_per_worker,
    )


# Test hook of the fault drills: a pool worker given this file (its path under the input) kills itself with
# SIGKILL, as the OOM killer would. Read only inside pool workers, never in the in-process path.
KILL_ENV = "IDFORGE_TEST_KILL_WORKER_ON"


def _worker_run(task: FileTask) -> dict:
    if os.environ.get(KILL_ENV) == task.rel:
        import signal

        os.kill(os.getpid(), signal.SIGKILL)
    w = _WORKER
    load_s = 0.0
    if w["analyzer"] is None:  # loaded on first use, once per worker: a fully cached re-run never loads it
        from idforge.curate.detect import load_curate_analyzer

        t = time.perf_counter()
        w["analyzer"] = load_curate_analyzer(w["cfg"], num_threads=w["threads"])
        load_s = time.perf_counter() - t
    out = run_task(task, w["cfg"], w["analyzer"], w["digest"], w["cache"], w["reuse"])
    out["timings"]["load_models"] = load_s
    return out


def crashed_result(task: FileTask, digest: str) -> dict:
    """The summary of a file whose worker died twice (SIGKILL, OOM): rejected ``worker_crashed``, its record
    carried inline (never cached: the next run tries the file again)."""
    sha = hashlib.sha256(Path(task.path).read_bytes()).hexdigest()
    detail = "the worker process died twice on this file (killed, e.g. out of memory); lower decode.max_pixels"
    return {"index": task.index, "path": task.path, "rel": task.rel, "source": task.source, "sha256": sha,
            "key": f"{sha}-{digest}", "cached": False, "timings": {},
            "record": {**failed_record("worker_crashed", detail), "sha256": sha}}


def _pool(cfg: CurateConfig, workers: int, init: tuple):
    import multiprocessing as mp
    from concurrent.futures import ProcessPoolExecutor

    # spawn: a forked child would inherit the parent's onnxruntime/torch thread pools in a broken state.
    return ProcessPoolExecutor(workers, mp_context=mp.get_context("spawn"), initializer=_init_worker,
                               initargs=init)


def _run_pool(tasks: list[FileTask], cfg: CurateConfig, digest: str, init: tuple, bar) -> dict[int, dict]:
    """Every task on a pool of ``cfg.workers`` processes, at most ``workers`` in flight, so that when a worker dies
    (``BrokenProcessPool``) the suspects are only the files in flight. Each suspect is retried alone in a fresh
    one-worker pool (a file that crashes again is rejected ``worker_crashed``); the rest goes on in a new pool."""
    from concurrent.futures import FIRST_COMPLETED, wait
    from concurrent.futures.process import BrokenProcessPool

    done: dict[int, dict] = {}
    queue = list(tasks)
    while queue:
        suspects: list[FileTask] = []
        with _pool(cfg, cfg.workers, init) as pool:
            flight: dict = {}
            while queue or flight:
                while queue and len(flight) < cfg.workers:
                    task = queue.pop(0)
                    flight[pool.submit(_worker_run, task)] = task
                finished, _ = wait(flight, return_when=FIRST_COMPLETED)
                broken = False
                for fut in finished:
                    task = flight.pop(fut)
                    try:
                        done[task.index] = fut.result()
                        bar.update(1)
                    except BrokenProcessPool:
                        suspects.append(task)
                        broken = True
                if broken:
                    suspects.extend(flight.values())  # they were in flight when the pool broke
                    break
        for task in sorted(suspects, key=lambda t: t.index):
            log.warning("curate: a worker died while processing %s; retrying it once in a fresh worker",
                        task.source)
            with _pool(cfg, 1, init) as alone:
                try:
                    done[task.index] = alone.submit(_worker_run, task).result()
                except BrokenProcessPool:
                    log.warning("curate: the worker died again on %s; rejected as worker_crashed", task.source)
                    done[task.index] = crashed_result(task, digest)
            bar.update(1)
    return done


def run_tasks(tasks: list[FileTask], cfg: CurateConfig, digest: str, cache: Path, reuse: Path | None,
              progress: bool = True) -> list[dict]:
    """Run every task, in a pool of ``cfg.workers`` processes (1: in this process), in input order. A per-file
    exception is a rejected row either way (``analyse_file``); a dead pool worker is detected and its file
    retried once (``_run_pool``)."""
    from tqdm import tqdm

    bar = tqdm(total=len(tasks), desc="curate", unit="img", disable=not progress)
    results: list[dict] = []
    try:
        if cfg.workers <= 1:
            analyzer = None
            for task in tasks:
                load_s = 0.0
                if analyzer is None:
                    from idforge.curate.detect import load_curate_analyzer

                    t = time.perf_counter()
                    analyzer = load_curate_analyzer(cfg, num_threads=cfg.threads_per_worker)
                    load_s = time.perf_counter() - t
                res = run_task(task, cfg, analyzer, digest, cache, reuse)
                res["timings"]["load_models"] = load_s
                results.append(res)
                bar.update(1)
        else:
            init = (cfg.model_dump_json(), digest, str(cache), str(reuse) if reuse else None)
            done = _run_pool(tasks, cfg, digest, init, bar)
            results = [done[t.index] for t in tasks]
    finally:
        bar.close()
    return results
