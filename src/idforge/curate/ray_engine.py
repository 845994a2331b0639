"""Curation on Ray Data (``curate.engine=ray``): the same stages and the same manifest as the local engine, with
the per-file work spread over a Ray cluster.

1. The input is listed, never copied: file names under a folder, or object keys under an ``s3://`` prefix.
2. ``ray.data.from_items(listing).map_batches(CurateFiles, concurrency=workers)``: an actor pool; each actor loads
   the face models once, reads its files' bytes from the input storage, runs the per-file stages
   (:func:`curate_file`, what a retry calls again), mattes its batch's faces in one call, writes crops, masks and
   mattes straight to the output storage and returns the batch's manifest rows with their embeddings.
   Each batch's rows go to the output storage as one parquet part, ``<output>/_staging/part-<first file>.parquet``
   (named by the batch's first file: a retried batch rewrites its own part, never adds one); the map returns
   one small summary row per file.
3. A global step on the driver reads the staged rows (columns it needs), runs dedup and grouping on the FAISS
   similarity graph (``curate/stages.py``, the local engine's code) and writes the manifest, identities,
   embeddings and report; the staging parts are removed.

A local output is built in ``.<name>.partial`` and renamed into place, as the local engine does; on S3 the
manifest is written last, so a reader never finds a manifest whose files are missing.
"""

from __future__ import annotations

import hashlib
import json
import logging
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from idforge.curate.config import CurateConfig
from idforge.curate.report import CurateReport
from idforge.curate.rows import MANIFEST_COLUMNS, AcceptedFace, ManifestRow
from idforge.errors import DataError

log = logging.getLogger(__name__)

STAGING = "_staging"


@dataclass
class FileOutcome:
    """One file's per-file result: its rows, accepted faces (crops in ``entry``) and their (F, D) embeddings."""

    rows: list[ManifestRow]
    faces: list[AcceptedFace]
    embeddings: np.ndarray | None
    timings: dict[str, float] = field(default_factory=dict)  # seconds per per-file sub-stage


def list_input(input_uri: str, storage_cfg=None) -> tuple[list[dict[str, str]], int, dict[str, str]]:
    """[{"index", "rel", "source"}] of every file under ``input_uri`` sorted by ``rel``, how many hidden entries
    (dot-files, dot-folders) were skipped, and the photos' captions ``{rel: caption}`` (``curate.captions``: the
    same rule as the local engine's). Only names and caption files are read, no photo."""
    from idforge.curate.captions import caption_files, captions_from, read_captions
    from idforge.curate.run import list_inputs, source_of
    from idforge.io.storage import open_storage
    from idforge.io.uri import is_s3_uri, join_uri

    if is_s3_uri(input_uri):
        storage = open_storage(input_uri, storage_cfg)
        prefix = input_uri.rstrip("/")
        rels, hidden = [], 0
        for info in storage.list_info(prefix):
            rel = storage._rel(prefix, info.uri)
            if any(part.startswith(".") for part in rel.split("/")):
                hidden += 1
            else:
                rels.append(rel)
        caption_rels = caption_files(rels)  # the same rule as a local folder's (curate.run.list_inputs)
        rels = sorted(r for r in rels if r not in caption_rels)

        def read_text(rel: str) -> str | None:
            if rel not in caption_rels:
                return None
            return storage.read_bytes(join_uri(prefix, rel)).decode("utf-8", errors="replace")

        captions = captions_from(read_text, rels, prefix)
        return [{"index": i, "rel": r, "source": join_uri(prefix, r)} for i, r in enumerate(rels)], hidden, captions
    root = Path(input_uri).expanduser()
    rels, hidden = list_inputs(root)
    items = [{"index": i, "rel": r, "source": source_of(input_uri, root, r)} for i, r in enumerate(rels)]
    return items, hidden, read_captions(root, rels)


def curate_file(item: dict[str, str], data: bytes, ccfg: CurateConfig, analyzer, digest: str, label: str,
                work: Path) -> FileOutcome:
    """The per-file stages for one file's bytes (decode, detect, gates, align, embed, landmark matte); crops are
    written under ``work/<key>``. Pure in its inputs: a retried file gives the same outcome."""
    from idforge.curate.process import analyse_file
    from idforge.curate.rows import file_rows

    sha = hashlib.sha256(data).hexdigest()
    key = f"{sha}-{digest}"
    entry = work / key
    entry.mkdir(parents=True, exist_ok=True)
    record = analyse_file(data, ccfg, analyzer, entry)
    summary = {"source": item["source"], "rel": item["rel"], "sha256": sha, "key": key}
    rows, faces = file_rows(summary, record, label, ccfg.align.ffhq_size, entry)
    emb = np.load(entry / "emb.npy") if faces else None
    return FileOutcome(rows, faces, emb, record["timings"])


def _staged_schema():
    import pyarrow as pa

    from idforge.curate.manifest import manifest_schema

    extra = [("key", pa.string()), ("stem", pa.string()), ("phash", pa.int64()), ("embedding", pa.list_(pa.float32()))]
    return pa.schema(list(manifest_schema()) + [pa.field(n, t) for n, t in extra])


class CurateFiles:
    """The Ray Data actor: face models loaded once in ``__init__``; ``__call__`` curates a batch of files."""

    def __init__(self, cfg_json: str, storage_json: str | None, digest: str, output: str, staging: str,
                 label_map: dict[str, str]) -> None:
        import cv2

        from idforge.config import StorageConfig
        from idforge.curate.detect import load_curate_analyzer
        from idforge.io.storage import open_storage

        self.cfg = CurateConfig.model_validate_json(cfg_json)
        self.storage_cfg = StorageConfig.model_validate_json(storage_json) if storage_json else None
        cv2.setNumThreads(self.cfg.threads_per_worker)
        self.analyzer = load_curate_analyzer(self.cfg, num_threads=self.cfg.threads_per_worker)
        self.digest, self.output, self.staging, self.label_map = digest, output, staging, label_map
        self.out = open_storage(output, self.storage_cfg)

    def _read(self, source: str) -> bytes:
        from idforge.io.storage import open_storage

        return open_storage(source, self.storage_cfg).read_bytes(source)

    def __call__(self, batch):  # pandas DataFrame of {"index", "rel", "source"} -> one summary row per file
        import io

        import pandas as pd
        import pyarrow as pa
        import pyarrow.parquet as pq

        from idforge.curate.stages import label_of
        from idforge.io.uri import join_uri

        cpu0 = time.process_time()
        with tempfile.TemporaryDirectory(prefix="idforge-curate-") as tmp:
            work = Path(tmp)
            outcomes = []
            for item in batch.to_dict("records"):
                data = self._read(item["source"])
                label = label_of(self.label_map, item["source"], item["rel"])
                outcomes.append(curate_file(item, data, self.cfg, self.analyzer, self.digest, label, work))
            faces = [f for o in outcomes for f in o.faces]
            self._matte(faces, work)
            self._publish(faces)
            records = []
            for o in outcomes:
                by_row = {id(f.row): f for f in o.faces}
                for row in o.rows:
                    face = by_row.get(id(row))
                    rec = row.as_dict()
                    rec.update(key=face.key if face else None, stem=face.stem if face else None,
                               phash=int(np.uint64(face.phash).view(np.int64)) if face else None,
                               embedding=o.embeddings[face.emb_index].tolist() if face else None)
                    records.append(rec)
            buf = io.BytesIO()
            pq.write_table(pa.Table.from_pylist(records, schema=_staged_schema()), buf)
            first = int(batch["index"].min())
            self.out.write_bytes(join_uri(self.staging, f"part-{first:09d}.parquet"), buf.getvalue())
        cpu = (time.process_time() - cpu0) / len(outcomes)  # the batch's CPU seconds (matte, writes included)
        return pd.DataFrame({"rel": batch["rel"], "rows": [len(o.rows) for o in outcomes],
                             "seconds": [sum(v for k, v in o.timings.items() if not k.startswith("cpu_"))
                                         for o in outcomes], "cpu_seconds": [cpu] * len(outcomes)})

    def _matte(self, faces: list[AcceptedFace], work: Path) -> None:
        """Person matte and composite paths per face: the landmark matte the per-file stage made, or one mediapipe
        call over the whole batch (its subprocess starts once per batch, not per face)."""
        from idforge.curate import matte as mt
        from idforge.curate.process import CROP_FFHQ, LANDMARK_MATTE, LANDMARK_MATTED
        from idforge.curate.rows import crop_paths

        backend, grey = self.cfg.matte.backend, self.cfg.matte.grey
        if backend == "none":
            return
        todo = []
        for f in faces:
            i = f.row.face_index
            paths = crop_paths(f.stem, self.cfg.align.ffhq_size)
            f.row.person_mask, f.row.matted = paths["person_mask"], paths["matted"]
            if backend == "mediapipe":
                todo.append((f.entry / CROP_FFHQ.format(i=i), f.entry / f"m{i}_person.png",
                             f.entry / f"m{i}_matted.png"))
            else:
                (f.entry / LANDMARK_MATTE.format(i=i)).rename(f.entry / f"m{i}_person.png")
                (f.entry / LANDMARK_MATTED.format(i=i, grey=grey)).rename(f.entry / f"m{i}_matted.png")
        if todo:
            mt.run_mediapipe(mt.matte_python(self.cfg.matte), todo, batch_size=self.cfg.matte.batch_size, grey=grey)

    def _publish(self, faces: list[AcceptedFace]) -> None:
        """Each face's files, straight to the output storage under the paths its row names."""
        from idforge.curate.process import CROP112, CROP_FFHQ, FACE_MASK, PHOTO
        from idforge.io.uri import join_uri

        published: set[str] = set()  # a file's photo is shared by its faces: put once
        for f in faces:
            i, row = f.row.face_index, f.row
            files = [(CROP112.format(i=i), row.aligned), (CROP_FFHQ.format(i=i), row.aligned_ffhq),
                     (FACE_MASK.format(i=i), row.mask)]
            if row.photo not in published:
                files.append((PHOTO, row.photo))
                published.add(row.photo)
            if row.person_mask:
                files += [(f"m{i}_person.png", row.person_mask), (f"m{i}_matted.png", row.matted)]
            for name, rel in files:
                self.out.put_file(f.entry / name, join_uri(self.output, rel))


def _read_staged(staging: str, storage_cfg) -> tuple[list[ManifestRow], list[AcceptedFace], np.ndarray]:
    """Every staged row in manifest order (relative path, face), the accepted faces and their embeddings."""
    import io

    import pyarrow as pa
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    from idforge.io.storage import open_storage

    storage = open_storage(staging, storage_cfg)
    parts = sorted(u for u in storage.list(staging) if u.endswith(".parquet"))
    table = pa.concat_tables([pq.read_table(io.BytesIO(storage.read_bytes(u))) for u in parts])
    table = table.sort_by([("rel", "ascending"), ("face_index", "ascending")])
    rows: list[ManifestRow] = []
    faces: list[AcceptedFace] = []
    emb_col = table.column("embedding")
    accepted = pc.is_valid(emb_col).to_numpy(zero_copy_only=False)
    emb_rows = np.flatnonzero(accepted)
    dim = len(emb_col[int(emb_rows[0])]) if len(emb_rows) else 0
    emb = np.zeros((len(emb_rows), dim), np.float32)
    if len(emb_rows):
        flat = pc.list_flatten(emb_col.take(emb_rows)).to_numpy()
        emb = flat.astype(np.float32).reshape(len(emb_rows), dim)
    extra = table.select(["key", "stem", "phash"]).to_pylist()
    for k, rec in enumerate(table.select(list(MANIFEST_COLUMNS)).to_pylist()):
        row = ManifestRow(**rec)
        rows.append(row)
        if accepted[k]:
            row.embedding_row = len(faces)
            faces.append(AcceptedFace(row=row, key=extra[k]["key"], stem=extra[k]["stem"],
                                      phash=int(np.int64(extra[k]["phash"]).view(np.uint64)),
                                      emb_index=len(faces)))
    return rows, faces, emb


def _start_ray(ccfg: CurateConfig) -> bool:
    """Join ``curate.ray_address`` or start a local Ray; True when this call started it (and must stop it)."""
    import ray

    if ray.is_initialized():
        return False
    if ccfg.ray_address:
        ray.init(address=ccfg.ray_address, log_to_driver=False)
    else:
        ray.init(num_cpus=ccfg.workers * ccfg.threads_per_worker, include_dashboard=False, log_to_driver=False)
    return True


def curate_on_ray(input: str, output: str, ccfg: CurateConfig, storage_cfg=None,
                  labels: str | None = None) -> CurateReport:
    """``curate_dataset`` on Ray Data (same arguments, same dataset, same manifest); see the module docstring."""
    import ray

    from idforge.curate import stages
    from idforge.curate.process import config_digest, model_identity
    from idforge.curate.run import check_local_output, check_matte, read_label_map, work_dir
    from idforge.io.atomic import replace_dir
    from idforge.io.storage import open_storage
    from idforge.io.uri import is_s3_uri, join_uri

    t_start = time.perf_counter()
    work = work_dir(ccfg)
    s3_in, s3_out = is_s3_uri(str(input)), is_s3_uri(str(output))
    if not s3_in and not Path(input).expanduser().exists():
        raise DataError(f"curate input {input} does not exist; point --input at a folder of photos or s3:// prefix")
    final = None if s3_out else check_local_output(input, output, None if s3_in else Path(input).expanduser())
    items, hidden, captions = list_input(str(input), storage_cfg)
    if not items:
        raise DataError(f"curate input {input} holds no files; point --input at a folder of photos")
    label_map = read_label_map(labels, work, storage_cfg)
    check_matte(ccfg)
    models = model_identity(ccfg)
    digest = config_digest(ccfg, models)
    if final is not None:
        import shutil

        target = final.with_name(f".{final.name}.partial")
        shutil.rmtree(target, ignore_errors=True)
        target.mkdir(parents=True)
        dest = str(target)
    else:
        dest = str(output).rstrip("/")
    staging = join_uri(dest, STAGING)
    timings: dict[str, float] = {}
    started = _start_ray(ccfg)
    try:
        log.info("curating %d files from %s on Ray Data (%d actor(s))", len(items), input, ccfg.workers)
        with stages.timed(timings, "per_file_wall"):
            ds = ray.data.from_items(items, override_num_blocks=max(1, -(-len(items) // ccfg.ray_batch_files)))
            ds = ds.map_batches(
                CurateFiles, batch_size=ccfg.ray_batch_files, batch_format="pandas",
                compute=ray.data.ActorPoolStrategy(size=ccfg.workers), num_cpus=ccfg.threads_per_worker,
                fn_constructor_kwargs={"cfg_json": ccfg.model_dump_json(), "digest": digest, "output": dest,
                                       "staging": staging, "label_map": label_map,
                                       "storage_json": storage_cfg.model_dump_json() if storage_cfg else None},
            )
            done = 0
            for b in ds.iter_batches(batch_size=None, batch_format="numpy"):
                done += len(b["rel"])
                # per-file stage seconds (wall) and the actors' CPU seconds, summed over actors, start-up excluded
                timings["per_file_busy"] = timings.get("per_file_busy", 0.0) + float(b["seconds"].sum())
                timings["cpu_per_file"] = timings.get("cpu_per_file", 0.0) + float(b["cpu_seconds"].sum())
            if done != len(items):
                raise DataError(f"curation on Ray returned {done} of {len(items)} files; see the Ray logs")
    finally:
        if started:
            ray.shutdown()
    with stages.timed(timings, "read_staged"):
        rows, faces, emb = _read_staged(staging, storage_cfg)
    for row in rows:  # each photo's own caption, as the local engine sets it (curate.run._assemble)
        row.caption = captions.get(row.rel, "")
    ident_rows, metrics = stages.dedup_and_group(faces, emb, ccfg, timings)
    report = stages.build_report(rows, ident_rows, ccfg, int(emb.shape[1]) if len(faces) else 0, models, timings,
                                 metrics, cached_files=0)
    report.output, report.files, report.config_digest = str(output), len(items), digest
    report.hidden_files_skipped = hidden
    out_storage = open_storage(dest, storage_cfg)
    with tempfile.TemporaryDirectory(prefix="idforge-tables-") as tmp:
        local = Path(dest) if final is not None else Path(tmp)
        with stages.timed(timings, "write_tables"):
            stages.write_tables(local, rows, ident_rows, emb)
        report.timings = {k: round(v, 4) for k, v in timings.items()}
        report.timings["total"] = round(time.perf_counter() - t_start, 4)
        (local / "report.json").write_text(json.dumps(report.to_dict(), indent=2, sort_keys=True))
        if final is None:  # S3: tables after every crop, the manifest last
            from idforge.curate.manifest import IDENTITIES, MANIFEST, REPORT

            for name in (IDENTITIES, "embeddings.npy", REPORT):
                out_storage.put_file(local / name, join_uri(dest, name))
            for part in sorted((local / MANIFEST).iterdir()):
                out_storage.put_file(part, join_uri(dest, MANIFEST, part.name))
    out_storage.delete(staging, recursive=True)
    if final is not None:
        replace_dir(Path(dest), final)
    log.info("curated %d files into %s on Ray: %d accepted faces, %d identities", report.files, output,
             report.faces_accepted, report.identities)
    return report
