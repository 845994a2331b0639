"""The similarity graph of dataset-level curation: each face's nearest neighbours by cosine, from FAISS.

Grouping and dedup only ever look at pairs of faces at least ``threshold`` similar, so they need a sparse graph
(memory O(N*k)), never the dense N x N matrix. The index type follows N: exact (``Flat``) up to
:data:`EXACT_MAX_FACES`, where the graph holds *every* pair above the threshold (up to ``k`` per face) and grouping
equals the dense computation; an inverted file (``IVF<nlist>,Flat``, nlist ~ 2 sqrt(N), ``nprobe`` lists searched)
above it, ~N log N in practice. Similarities of the found pairs are recomputed exactly (float64) so the graph does
not depend on the index's arithmetic.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

# Exact search up to this many faces: N^2 D flops stay under a few seconds per core, and the graph is exact.
EXACT_MAX_FACES = 20_000
DEFAULT_K = 64
QUERY_BLOCK = 16_384


@dataclass(frozen=True)
class SimilarityGraph:
    """Undirected edges ``i < j`` with cosine similarity ``sim`` >= the graph's ``threshold``; ``n`` nodes."""

    n: int
    i: np.ndarray  # (E,) int64
    j: np.ndarray  # (E,) int64
    sim: np.ndarray  # (E,) float64
    threshold: float
    index: str  # the FAISS index description it was built with

    def subgraph(self, keep: np.ndarray) -> SimilarityGraph:
        """The graph over the nodes ``keep`` (sorted int indices), renumbered 0..len(keep)-1."""
        new = np.full(self.n, -1, dtype=np.int64)
        new[keep] = np.arange(len(keep))
        ok = (new[self.i] >= 0) & (new[self.j] >= 0)
        return SimilarityGraph(len(keep), new[self.i[ok]], new[self.j[ok]], self.sim[ok], self.threshold, self.index)


def index_description(n: int) -> tuple[str, int]:
    """(FAISS index_factory string, nprobe) for ``n`` vectors."""
    if n <= EXACT_MAX_FACES:
        return "Flat", 0
    # nlist ~ 2 sqrt(N) keeps k-means training (on 40 points per list) and the coarse search small; a query then
    # scans nprobe/nlist of the faces: ~N^1.5 D / 250 flops in all, ~N log N in practice up to ~10^7 faces.
    nlist = int(2 * np.sqrt(n))
    return f"IVF{nlist},Flat", 8


def knn_graph(emb: np.ndarray, threshold: float, k: int = DEFAULT_K, slack: float = 1e-3) -> SimilarityGraph:
    """Each row's up-to-``k`` nearest neighbours with similarity >= ``threshold``, as an undirected graph.

    Args:
        emb: (N, D) float32 L2-normalised embeddings.
        threshold: keep pairs at least this similar (exact float64 cosine).
        k: neighbours searched per face (itself included); raise it for people with more than ``k`` photos in
            a graph that must be complete (near-identical photos of one person are nearest anyway).
        slack: how far below the threshold the index's float32 similarity may be and still be rechecked.
    """
    import faiss

    n = int(emb.shape[0])
    desc, nprobe = index_description(n)
    if n < 2:
        z = np.zeros(0, np.int64)
        return SimilarityGraph(n, z, z, np.zeros(0), threshold, desc)
    x = np.ascontiguousarray(emb, dtype=np.float32)
    index = faiss.index_factory(x.shape[1], desc, faiss.METRIC_INNER_PRODUCT)
    if not index.is_trained:
        # k-means on a fixed subsample: training cost independent of N, deterministic for a given input
        sample = np.random.default_rng(0).choice(n, size=min(n, 40 * index.nlist), replace=False)
        index.cp.seed = 1234
        index.train(x[np.sort(sample)])
        index.nprobe = nprobe
    index.add(x)
    kk = min(k, n)
    parts_i, parts_j = [], []
    for start in range(0, n, QUERY_BLOCK):
        sims, nbrs = index.search(x[start:start + QUERY_BLOCK], kk)
        rows = np.repeat(np.arange(start, start + sims.shape[0]), kk)
        cols, s = nbrs.ravel(), sims.ravel()
        ok = (cols >= 0) & (cols != rows) & (s >= threshold - slack)
        a, b = rows[ok], cols[ok]
        parts_i.append(np.minimum(a, b))
        parts_j.append(np.maximum(a, b))
    del index
    i = np.concatenate(parts_i)
    j = np.concatenate(parts_j)
    # each pair may be found from both ends: keep one
    pair = np.unique(i * n + j)
    i, j = pair // n, pair % n
    sim = np.empty(len(i), dtype=np.float64)
    step = 1 << 14  # pairs per block: two (step, D) float64 gathers, ~130 MB at D = 512
    for start in range(0, len(i), step):
        a, b = i[start:start + step], j[start:start + step]
        sim[start:start + len(a)] = np.einsum("nd,nd->n", x[a].astype(np.float64), x[b].astype(np.float64))
    sim = np.clip(sim, -1.0, 1.0)
    keep = sim >= threshold
    return SimilarityGraph(n, i[keep], j[keep], sim[keep], threshold, desc)
