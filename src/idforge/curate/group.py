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
from typing import TYPE_CHECKING

import numpy as np

from idforge.errors import DataError
from idforge.io.identity import check_identity

if TYPE_CHECKING:
    from idforge.curate.knn import SimilarityGraph

DEFAULT_THRESHOLDS = {"insightface": 0.35, "opencv": 0.40}


def default_threshold(backend: str) -> float:
    return DEFAULT_THRESHOLDS[backend]


def cluster(emb: np.ndarray, threshold: float, linkage: str = "average",
            graph: SimilarityGraph | None = None) -> np.ndarray:
    """(N,) cluster index per row of (N, D) L2-normalised ``emb``.

    average: average-linkage agglomerative clustering cut where mean pairwise similarity drops below ``threshold``
    (a single chance match cannot merge two people). connected: connected components of the graph
    ``similarity >= threshold`` (single linkage). Cluster indices are in order of first appearance.

    Both work on the sparse similarity graph (``graph``, or one built here with ``curate/knn.py``): two faces
    with no path of edges >= ``threshold`` between them can never reach a mean similarity >= ``threshold``, so
    average linkage runs exactly (scipy, float64) inside each connected component of the graph, which equals
    the dense computation when the graph holds every pair above the threshold. Components larger than
    :data:`DENSE_COMPONENT_MAX` (chance chains at very large N) use :func:`sparse_average_linkage`.
    Memory O(N k + largest component^2).
    """
    n = emb.shape[0]
    if linkage not in ("average", "connected"):
        raise DataError(f"unknown linkage {linkage!r}; use 'average' or 'connected'")
    if n <= 1:
        return np.zeros(n, dtype=np.int64)
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components

    if graph is None:
        from idforge.curate.knn import knn_graph

        graph = knn_graph(emb, threshold)
    adj = coo_matrix((np.ones(len(graph.i), np.int8), (graph.i, graph.j)), shape=(n, n))
    _, comp = connected_components(adj, directed=False)
    if linkage == "connected":
        return _first_appearance(comp)
    raw = comp.astype(np.int64) * n  # component * n + local cluster: unique across components
    order = np.argsort(comp, kind="stable")
    bounds = np.flatnonzero(np.diff(comp[order])) + 1
    big = []
    for members in np.split(order, bounds):
        if len(members) < 2:
            continue
        if len(members) > DENSE_COMPONENT_MAX:
            big.append(members)
            continue
        sub = emb[members].astype(np.float64)
        raw[members] += _dense_average(sub, threshold)
    for members in big:
        raw[members] += sparse_average_linkage(graph.subgraph(members))
    return _first_appearance(raw)


DENSE_COMPONENT_MAX = 4096


def _first_appearance(raw: np.ndarray) -> np.ndarray:
    _, first, inverse = np.unique(raw, return_index=True, return_inverse=True)
    rank = np.empty(len(first), dtype=np.int64)
    rank[np.argsort(first, kind="stable")] = np.arange(len(first))
    return rank[inverse.ravel()]


def _dense_average(sub: np.ndarray, threshold: float) -> np.ndarray:
    """Average-linkage clusters (1-based) of the (m, D) float64 rows ``sub``, cut at mean similarity ``threshold``."""
    from scipy.cluster.hierarchy import fcluster
    from scipy.cluster.hierarchy import linkage as scipy_linkage
    from scipy.spatial.distance import squareform

    dist = 1.0 - np.clip(sub @ sub.T, -1.0, 1.0)
    np.fill_diagonal(dist, 0.0)
    z = scipy_linkage(squareform(np.maximum(dist, 0.0), checks=False), method="average")
    return fcluster(z, t=1.0 - threshold, criterion="distance").astype(np.int64)


def sparse_average_linkage(graph: SimilarityGraph) -> np.ndarray:
    """Average linkage on a sparse graph, pairs without an edge counting as similarity 0 (unrelated faces are ~0):
    repeatedly merge the two clusters of highest mean similarity while it is >= the graph's threshold.

    Returns (n,) cluster index per node. Time O(E log E) (lazy heap, fresh ids per merge); memory O(E).
    """
    import heapq

    n = graph.n
    size = [1] * n
    links: list[dict[int, float]] = [{} for _ in range(n)]  # cluster -> {neighbour cluster: summed similarity}
    for a, b, s in zip(graph.i.tolist(), graph.j.tolist(), graph.sim.tolist(), strict=True):
        links[a][b] = links[a].get(b, 0.0) + s
        links[b][a] = links[b].get(a, 0.0) + s
    heap = [(-s, a, b) for a in range(n) for b, s in links[a].items() if a < b]  # sizes are 1: sum = mean
    heapq.heapify(heap)
    members: list[list[int] | None] = [[k] for k in range(n)]
    while heap:
        neg, a, b = heapq.heappop(heap)
        if -neg < graph.threshold:
            break
        if members[a] is None or members[b] is None:
            continue  # one side merged since this entry was pushed (a new id replaced it)
        c = len(members)
        merged: dict[int, float] = {}
        for src in (a, b):
            for other, s in links[src].items():
                if other not in (a, b):
                    merged[other] = merged.get(other, 0.0) + s
                    del links[other][src]
            links[src] = {}
        links.append(merged)
        size.append(size[a] + size[b])
        members.append(members[a] + members[b])
        members[a] = members[b] = None
        for other, s in merged.items():
            links[other][c] = s
            heapq.heappush(heap, (-s / (size[c] * size[other]), other, c))
    out = np.empty(n, dtype=np.int64)
    for c, m in enumerate(members):
        if m is not None:
            out[m] = c
    return out


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
    clusters = np.asarray(clusters)
    order = np.argsort(clusters, kind="stable")
    bounds = np.flatnonzero(np.diff(clusters[order])) + 1
    for grp in np.split(order, bounds) if n else []:
        idx = grp.tolist()
        labs = Counter(face_labels[i] for i in idx if face_labels[i])
        majority = sorted(labs.items(), key=lambda kv: (-kv[1], kv[0]))[0][0] if labs else ""
        fallback = majority or cluster_id([member_keys[i] for i in idx])
        for i in idx:
            out[i] = face_labels[i] if (mode == "override" and face_labels[i]) else fallback
    return out


def _pairs(counts: np.ndarray) -> int:
    c = counts.astype(np.int64)
    return int((c * (c - 1) // 2).sum())


def pairwise_precision_recall(pred, truth) -> tuple[float, float]:
    """Pairwise clustering scores: precision = same-predicted pairs that are truly the same person; recall = true
    same-person pairs predicted together. 1.0 when there are no pairs to judge. O(N log N) from the counts of
    each predicted cluster, each true person and each (cluster, person) cell."""
    pred, truth = np.asarray(pred), np.asarray(truth)
    if pred.shape != truth.shape:
        raise DataError(f"precision/recall needs one prediction per truth label, got {pred.shape} and {truth.shape}")
    if pred.size == 0:
        return 1.0, 1.0
    _, p = np.unique(pred, return_inverse=True)
    _, t = np.unique(truth, return_inverse=True)
    p, t = p.ravel().astype(np.int64), t.ravel().astype(np.int64)
    tp = _pairs(np.unique(p * (int(t.max()) + 1) + t, return_counts=True)[1])
    pred_pairs = _pairs(np.bincount(p))
    true_pairs = _pairs(np.bincount(t))
    return (tp / pred_pairs if pred_pairs else 1.0, tp / true_pairs if true_pairs else 1.0)
