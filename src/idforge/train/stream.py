"""Streamed per-rank training input (``train.input: stream``) over a sharded prepared set (``prepare.engine: ray``).

Each Ray Train rank reads only ITS shards, from the prepared set's storage (a local/shared directory, or an
``s3://`` prefix), and nothing is copied whole to any node, so a node that joins later needs nothing in advance:

- :func:`assign_identities` splits the identities over the ranks (balanced by item count, deterministic): the
  unit is the identity, so a sample's references (photos of the same person) are always on the rank's own shards.
  Since ``prepare`` writes items sorted by identity, a rank's identities sit in about ``1/world`` of the shards.
- :class:`ShardCache` gives local paths of shards: a local root is read in place; a remote one is downloaded into a
  local cache bounded by bytes (least recently used first out).
- :class:`StreamDataset` keeps only compact per-item metadata (numpy arrays: key bytes, identity and shard codes:
  ~60 bytes per item, the O(N·small) part) and reads tensors from shards on demand. Its samples are
  ``PreparedDataset``'s, choice for choice: the same ``(seed, row, position)`` rule picks flip, caption and
  references, so ``StreamDataset[(row, p)] == PreparedDataset[(row, p)]`` over one prepared set.
- :class:`RankStream` orders a rank's samples so the cache is hit: each epoch permutes the rank's shards, takes
  them ``window`` at a time and permutes the items of a window (a shuffle buffer of ``window`` shards).

Resume: the stream of rank ``r`` is a pure function of (seed, rank, world size, the prepared set), and a checkpoint
records the samples each rank used (``step x batch x grad_accum``), so a resumed run with the same world size and
data continues bit-exactly where it stopped (tested). With another world size the identities are re-assigned: the
resumed run draws a fresh deterministic stream from the same position, not the continuation (no sample is
tracked as seen). The streamed order differs from ``train.input: local``'s (a global permutation), so the two
inputs give different (each reproducible) runs.
"""

from __future__ import annotations

import heapq
import json
import logging
import os
import shutil
from collections import OrderedDict
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from idforge.errors import DataError
from idforge.train.dataset import compose_sample, refs_of_items
from idforge.train.shards import ShardReader, is_sharded

if TYPE_CHECKING:
    import torch

    from idforge.config import StorageConfig

log = logging.getLogger(__name__)

META_FILES = ("prepared.json", "index.parquet")


def _is_remote(root: str) -> bool:
    return "://" in root and not root.startswith("file://")


def fetch_metadata(root: str, meta_dir: str | os.PathLike[str], storage: StorageConfig | None = None) -> Path:
    """A local directory with the prepared set's small files (``prepared.json``, ``index.parquet``, the caption
    file): ``root`` itself when local, else a copy of those three under ``meta_dir`` (never the shards)."""
    if not _is_remote(root):
        return Path(root)
    from idforge.io.storage import open_storage
    from idforge.io.uri import join_uri

    store = open_storage(root, storage)
    meta = Path(meta_dir)
    meta.mkdir(parents=True, exist_ok=True)
    for name in META_FILES:
        if not store.exists(join_uri(root, name)):
            raise DataError(f"{root} is not a prepared dataset (no {name}): run `idforge prepare` with "
                            "prepare.engine=ray and this output first")
        store.get_file(join_uri(root, name), meta / name)
    info = json.loads((meta / "prepared.json").read_text())
    store.get_file(join_uri(root, info["text_file"]), meta / info["text_file"])
    return meta


class ShardCache:
    """Local paths of a prepared set's shards; for a remote root, downloads kept under ``cache_dir`` up to
    ``max_bytes`` (LRU; the shard just fetched always stays, so one shard larger than the bound still works).

    ``copy`` forces the download path for a local root (tests, benchmarks); default: only remote roots copy.
    Counters ``hits``, ``misses``, ``bytes_fetched``, ``peak_bytes`` say how it went.
    """

    def __init__(self, root: str, cache_dir: str | os.PathLike[str], max_bytes: int,
                 storage: StorageConfig | None = None, copy: bool | None = None,
                 reader: ShardReader | None = None) -> None:
        if max_bytes < 1:
            raise DataError(f"stream cache max_bytes must be >= 1, got {max_bytes}: set train.stream_cache_bytes")
        self.root = root.rstrip("/")
        self.copy = _is_remote(root) if copy is None else copy
        self.cache_dir = Path(cache_dir)
        self.max_bytes = max_bytes
        self.storage = storage
        self.reader = reader
        self._lru: OrderedDict[str, int] = OrderedDict()  # rel -> bytes
        self.bytes = 0
        self.hits = self.misses = self.bytes_fetched = self.peak_bytes = 0
        self._store = None

    def _storage(self) -> Any:
        if self._store is None:
            from idforge.io.storage import open_storage

            self._store = open_storage(self.root, self.storage)
        return self._store

    def path(self, rel: str) -> Path:
        """The local path of shard ``rel`` (dataset-relative), downloading it when needed."""
        if not self.copy:
            return Path(self.root) / rel
        local = self.cache_dir / rel
        if rel in self._lru:
            self._lru.move_to_end(rel)
            self.hits += 1
            return local
        from idforge.io.uri import join_uri

        self.misses += 1
        self._storage().get_file(join_uri(self.root, rel), local)  # atomic: temp then rename
        size = local.stat().st_size
        self._lru[rel] = size
        self.bytes += size
        self.bytes_fetched += size
        while self.bytes > self.max_bytes and len(self._lru) > 1:
            old, old_size = self._lru.popitem(last=False)
            if self.reader is not None:
                self.reader.forget(self.cache_dir / old)
            (self.cache_dir / old).unlink(missing_ok=True)
            self.bytes -= old_size
        self.peak_bytes = max(self.peak_bytes, self.bytes)
        return local

    def clear(self) -> None:
        shutil.rmtree(self.cache_dir, ignore_errors=True)
        self._lru.clear()
        self.bytes = 0


def assign_identities(sizes: Sequence[int], world_size: int) -> np.ndarray:
    """The rank of each identity (``sizes``: items per identity, in identity order): largest first onto the least
    loaded rank (ties: lower rank), so ranks hold about equal item counts. Deterministic; O(I log I)."""
    if world_size < 1:
        raise ValueError(f"world size must be >= 1, got {world_size}")
    order = sorted(range(len(sizes)), key=lambda i: (-int(sizes[i]), i))
    heap = [(0, r) for r in range(world_size)]
    ranks = np.zeros(len(sizes), dtype=np.int32)
    for i in order:
        load, r = heapq.heappop(heap)
        ranks[i] = r
        heapq.heappush(heap, (load + int(sizes[i]), r))
    return ranks


def read_index_compact(path: str | os.PathLike[str], batch_rows: int = 16384) -> dict[str, Any]:
    """The index columns a streaming rank needs, as compact numpy arrays: ``keys`` (``S<n>``), ``identity`` and
    ``file`` and ``class_noun`` as int32 codes into value lists (``*_values``, in first-seen order), and
    ``caption_row``. Read ``batch_rows`` rows at a time, single-threaded: the transient Arrow memory (which the
    allocator keeps once touched) stays the same whatever the index size; no Python string per row is made."""
    import pyarrow as pa
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    names = ("identity", "file", "class_noun")
    values: dict[str, dict[str, int]] = {n: {} for n in names}
    codes: dict[str, list[np.ndarray]] = {n: [] for n in names}
    keys, captions = [], []
    pf = pq.ParquetFile(str(path))
    for batch in pf.iter_batches(batch_size=batch_rows, columns=["key", *names, "caption_row"], use_threads=False):
        keys.append(_fixed_bytes(batch.column("key")))
        captions.append(np.asarray(batch.column("caption_row").to_numpy(zero_copy_only=False), dtype=np.int32))
        for n in names:
            col = batch.column(n)
            uniq = pc.unique(col).to_pylist()  # few per batch: identities, shards and nouns are runs
            seen = values[n]
            mapping = np.asarray([seen.setdefault(str(u), len(seen)) for u in uniq], dtype=np.int32)
            local = pc.index_in(col, value_set=pa.array(uniq, type=col.type)).to_numpy(zero_copy_only=False)
            codes[n].append(mapping[np.asarray(local, dtype=np.int64)])
    width = max((k.dtype.itemsize for k in keys), default=1)
    out: dict[str, Any] = {
        "keys": np.concatenate([k.astype(f"S{width}") for k in keys]) if keys else np.zeros(0, "S1"),
        "caption_row": np.concatenate(captions) if captions else np.zeros(0, np.int32),
    }
    for n in names:
        out[n] = np.concatenate(codes[n]) if codes[n] else np.zeros(0, np.int32)
        out[f"{n}_values"] = list(values[n])
    return out


def _fixed_bytes(column: Any) -> np.ndarray:
    """A pyarrow column of equal-length strings (the item keys) as a numpy ``S<n>`` array."""
    import pyarrow as pa

    arr = column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column
    arr = arr.cast(pa.string())
    n = len(arr)
    if n == 0:
        return np.zeros(0, dtype="S1")
    offsets = np.frombuffer(arr.buffers()[1], dtype=np.int32)[arr.offset:arr.offset + n + 1]
    width = int(offsets[1] - offsets[0])
    if not np.all(np.diff(offsets) == width):
        raise DataError("prepared index keys differ in length: the index is not one `idforge prepare` wrote")
    data = np.frombuffer(arr.buffers()[2], dtype=np.uint8)[offsets[0]:offsets[-1]]
    return data.view(f"S{width}").copy()


class StreamDataset:
    """The samples of one rank over a sharded prepared set, read from its shards on demand.

    Args:
        meta_dir: local directory with ``prepared.json``/``index.parquet``/the caption file (:func:`fetch_metadata`).
        cache: where shards come from (:class:`ShardCache`).
        rank, world_size: this rank's identities only (:func:`assign_identities`); targets AND references.
        keys: restrict the universe to these item keys (the training split); None = all.
        other arguments: as ``PreparedDataset``.
    """

    def __init__(self, meta_dir: str | os.PathLike[str], cache: ShardCache, *, rank: int = 0, world_size: int = 1,
                 refs_per_item: int = 1, ref_includes_target: bool = False, flip_prob: float = 0.5, seed: int = 0,
                 keys: Sequence[str] | None = None) -> None:
        import pandas as pd
        from safetensors.torch import load_file

        if refs_per_item < 1:
            raise DataError(f"refs_per_item must be >= 1, got {refs_per_item}")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is outside world size {world_size}")
        meta = Path(meta_dir)
        info_path = meta / "prepared.json"
        if not info_path.is_file() or not (meta / "index.parquet").is_file():
            raise DataError(f"{meta} is not a prepared dataset (no prepared.json/index.parquet): run `idforge "
                            "prepare` first")
        self.info = json.loads(info_path.read_text())
        if not is_sharded(self.info):
            raise DataError(f"{meta} holds one file per item (prepare.engine=local): train.input=stream reads "
                            "shards; prepare with prepare.engine=ray, or use train.input=local")
        self.cache = cache
        self.reader = cache.reader or ShardReader()
        cache.reader = self.reader
        index = read_index_compact(meta / "index.parquet")
        self.keys = index["keys"]
        ident_codes, ident_values = index["identity"], index["identity_values"]
        self.file_codes, self.files = index["file"], index["file_values"]
        noun_codes, noun_values = index["class_noun"], index["class_noun_values"]
        self.own_caption = index["caption_row"]
        del index
        self.identity_names = list(self.info.get("identities") or ident_values)
        # identity ids of the full prepared list (they agree between ranks and subsets, as PreparedDataset's do)
        name_to_id = {n: i for i, n in enumerate(self.identity_names)}
        self.identity_ids = np.asarray([name_to_id[n] for n in ident_values], dtype=np.int32)[ident_codes]
        self._ident_values = ident_values
        self._ident_codes = ident_codes
        codes_present, first = np.unique(ident_codes, return_index=True)
        self.class_nouns = {ident_values[c]: noun_values[noun_codes[r]] for c, r in zip(codes_present, first,
                                                                                         strict=True)}
        universe = np.ones(len(self.keys), dtype=bool)
        if keys is not None:
            universe = np.isin(self.keys, np.asarray([k.encode() for k in keys], dtype=self.keys.dtype))
        sizes = np.bincount(ident_codes[universe], minlength=len(ident_values))
        owner = assign_identities(sizes, world_size)
        mine = universe & (owner[ident_codes] == rank) & (sizes[ident_codes] > 0)
        self.targets = np.flatnonzero(mine)
        if len(self.targets) == 0:
            raise DataError(f"rank {rank} of {world_size} has no identity of {meta} ({int((sizes > 0).sum())} "
                            "identities): use fewer workers than identities")
        order = np.argsort(ident_codes[self.targets], kind="stable")
        grouped = self.targets[order]
        bounds = np.flatnonzero(np.diff(ident_codes[grouped])) + 1
        self.members = {ident_values[ident_codes[g[0]]]: g for g in np.split(grouped, bounds)}
        # only what the lookup by row needs; the category column costs one small int per item
        self.all_items = pd.DataFrame({"identity": pd.Categorical.from_codes(ident_codes, ident_values)})
        self.refs_per_item, self.ref_includes_target = refs_per_item, ref_includes_target
        self.flip_prob, self.seed = flip_prob, seed
        self.resolution = int(self.info["resolution"])
        text = load_file(str(meta / self.info["text_file"]))
        self.text = {k: v.float() if v.is_floating_point() else v for k, v in text.items()}
        self.caption_rows: dict[str, list[int]] = {}
        for i, cap in enumerate(self.info["captions"]):
            if cap.get("kind", "template") == "template":
                self.caption_rows.setdefault(cap["class_noun"], []).append(i)

    def __len__(self) -> int:
        return len(self.targets)

    def identity_of(self, row: int) -> str:
        return self._ident_values[self._ident_codes[row]]

    def shard_of(self, row: int) -> int:
        return int(self.file_codes[row])

    def item(self, row: int) -> dict[str, torch.Tensor]:
        """The cached tensors of one item (row of the full index)."""
        rel = self.files[self.file_codes[row]]
        return self.reader.read(self.cache.path(rel), self.keys[row].decode())

    def reference_rows(self, target_row: int, rng: np.random.Generator) -> list[int]:
        members = self.members[self.identity_of(target_row)]
        pool = members if self.ref_includes_target else members[members != target_row]
        if len(pool) == 0:
            pool = members
        replace = len(pool) < self.refs_per_item
        return [int(r) for r in rng.choice(pool, size=self.refs_per_item, replace=replace)]

    def __getitem__(self, key: tuple[int, int]) -> dict[str, torch.Tensor]:
        """The sample of target ``row`` (a row of the full index, as :class:`RankStream` yields) at ``position``."""
        row, position = int(key[0]), int(key[1])
        rng = np.random.default_rng([self.seed, row, position])  # PreparedDataset's rule
        target = self.item(row)
        flip = "latents_flip" in target and rng.random() < self.flip_prob
        own = int(self.own_caption[row])
        noun = self.class_nouns[self.identity_of(row)]
        caption = own if own >= 0 else int(rng.choice(self.caption_rows[noun]))
        return self.compose(row, self.reference_rows(row, rng), flip=flip, caption=caption)

    def compose(self, row: int, ref_rows: Sequence[int], flip: bool = False, caption: int | None = None
                ) -> dict[str, torch.Tensor]:
        """One sample from explicit choices (``PreparedDataset.compose``'s layout and rules)."""
        target = self.item(row)
        noun = self.class_nouns[self.identity_of(row)]
        if caption is None:
            own = int(self.own_caption[row])
            caption = own if own >= 0 else self.caption_rows[noun][0]
        refs = [self.item(int(r)) for r in ref_rows]
        return compose_sample(target, refs, flip=flip, width=self.resolution, text=self.text, caption=caption,
                              identity=int(self.identity_ids[row]))

    def identity_refs(self, identity: str, n: int | None = None, rows: Sequence[int] | None = None):
        """``IdentityRefs`` of one of this rank's identities (its first ``n`` images, or the given rows)."""
        if rows is None:
            if identity not in self.members:
                raise DataError(f"identity {identity!r} is not among this rank's identities")
            rows = [int(r) for r in self.members[identity][: (n or len(self.members[identity]))]]
        return refs_of_items([self.item(int(r)) for r in rows], self.class_nouns[identity])


class RankStream:
    """An endless, deterministic stream of ``(row, position)`` for one rank of a :class:`StreamDataset`.

    Epoch ``e`` permutes the rank's shards (seeded by (seed, rank, world, e)), takes them ``window`` at a time and
    permutes the items of each window: every item of the rank once per epoch, at most ``window`` shards being read
    at a time (size the cache for ``window`` shards). ``start`` = samples this rank already used (resume).
    """

    def __init__(self, dataset: StreamDataset, seed: int = 0, start: int = 0, window: int = 8,
                 world_size: int = 1, rank: int = 0) -> None:
        if window < 1:
            raise DataError(f"stream window must be >= 1 shard, got {window}")
        self.dataset, self.seed, self.start, self.window = dataset, seed, start, window
        self.rank, self.world_size = rank, world_size
        targets = dataset.targets
        shard = dataset.file_codes[targets]
        order = np.argsort(shard, kind="stable")
        self._by_shard = np.split(targets[order], np.flatnonzero(np.diff(shard[order])) + 1)

    def epoch_order(self, epoch: int) -> np.ndarray:
        rng = np.random.default_rng([self.seed, 104729, self.rank, self.world_size, epoch])
        shards = rng.permutation(len(self._by_shard))
        parts = []
        for start in range(0, len(shards), self.window):
            rows = np.concatenate([self._by_shard[s] for s in shards[start:start + self.window]])
            parts.append(rows[rng.permutation(len(rows))])
        return np.concatenate(parts)

    def __iter__(self) -> Iterator[tuple[int, int]]:
        n = len(self.dataset.targets)
        position = self.start
        epoch, order = -1, None
        while True:
            e, offset = divmod(position, n)
            if e != epoch:
                epoch, order = e, self.epoch_order(e)
            # positions are per rank: distinct ranks seed their choices apart through their distinct rows
            yield int(order[offset]), position
            position += 1


def make_stream_loader(dataset: StreamDataset, batch_size: int, seed: int = 0, start_sample: int = 0,
                       window: int = 8, rank: int = 0, world_size: int = 1):
    """An endless DataLoader of collated batches for one rank (in-process: the shard cache is this process's)."""
    from torch.utils.data import DataLoader

    from idforge.train.dataset import collate

    stream = RankStream(dataset, seed, start_sample, window, world_size=world_size, rank=rank)
    return DataLoader(dataset, batch_size=batch_size, sampler=stream, collate_fn=collate, num_workers=0)


def stream_input(data_dir: str, cache_dir: str | os.PathLike[str], max_bytes: int,
                 storage: StorageConfig | None = None, **kw: Any) -> StreamDataset:
    """A :class:`StreamDataset` of ``data_dir`` (local or ``s3://``): its metadata under ``cache_dir/meta``, its
    shards through a :class:`ShardCache` under ``cache_dir/shards`` bounded by ``max_bytes``."""
    cache_dir = Path(cache_dir)
    meta = fetch_metadata(data_dir, cache_dir / "meta", storage)
    cache = ShardCache(data_dir, cache_dir / "shards", max_bytes, storage)
    return StreamDataset(meta, cache, **kw)


class StreamInput:
    """The training loop's view of ``train.input: stream``: the prepared set's metadata (fetched once per worker),
    this rank's :class:`StreamDataset` and its loader. ``cache_dir`` defaults to the idforge cache, one folder per
    data location and rank (two workers on one node never share a cache's byte count)."""

    def __init__(self, data_dir: str, storage: dict[str, Any] | None, cfg: Any, rank: int,
                 cache_dir: str | os.PathLike[str] | None = None) -> None:
        import hashlib

        from idforge.config import StorageConfig

        self.data_dir, self.cfg, self.rank = data_dir, cfg, rank
        self.storage = StorageConfig.model_validate(storage) if storage else None
        if cache_dir is None:
            from idforge.io.locations import cache_root

            digest = hashlib.sha256(data_dir.encode()).hexdigest()[:16]
            cache_dir = cache_root() / "stream" / digest / f"rank{rank}"
        self.cache_dir = Path(cache_dir)
        self.meta = fetch_metadata(data_dir, self.cache_dir / "meta", self.storage)
        self.info = json.loads((self.meta / "prepared.json").read_text())
        if not is_sharded(self.info):
            raise DataError(f"{data_dir} holds one file per item (prepare.engine=local): train.input=stream reads "
                            "shards; prepare with prepare.engine=ray (or `idforge.train.shards.reshard`), or use "
                            "train.input=local")

    def index(self) -> Any:
        """key and identity of every item (for the hold-out split), as a pandas table."""
        import pandas as pd

        return pd.read_parquet(self.meta / "index.parquet", columns=["key", "identity"])

    def dataset(self, rank: int, world_size: int, keys: Sequence[str] | None = None, **kw: Any) -> StreamDataset:
        cache = ShardCache(self.data_dir, self.cache_dir / "shards", self.cfg.stream_cache_bytes, self.storage)
        return StreamDataset(self.meta, cache, rank=rank, world_size=world_size, keys=keys, **kw)

    def loader(self, dataset: StreamDataset, batch_size: int, start_sample: int, rank: int, world_size: int):
        return make_stream_loader(dataset, batch_size, self.cfg.seed, start_sample, self.cfg.stream_window_shards,
                                  rank=rank, world_size=world_size)
