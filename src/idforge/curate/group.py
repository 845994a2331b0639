"""Stage 7: group faces into identities by cosine similarity, optionally seeded or overridden by labels.

Identity ids are stable: a labelled identity is its label; an unlabelled cluster is ``id-`` + the first 12 hex of
the sha256 over its sorted member keys (``<file sha256>:<face index>``), so re-runs and file order never shuffle
them (they change only when the membership changes).
"""

from __future__ import annotations

import csv
import hashlib
from collections import Counter
from pathlib import Path

import numpy as np

from idforge.errors import DataError
from idforge.io.identity import check_identity

DEFAULT_THRESHOLDS = {"insightface": 0.35, "opencv": 0.40}


def default_threshold(backend: str) -> float:
    return DEFAULT_THRESHOLDS[backend]


def cluster(emb: np.ndarray, threshold: float, linkage: str = "average") -> np.ndarray:
    """(N,) cluster index per row of (N, D) L2-normalised ``emb``.

    average: average-linkage agglomerative clustering cut where mean pairwise similarity drops below ``threshold``
    (a single chance match cannot merge two people). connected: connected components of the graph
    ``similarity >= threshold`` (single linkage). Cluster indices are in order of first appearance.
    """
    n = emb.shape[0]
    if n == 0:
        return np.zeros(0, dtype=np.int64)
    if n == 1:
        return np.zeros(1, dtype=np.int64)
    sim = np.clip(emb.astype(np.float64) @ emb.astype(np.float64).T, -1.0, 1.0)
    if linkage == "connected":
        from scipy.sparse.csgraph import connected_components

        _, raw = connected_components(sim >= threshold, directed=False)
    elif linkage == "average":
        from scipy.cluster.hierarchy import fcluster
        from scipy.cluster.hierarchy import linkage as scipy_linkage
        from scipy.spatial.distance import squareform

        dist = 1.0 - sim
        np.fill_diagonal(dist, 0.0)
        z = scipy_linkage(squareform(np.maximum(dist, 0.0), checks=False), method="average")
        raw = fcluster(z, t=1.0 - threshold, criterion="distance")
    else:
        raise DataError(f"unknown linkage {linkage!r}; use 'average' or 'connected'")
    remap: dict[int, int] = {}
    return np.array([remap.setdefault(int(c), len(remap)) for c in raw], dtype=np.int64)


def cluster_id(member_keys: list[str]) -> str:
    return "id-" + hashlib.sha256("\n".join(sorted(member_keys)).encode()).hexdigest()[:12]


def read_labels(path: str | Path) -> dict[str, str]:
    """labels.csv -> {key: identity}. Columns: ``identity`` and one of ``file``/``path``/``source`` (first found in
    that order: some label files use ``source`` for provenance); keys may be the source as given, the path relative
    to the input root, or a bare file name."""
    p = Path(path)
    if not p.is_file():
        raise DataError(f"labels file {path} does not exist; give a CSV with columns source,identity")
    with open(p, newline="", encoding="utf-8-sig") as fh:
        reader = csv.DictReader(fh)
        cols = [c.strip() for c in (reader.fieldnames or [])]
        key_col = next((c for c in ("file", "path", "source") if c in cols), None)
        if key_col is None or "identity" not in cols:
            raise DataError(f"labels file {path} needs columns 'identity' and one of file/path/source; got {cols}")
        out: dict[str, str] = {}
        for line_no, row in enumerate(reader, start=2):
            key, ident = (row.get(key_col) or "").strip(), (row.get("identity") or "").strip()
            if not key or not ident:
                raise DataError(f"labels file {path} line {line_no}: empty {key_col} or identity")
            out[key] = check_identity(ident, f"labels file {path} line {line_no}")
    return out


def label_for(labels: dict[str, str], source: str, rel: str) -> str:
    """The label of a file, matched by source, relative path, then bare name ('' when unlabelled)."""
    for key in (source, rel, Path(rel).as_posix()):
        if key in labels:
            return labels[key]
    return labels.get(Path(rel).name, "")


def assign_identities(
    clusters: np.ndarray, member_keys: list[str], face_labels: list[str], mode: str = "override"
) -> list[str]:
    """Identity id per face from cluster indices and per-face labels ('' = unlabelled).

    override: a labelled face always takes its label; unlabelled faces take the majority label of their cluster
    (ties: alphabetical), or the cluster's hash id when it holds no label. seed: every face of a cluster takes the
    cluster's majority label, or its hash id.
    """
    n = len(member_keys)
    out = [""] * n
    for c in np.unique(clusters):
        idx = np.flatnonzero(clusters == c).tolist()
        labs = Counter(face_labels[i] for i in idx if face_labels[i])
        majority = sorted(labs.items(), key=lambda kv: (-kv[1], kv[0]))[0][0] if labs else ""
        fallback = majority or cluster_id([member_keys[i] for i in idx])
        for i in idx:
            out[i] = face_labels[i] if (mode == "override" and face_labels[i]) else fallback
    return out


def pairwise_precision_recall(pred: list[str], truth: list[str]) -> tuple[float, float]:
    """Pairwise clustering scores: precision = same-predicted pairs that are truly the same person; recall = true
    same-person pairs predicted together. 1.0 when there are no pairs to judge."""
    n = len(pred)
    tp = fp = fn = 0
    for i in range(n):
        for j in range(i + 1, n):
            p, t = pred[i] == pred[j], truth[i] == truth[j]
            tp += p and t
            fp += p and not t
            fn += t and not p
    return (tp / (tp + fp) if tp + fp else 1.0, tp / (tp + fn) if tp + fn else 1.0)
