"""``prepare.engine: ray``: the prepare stage on Ray Data, writing shards of many items straight to the output.

1. The driver reads the curated tables (``prepare.read_curated``) and gives every item its content key from what
   curation STORED about it (:func:`stored_input_hash`: the manifest's file ``sha256``, face index, landmarks, crop
   paths, the embedding row, and ``report.json``'s ``config_digest`` of the per-file curation settings and models):
   no input file is read to decide what is up to date, so a no-op rerun over 10^5 faces costs one manifest read.
   A dataset whose ``report.json`` has no digest (older or hand-made) falls back to hashing the files, as the local
   engine does (with a warning).
2. The items the previous index does not hold (or whose shard is gone) are planned into shards of
   ``prepare.shard_items`` consecutive items (sorted by identity, so an identity lives in one or two shards),
   and ``ray.data.from_items(plan).map_batches(ShardEncoder, concurrency=workers)`` encodes them: each actor loads
   the encoders once (one GPU each where CUDA is used) and runs ``prepare._encode_items`` over ``batch_size``
   sub-batches, then writes the shard to the output itself (a local temp file renamed into place, or an upload
   through ``idforge.io.storage`` for ``s3://``). Only the item keys come back to the driver.
3. The driver encodes the captions (one small text-encoder pass, as the local engine does), then writes
   ``index.parquet`` and ``prepared.json`` (``"layout": "shards"``) last, so a reader never sees an index naming a
   shard that is not there.

Reruns: the same inputs -> no shard, index or info is written (``noop``). A changed input -> its item gets a new key
and lands in a NEW small shard (the changed items of one run together); its old version stays as dead bytes in
its old shard, which ``prune`` deletes once none of its items is referenced any more. Shards are never rewritten.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import pickle
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from idforge.errors import DataError
from idforge.train import shards
from idforge.train.config import PrepareConfig

if TYPE_CHECKING:
    import pandas as pd

    from idforge.config import StorageConfig
    from idforge.train.prepare import PreparedIndex, _Row

log = logging.getLogger(__name__)

ENGINE = "ray"


# ----------------------------------------------------------------------------------------------------------------
# keys from stored hashes


def curation_digest(dataset_dir: str | os.PathLike[str]) -> str | None:
    """``config_digest`` of the curated dataset's ``report.json`` (per-file settings + model hashes), or None."""
    path = Path(dataset_dir) / "report.json"
    if not path.is_file():
        return None
    try:
        digest = json.loads(path.read_text()).get("config_digest")
    except (OSError, ValueError):
        return None
    return str(digest) if digest else None


def stored_input_hash(row: _Row, cfg: PrepareConfig, digest: str) -> str:
    """Hash of what curation stored about an item's inputs: the source file's sha256 and face index fix the crops
    and mask given the per-file curation settings (``digest``); landmarks and the embedding row are the manifest's
    and ``embeddings.npy``'s own values. Only a matted image (made by a dataset-level stage the digest does not
    cover) is hashed from its file, and only when ``image_source: matted`` uses it."""
    from idforge.train.prepare import _sha256_file, _sha256_json

    def rel(p: Path | None) -> str | None:
        return None if p is None else p.name

    parts = {
        "sha256": row.sha256,
        "face_index": row.face_index,
        "curation": digest,
        "crops": [rel(row.crop512), rel(row.crop112), rel(row.mask)],
        "embedding": hashlib.sha256(np.ascontiguousarray(row.embedding).tobytes()).hexdigest(),
        "landmarks5": None if row.landmarks5 is None else np.round(row.landmarks5, 4).tolist(),
    }
    if cfg.image_source == "matted" and row.matted is not None:
        parts["matted"] = _sha256_file(row.matted)
    return _sha256_json(parts)


# ----------------------------------------------------------------------------------------------------------------
# the actors


class ShardEncoder:
    """A Ray Data actor: loads the encoders once; each call encodes whole shards and writes them to the output.

    Input batch (pandas): ``shard`` (name) and ``rows`` (pickled list of ``prepare._Row``); output: one row per
    item ``{key, file, shapes}`` (``shapes``: JSON field shapes and resolution on each shard's first item, "" on
    the others).
    """

    def __init__(self, model: str, clip_model: str | None, cfg_json: str, device: str, dtype: str,
                 local_files_only: bool, output: str, storage_json: str | None) -> None:
        import torch

        from idforge.train.prepare import _load_encoders

        self.cfg = PrepareConfig.model_validate_json(cfg_json)
        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        self.enc = _load_encoders(model, clip_model, self.cfg, device, dtype, local_files_only, need_clip=True)
        self.output = output
        self.storage_json = storage_json

    def _publish(self, local: Path, rel: str) -> None:
        from idforge.config import StorageConfig
        from idforge.io.storage import open_storage
        from idforge.io.uri import is_s3_uri, join_uri

        if is_s3_uri(self.output):
            cfg = StorageConfig.model_validate_json(self.storage_json) if self.storage_json else None
            open_storage(self.output, cfg).put_file(local, join_uri(self.output, rel))
        else:
            dest = Path(self.output) / rel
            dest.parent.mkdir(parents=True, exist_ok=True)
            os.replace(local, dest)  # same file system: the temp file was made beside it

    def encode_shard(self, name: str, rows: list[_Row]) -> list[dict[str, str]]:
        from idforge.io.uri import is_s3_uri
        from idforge.train.prepare import _encode_items

        items: dict[str, dict[str, Any]] = {}
        meta: dict[str, dict[str, str]] = {}
        for start in range(0, len(rows), self.cfg.batch_size):
            chunk = rows[start:start + self.cfg.batch_size]
            for row, tensors in zip(chunk, _encode_items(self.enc, chunk, self.cfg), strict=True):
                items[row.key] = tensors
                meta[row.key] = {"identity": row.identity, "source": row.source, "input_hash": row.input_hash,
                                 "resolution": str(self.enc.resolution)}
        rel = shards.shard_rel(name)
        tmp_dir = None if is_s3_uri(self.output) else Path(self.output) / shards.SHARD_DIR
        if tmp_dir is not None:
            tmp_dir.mkdir(parents=True, exist_ok=True)
        fd, tmp_name = tempfile.mkstemp(prefix=f".{name}.", suffix=".tmp", dir=tmp_dir)
        os.close(fd)
        tmp = Path(tmp_name)
        try:
            shards.write_shard(tmp, items, meta, self.cfg.storage_dtype)
            shapes = json.dumps(dict(zip(("shapes", "resolution"), shards.shard_shapes(tmp), strict=True)))
            self._publish(tmp, rel)
        finally:
            tmp.unlink(missing_ok=True)
        return [{"key": row.key, "file": rel, "shapes": shapes if i == 0 else ""} for i, row in enumerate(rows)]

    def __call__(self, batch: pd.DataFrame) -> pd.DataFrame:
        import pandas as pd

        out: list[dict[str, str]] = []
        for name, blob in zip(batch["shard"], batch["rows"], strict=True):
            out += self.encode_shard(str(name), pickle.loads(blob))
        return pd.DataFrame(out, columns=["key", "file", "shapes"])


# ----------------------------------------------------------------------------------------------------------------
# the driver


def plan_shards(todo: list[_Row], shard_items: int) -> list[tuple[str, list[_Row]]]:
    """Consecutive runs of ``shard_items`` items (``todo`` is sorted by identity), each named by its keys."""
    plan = []
    for start in range(0, len(todo), shard_items):
        chunk = todo[start:start + shard_items]
        plan.append((shards.shard_name([r.key for r in chunk]), chunk))
    return plan


def _read_previous(store: Any, out: str) -> tuple[dict[str, Any] | None, pd.DataFrame | None]:
    import pandas as pd

    from idforge.io.uri import join_uri

    info_uri, index_uri = join_uri(out, "prepared.json"), join_uri(out, "index.parquet")
    if not (store.exists(info_uri) and store.exists(index_uri)):
        return None, None
    info = json.loads(store.read_text(info_uri))
    index = pd.read_parquet(io.BytesIO(store.read_bytes(index_uri)))
    return info, index


def _start_ray(cfg: PrepareConfig, num_gpus: int) -> bool:
    """Join ``prepare.ray_address`` or start a local Ray; True when this call started it (and must stop it)."""
    import ray

    if ray.is_initialized():
        return False
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    if cfg.ray_address:
        ray.init(address=cfg.ray_address, log_to_driver=False)
    else:
        ray.init(num_cpus=cfg.workers, num_gpus=num_gpus, include_dashboard=False, log_to_driver=False)
    return True


def _run_encoders(plan: list[tuple[str, list[_Row]]], model: str, clip_model: str | None, cfg: PrepareConfig,
                  device: str, dtype: str, local_files_only: bool, out: str,
                  storage: StorageConfig | None) -> list[dict[str, str]]:
    import ray

    use_gpu = device == "cuda" or (device == "auto" and _cuda())
    started = _start_ray(cfg, num_gpus=cfg.workers if (use_gpu and not cfg.ray_address) else 0)
    try:
        items = [{"shard": name, "rows": pickle.dumps(rows)} for name, rows in plan]
        ds = ray.data.from_items(items, override_num_blocks=len(items))
        ds = ds.map_batches(
            ShardEncoder, batch_size=1, batch_format="pandas", concurrency=min(cfg.workers, len(plan)),
            num_gpus=1 if use_gpu else 0, num_cpus=1,
            fn_constructor_kwargs={"model": model, "clip_model": clip_model, "cfg_json": cfg.model_dump_json(),
                                   "device": "cuda" if use_gpu else "cpu", "dtype": dtype,
                                   "local_files_only": local_files_only, "output": out,
                                   "storage_json": storage.model_dump_json() if storage else None},
        )
        results: list[dict[str, str]] = []
        for b in ds.iter_batches(batch_size=None, batch_format="pandas"):
            results += b.to_dict("records")
    finally:
        if started:
            ray.shutdown()
    want = sum(len(rows) for _, rows in plan)
    if len(results) != want:
        raise DataError(f"prepare on Ray returned {len(results)} of {want} items; see the Ray logs")
    return results


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def prepare_on_ray(
    dataset_dir: str | os.PathLike[str],
    model: str,
    output: str | os.PathLike[str],
    cfg: PrepareConfig,
    *,
    clip_model: str | None = "openai/clip-vit-base-patch16",
    device: str = "auto",
    dtype: str = "float32",
    local_files_only: bool = True,
    storage: StorageConfig | None = None,
) -> PreparedIndex:
    """``prepare.encode_dataset`` on Ray Data, writing the shard layout (see the module docstring) to ``output``
    (a local directory or an ``s3://`` prefix). Same arguments and result; ``pruned`` counts deleted shard files.

    Raises:
        DataError: the curated dataset is missing or inconsistent; an output holding the per-item layout of the
            local engine (one output holds one layout: use another directory).
    """
    import pandas as pd

    from idforge.io.storage import open_storage
    from idforge.io.uri import is_s3_uri, join_uri
    from idforge.train.prepare import (
        ITEM_VERSION,
        TEXT_VERSION,
        PreparedIndex,
        _captions,
        _encode_captions,
        _input_hash,
        _load_encoders,
        _sha256_json,
        model_fingerprint,
        prepared_info,
        read_curated,
    )

    out = str(output) if is_s3_uri(str(output)) else str(Path(output).expanduser().resolve())
    store = open_storage(out, storage)
    rows = read_curated(dataset_dir, cfg)
    digest = curation_digest(dataset_dir)
    if digest is None:
        log.warning("prepare: %s/report.json records no curation config_digest: hashing every input file instead "
                    "of using the stored hashes (re-run `idforge curate` to record it)", dataset_dir)
    model_fp = model_fingerprint(model, local_files_only=local_files_only)
    clip_fp = (model_fingerprint(clip_model, local_files_only=local_files_only, config_key="model.clip")
               if clip_model else None)
    for r in rows:
        r.input_hash = stored_input_hash(r, cfg, digest) if digest else _input_hash(r, cfg)
        r.key = _sha256_json({"v": ITEM_VERSION, "in": r.input_hash, "model": model_fp, "clip": clip_fp,
                              "cfg": cfg.item_params(), "src": "stored" if digest else "files"})[:40]
    previous, prev_index = _read_previous(store, out)
    if previous is not None and not shards.is_sharded(previous):
        raise DataError(f"{out} holds a prepared dataset of the local engine (one file per item): give "
                        "prepare.engine=ray another output directory, or keep engine=local for this one")
    # what exists: one listing of the shard folder, no per-item probe
    present = {uri.rsplit("/", 1)[-1] for uri in store.list(join_uri(out, shards.SHARD_DIR))}
    known: dict[str, str] = {}
    if prev_index is not None:
        known = {k: f for k, f in zip(prev_index["key"], prev_index["file"], strict=True)
                 if f.rsplit("/", 1)[-1] in present}
    todo = [r for r in rows if r.key not in known]

    captions = _captions(rows, cfg)
    own_rows = {(c["class_noun"], c["prompt"]): i for i, c in enumerate(captions) if c["kind"] == "image"}
    text_key = _sha256_json({"v": TEXT_VERSION, "captions": captions, "model": model_fp})[:40]
    text_rel = f"text/{text_key}.safetensors"
    need_text = not store.exists(join_uri(out, text_rel))
    identities = sorted({r.identity for r in rows})
    ident_index = {name: i for i, name in enumerate(identities)}
    fingerprint = _sha256_json({"items": [[r.key, r.identity, r.class_noun] for r in rows], "text": text_key})
    if not todo and not need_text and previous is not None and previous.get("fingerprint") == fingerprint:
        log.info("prepare: %s is up to date (%d items in shards)", out, len(rows))
        return PreparedIndex(Path(out), prev_index, previous, reused=len(rows), noop=True)

    shapes = None
    if todo:
        plan = plan_shards(todo, cfg.shard_items)
        log.info("prepare: encoding %d of %d images into %d shard(s) on Ray Data (%d actor(s))", len(todo),
                 len(rows), len(plan), cfg.workers)
        results = _run_encoders(plan, model, clip_model, cfg, device, dtype, local_files_only, out, storage)
        known.update({r["key"]: r["file"] for r in results})
        first = next(json.loads(r["shapes"]) for r in results if r["shapes"])
        shapes, resolution = first["shapes"], int(first["resolution"])
    if need_text:
        import torch

        text_device = "cuda" if device == "cuda" or (device == "auto" and torch.cuda.is_available()) else "cpu"
        enc = _load_encoders(model, clip_model, cfg, text_device, dtype, local_files_only, need_clip=False)
        _write_safetensors(store, join_uri(out, text_rel), _encode_captions(enc, [c["prompt"] for c in captions]),
                           cfg.storage_dtype, {"prompts": json.dumps([c["prompt"] for c in captions])})
    if shapes is None:  # nothing encoded: the previous run's (same item settings, or the keys would differ)
        assert previous is not None
        shapes, resolution = previous["shapes"], int(previous["resolution"])
    index = pd.DataFrame({
        "key": [r.key for r in rows],
        "identity": [r.identity for r in rows],
        "identity_index": [ident_index[r.identity] for r in rows],
        "class_noun": [r.class_noun for r in rows],
        "source": [r.source for r in rows],
        "sha256": [r.sha256 for r in rows],
        "face_index": [r.face_index for r in rows],
        "file": [known[r.key] for r in rows],
        "caption_row": [own_rows.get((r.class_noun, r.caption), -1) for r in rows],
    })
    live = set(index["file"])
    info = {
        **prepared_info(fingerprint, dataset_dir, model, model_fp, clip_model, clip_fp, cfg, resolution, shapes,
                        text_rel, captions, identities, len(rows)),
        "layout": shards.LAYOUT,
        "engine": ENGINE,
        "num_shards": len(live),
        "input_hashes": "stored" if digest else "files",
    }
    buf = io.BytesIO()
    index.to_parquet(buf, index=False, row_group_size=shards.INDEX_ROW_GROUP)
    store.write_bytes(join_uri(out, "index.parquet"), buf.getvalue())
    store.write_text(join_uri(out, "prepared.json"), json.dumps(info, indent=2, sort_keys=True))
    pruned = _prune(store, out, live, text_rel) if cfg.prune else 0
    log.info("prepare: %d items in %d shards (%d encoded), captions %s", len(rows), len(live), len(todo),
             "encoded" if need_text else "cached")
    return PreparedIndex(Path(out), index, info, computed=len(todo), reused=len(rows) - len(todo),
                         text_computed=need_text, pruned=pruned)


def _write_safetensors(store: Any, uri: str, tensors: dict[str, Any], dtype: str, metadata: dict[str, str]) -> None:
    from safetensors.torch import save

    store.write_bytes(uri, save(shards.stored(tensors, dtype), metadata=metadata))


def _prune(store: Any, out: str, live: set[str], text_rel: str) -> int:
    """Delete shard files no index row references (every item in them is stale) and caption files other than the
    current one; returns the shard files deleted."""
    from idforge.io.uri import join_uri

    n = 0
    for uri in store.list(join_uri(out, shards.SHARD_DIR)):
        name = uri.rsplit("/", 1)[-1]
        if name.endswith(".safetensors") and f"{shards.SHARD_DIR}/{name}" not in live:
            store.delete(uri)
            n += 1
    for uri in store.list(join_uri(out, "text")):
        if not uri.endswith("/" + text_rel.split("/", 1)[1]):
            store.delete(uri)
    return n
