"""The shard layout of a prepared dataset: many items per safetensors file (``prepare.engine: ray``).

A shard ``shards/<s>.safetensors`` holds the tensors of its items under ``<item key>/<field>`` (the fields of
``idforge.train.prepare``'s module docstring; items of one shard may differ in shape, e.g. aspect buckets) and, in its
header metadata, ``format`` and ``items``: JSON ``{key: {identity, source, input_hash, resolution}}``. The shard's
name ``s`` hashes its sorted item keys, so a shard is content-addressed like an item file: a rerun that would write
the same shard finds it and writes nothing.

The index (``index.parquet``) names each item's shard in its ``file`` column, exactly where the per-item layout names
the item's own file; ``prepared.json`` says ``"layout": "shards"``. Readers open a shard once (safetensors maps the
file; a read copies only the item's tensors) -- see :class:`ShardReader`.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from idforge.errors import DataError

if TYPE_CHECKING:
    import torch

SHARD_FORMAT = "idforge.shard/1"
LAYOUT = "shards"
SHARD_DIR = "shards"
# Rows per row group of a sharded set's index.parquet: a streaming rank reads the index a row group at a time, so
# its transient memory is one group's, not the whole index's (``idforge.train.stream.read_index_compact``).
INDEX_ROW_GROUP = 16384
# float tensors kept float32 whatever the storage dtype: small, and cosine similarities need the precision
# (the same rule as prepare._save)
KEEP_FLOAT32 = frozenset({"face_embed", "target_kps"})


def shard_name(keys: Sequence[str]) -> str:
    """Content address of a shard: the hash of its sorted item keys."""
    return hashlib.sha256("\n".join(sorted(keys)).encode()).hexdigest()[:40]


def shard_rel(name: str) -> str:
    """The dataset-relative path of shard ``name`` (what the index's ``file`` column holds)."""
    return f"{SHARD_DIR}/{name}.safetensors"


def is_sharded(info: Mapping[str, Any]) -> bool:
    """True when ``prepared.json`` describes the shard layout."""
    return info.get("layout") == LAYOUT


def stored(tensors: Mapping[str, torch.Tensor], dtype: str) -> dict[str, torch.Tensor]:
    """The tensors as the cache stores them: floats cast to ``dtype`` except :data:`KEEP_FLOAT32`."""
    import torch

    cast = torch.float16 if dtype == "float16" else torch.float32
    return {k: (v.to(cast) if v.is_floating_point() and k not in KEEP_FLOAT32 else v).contiguous()
            for k, v in tensors.items()}


def write_shard(path: str | os.PathLike[str], items: Mapping[str, Mapping[str, torch.Tensor]],
                meta: Mapping[str, Mapping[str, str]], dtype: str | None) -> None:
    """Write the items ``{key: tensors}`` (float32 as encoded, cast by :func:`stored` to ``dtype``; None = as
    given) as one shard at the local ``path`` (not atomic: callers write a temp path and rename or upload it)."""
    from safetensors.torch import save_file

    flat = {f"{key}/{name}": t.contiguous() for key, tensors in items.items()
            for name, t in (stored(tensors, dtype) if dtype else tensors).items()}
    save_file(flat, str(path), metadata={"format": SHARD_FORMAT, "items": json.dumps(meta, sort_keys=True)})


def shard_shapes(path: str | os.PathLike[str]) -> tuple[dict[str, list[int]], int]:
    """(field shapes of the shard's first item, its training resolution) from the header only."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as fh:
        items = json.loads((fh.metadata() or {})["items"])
        key = sorted(items)[0]
        shapes = {name.split("/", 1)[1]: list(fh.get_slice(name).get_shape())
                  for name in fh.keys() if name.startswith(f"{key}/")}
        return shapes, int(items[key]["resolution"])


class ShardReader:
    """Reads single items out of shard files, keeping the ``max_open`` most recently used shards open.

    ``read(path, key)`` returns the item's tensors, float32/uint8 (fp16 -> fp32) like ``PreparedDataset.item``.
    Raises DataError naming the shard when it is missing, unreadable or lacks the item.
    """

    def __init__(self, max_open: int = 8) -> None:
        self.max_open = max_open
        self._open: OrderedDict[str, tuple[Any, dict[str, list[str]]]] = OrderedDict()

    def _handle(self, path: Path) -> tuple[Any, dict[str, list[str]]]:
        from safetensors import safe_open

        name = str(path)
        if name in self._open:
            self._open.move_to_end(name)
            return self._open[name]
        try:
            fh = safe_open(name, framework="pt")
        except FileNotFoundError:
            raise DataError(f"prepared shard {path} is missing: re-run `idforge prepare` on its dataset") from None
        except Exception as exc:  # safetensors raises its own error types for a truncated/garbled header
            raise DataError(f"prepared shard {path} is unreadable ({exc}): delete it and re-run `idforge prepare` "
                            "(it is recomputed)") from None
        by_key: dict[str, list[str]] = {}
        for t in fh.keys():
            key, _, field = t.partition("/")
            by_key.setdefault(key, []).append(field)
        self._open[name] = (fh, by_key)
        while len(self._open) > self.max_open:
            self._open.popitem(last=False)
        return fh, by_key

    def read(self, path: str | os.PathLike[str], key: str) -> dict[str, torch.Tensor]:
        fh, by_key = self._handle(Path(path))
        if key not in by_key:
            raise DataError(f"prepared shard {path} has no item {key}: the index and the shards disagree, re-run "
                            "`idforge prepare`")
        out = {}
        for field in by_key[key]:
            t = fh.get_tensor(f"{key}/{field}")
            out[field] = t.float() if t.is_floating_point() else t
        return out

    def forget(self, path: str | os.PathLike[str]) -> None:
        """Close ``path`` (before its cached file is evicted/deleted)."""
        self._open.pop(str(path), None)


def reshard(src: str | os.PathLike[str], dst: str | os.PathLike[str], shard_items: int = 256) -> Path:
    """Copy a per-item prepared set (``prepare.engine: local``) into the shard layout at ``dst`` (local), items in
    index order (prepare sorts them by identity), ``shard_items`` per shard; tensors are copied bit for bit.

    For moving an existing cache to ``train.input: stream`` without re-encoding, and for tests and benchmarks.
    Raises DataError when ``src`` is not a per-item prepared set.
    """
    import shutil

    from safetensors import safe_open

    from idforge.io.atomic import atomic_path, atomic_write_text
    from idforge.train.dataset import read_prepared

    if shard_items < 1:
        raise DataError(f"shard_items must be >= 1, got {shard_items}")
    root, out = Path(src), Path(dst)
    index, info = read_prepared(root)
    if is_sharded(info):
        raise DataError(f"{root} is already sharded")
    files = []
    for start in range(0, len(index), shard_items):
        chunk = index.iloc[start:start + shard_items]
        items, meta = {}, {}
        for key, rel in zip(chunk["key"], chunk["file"], strict=True):
            with safe_open(str(root / rel), framework="pt") as fh:
                items[key] = {name: fh.get_tensor(name) for name in fh.keys()}
                m = fh.metadata() or {}
            meta[key] = {k: m.get(k, "") for k in ("identity", "source", "input_hash", "resolution")}
        rel = shard_rel(shard_name(list(chunk["key"])))
        (out / SHARD_DIR).mkdir(parents=True, exist_ok=True)
        with atomic_path(out / rel) as tmp:
            write_shard(tmp, items, meta, None)  # stored already: copied as they are
        files += [rel] * len(chunk)
    text = out / info["text_file"]
    text.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(root / info["text_file"], text)
    index = index.assign(file=files)
    with atomic_path(out / "index.parquet") as tmp:
        index.to_parquet(tmp, index=False, row_group_size=INDEX_ROW_GROUP)
    atomic_write_text(out / "prepared.json", json.dumps({**info, "layout": LAYOUT, "num_shards": len(set(files))},
                                                        indent=2, sort_keys=True))
    return out
