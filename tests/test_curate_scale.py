"""Grouping at scale: the kNN-graph clustering equals the dense average linkage where the graph is complete, and
40 k ArcFace-like faces group correctly in a child process whose address space the dense N x N matrix (12.8 GB
at 40 k) cannot fit."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from idforge.curate import group
from idforge.curate.knn import SimilarityGraph, index_description, knn_graph
from idforge.curate.synthetic import synthetic_embeddings
from tests.fixtures.paths import REPO


def _dense_average(emb: np.ndarray, threshold: float) -> np.ndarray:
    """The grouping as it was: scipy average linkage on the full N x N matrix (the reference)."""
    from scipy.cluster.hierarchy import fcluster, linkage
    from scipy.spatial.distance import squareform

    sim = np.clip(emb.astype(np.float64) @ emb.astype(np.float64).T, -1.0, 1.0)
    dist = 1.0 - sim
    np.fill_diagonal(dist, 0.0)
    raw = fcluster(linkage(squareform(np.maximum(dist, 0.0), checks=False), method="average"), t=1.0 - threshold,
                   criterion="distance")
    _, first, inv = np.unique(raw, return_index=True, return_inverse=True)
    rank = np.empty(len(first), np.int64)
    rank[np.argsort(first)] = np.arange(len(first))
    return rank[inv]


def _same_partition(a: np.ndarray, b: np.ndarray) -> bool:
    return group.pairwise_precision_recall(a, b) == (1.0, 1.0)


@pytest.mark.parametrize("within", [(0.5, 0.8), (0.2, 0.45)])  # clean people, and people that straddle the cut
def test_graph_average_linkage_equals_the_dense_one(within):
    emb, _ = synthetic_embeddings(600, photos_per_identity=6, dim=64, within=within, seed=3)
    for threshold in (0.3, 0.35, 0.45):
        got = group.cluster(emb, threshold, "average")
        assert got.tolist() == _dense_average(emb, threshold).tolist()


def test_sparse_average_linkage_equals_dense_on_a_complete_graph():
    emb, _ = synthetic_embeddings(120, photos_per_identity=5, dim=32, within=(0.3, 0.6), seed=5)
    n = len(emb)
    i, j = np.triu_indices(n, 1)
    sim = np.einsum("nd,nd->n", emb[i].astype(np.float64), emb[j].astype(np.float64))
    for threshold in (0.25, 0.4):
        # every pair present (edges below the cut too), so "missing = 0" never applies: it must equal scipy
        graph = SimilarityGraph(n, i, j, sim, threshold, "test")
        assert _same_partition(group.sparse_average_linkage(graph), _dense_average(emb, threshold))


def test_a_huge_component_takes_the_sparse_path(monkeypatch):
    emb, person = synthetic_embeddings(400, photos_per_identity=10, dim=64, seed=7)
    monkeypatch.setattr(group, "DENSE_COMPONENT_MAX", 5)  # every person's component is "huge"
    got = group.cluster(emb, 0.35, "average")
    assert group.pairwise_precision_recall(got, person) == (1.0, 1.0)


def test_pairwise_precision_recall_matches_the_pair_count():
    rng = np.random.default_rng(0)
    pred, truth = rng.integers(0, 7, 300), rng.integers(0, 5, 300)
    same_p = pred[:, None] == pred[None]
    same_t = truth[:, None] == truth[None]
    off = ~np.eye(300, dtype=bool)
    tp = (same_p & same_t & off).sum()
    p, r = group.pairwise_precision_recall(pred, truth)
    assert p == pytest.approx(tp / (same_p & off).sum()) and r == pytest.approx(tp / (same_t & off).sum())
    with pytest.raises(Exception, match="one prediction per truth label"):
        group.pairwise_precision_recall([1, 2], [1])


def test_index_type_follows_n_and_graph_keeps_only_pairs_above_threshold():
    assert index_description(1000)[0] == "Flat"
    assert index_description(1_000_000)[0] == "IVF2000,Flat"
    emb, person = synthetic_embeddings(200, photos_per_identity=10, dim=512, seed=1)
    g = knn_graph(emb, 0.35)
    assert (g.i < g.j).all() and (g.sim >= 0.35).all()
    sim = emb.astype(np.float64) @ emb.astype(np.float64).T
    want = {(a, b) for a, b in zip(*np.nonzero(np.triu(sim >= 0.35, 1)), strict=True)}
    assert set(zip(g.i.tolist(), g.j.tolist(), strict=True)) == want  # exact: every pair above, nothing else
    assert (person[g.i] == person[g.j]).all()  # at D = 512 strangers sit at 0 +/- 0.044: no chance edge


LIMIT_BYTES = 3 * 1024**3

CHILD = textwrap.dedent(f"""
    import json, resource, sys
    import numpy as np
    resource.setrlimit(resource.RLIMIT_AS, ({LIMIT_BYTES}, {LIMIT_BYTES}))
    from idforge.curate import group
    from idforge.curate.synthetic import synthetic_embeddings
    emb, person = synthetic_embeddings(40_000, photos_per_identity=20, dim=512, seed=11)
    if sys.argv[1] == "dense":
        try:
            emb.astype(np.float64) @ emb.astype(np.float64).T  # the old grouping's first step
            print(json.dumps({{"dense": "fitted"}}))
        except MemoryError:
            print(json.dumps({{"dense": "MemoryError"}}))
    else:
        clusters = group.cluster(emb, 0.35, "average")
        p, r = group.pairwise_precision_recall(clusters, person)
        merged = max(len(set(person[clusters == c])) for c in np.unique(clusters))
        print(json.dumps({{"p": p, "r": r, "most_people_in_a_cluster": merged}}))
""")


def _child(mode: str) -> dict:
    proc = subprocess.run([sys.executable, "-c", CHILD, mode], capture_output=True, text=True, cwd=REPO,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_forty_thousand_faces_group_within_a_memory_limit_the_dense_matrix_cannot_fit():
    assert _child("dense") == {"dense": "MemoryError"}  # the test is large enough to fail the old grouping
    got = _child("graph")
    assert got["p"] >= 0.95 and got["r"] >= 0.95 and got["most_people_in_a_cluster"] == 1, got
