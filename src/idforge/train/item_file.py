"""Is a cached safetensors file whole? A check of its header against its size, without reading the tensors.

``prepare`` writes every item atomically, but a copy (``localize``, rsync, a full disk elsewhere) or a bad sector can
still leave a truncated or garbled file. Reading the header costs one small read per file, so ``prepare`` checks every
cached item before reusing it and training checks every item before it starts: the damage is found up front and
named, instead of failing one item deep inside training (and again on every restart).

The format (https://github.com/huggingface/safetensors): an 8-byte little-endian header length ``N``, ``N`` bytes of
JSON ``{name: {dtype, shape, data_offsets: [begin, end]}, "__metadata__": {...}}``, then the tensor bytes, which the
offsets must cover exactly. Damage inside the tensor bytes of an intact-sized file is not detectable this way (the
prepared index stores no content hash).
"""

from __future__ import annotations

import json
import math
import os
import struct
from pathlib import Path

__all__ = ["damaged_items", "safetensors_problem"]

_DTYPE_BYTES = {"BOOL": 1, "U8": 1, "I8": 1, "F8_E5M2": 1, "F8_E4M3": 1, "I16": 2, "U16": 2, "F16": 2, "BF16": 2,
                "I32": 4, "U32": 4, "F32": 4, "I64": 8, "U64": 8, "F64": 8}
_MAX_HEADER = 100 << 20  # safetensors' own limit on the header size


def safetensors_problem(path: str | os.PathLike[str]) -> str | None:
    """Why ``path`` is not a complete safetensors file ("missing", "truncated: ..."), or None when it is whole."""
    p = Path(path)
    try:
        size = p.stat().st_size
        with open(p, "rb") as fh:
            head = fh.read(8)
            if len(head) < 8:
                return f"truncated: {size} bytes, shorter than the 8-byte header length"
            (n,) = struct.unpack("<Q", head)
            if n > _MAX_HEADER or n > size - 8:
                return f"truncated or garbled: header length {n} but the file has {size} bytes"
            raw = fh.read(n)
    except FileNotFoundError:
        return "missing"
    except OSError as exc:
        return f"unreadable ({exc.strerror or exc})"
    try:
        header = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        return f"garbled header ({exc.__class__.__name__})"
    if not isinstance(header, dict):
        return "garbled header (not a JSON object)"
    spans = []
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        try:
            begin, end = (int(x) for x in entry["data_offsets"])
            numel = math.prod(int(d) for d in entry["shape"])
            itemsize = _DTYPE_BYTES[entry["dtype"]]
        except (KeyError, TypeError, ValueError):
            return f"garbled header (entry {name!r})"
        if end - begin != numel * itemsize:
            return f"garbled header (tensor {name!r} spans {end - begin} bytes, its shape needs {numel * itemsize})"
        spans.append((begin, end))
    spans.sort()
    covered = 0
    for begin, end in spans:
        if begin != covered:
            return "garbled header (tensor data has gaps or overlaps)"
        covered = end
    data = size - 8 - n
    if covered != data:
        what = "truncated" if data < covered else "trailing bytes"
        return f"{what}: the header describes {covered} bytes of tensor data, the file holds {data}"
    return None


def damaged_items(root: str | os.PathLike[str], files: list[str]) -> dict[str, str]:
    """``{file: problem}`` for each of ``files`` (relative to ``root``) that is not whole; empty when all are."""
    out = {}
    for f in files:
        problem = safetensors_problem(Path(root) / f)
        if problem is not None:
            out[f] = problem
    return out
