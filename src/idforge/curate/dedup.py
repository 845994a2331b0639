"""Stage 6: near-duplicate removal: the same person in a near-identical image (re-encode, resize, light crop).

Two faces are duplicates when their identity embeddings are at least ``grouping threshold`` similar (same person)
AND either their aligned crops' perceptual hashes are within ``phash_max_distance`` bits or their embeddings are at
least ``embedding_min_similarity`` similar. Of each duplicate set the kept face is the largest, then the
lexicographically first source, so the choice does not depend on file order.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from idforge.curate.knn import SimilarityGraph


def phash(rgb: np.ndarray, hash_size: int = 8, highfreq_factor: int = 4) -> int:
    """64-bit DCT perceptual hash (the ``imagehash.phash`` algorithm): grey, resize to 32x32, DCT, keep the 8x8
    low frequencies, threshold at their median. Returns an int whose bits are the hash."""
    import cv2

    n = hash_size * highfreq_factor
    grey = cv2.cvtColor(rgb, cv2.COLOR_RGB2GRAY) if rgb.ndim == 3 else rgb
    small = cv2.resize(grey, (n, n), interpolation=cv2.INTER_AREA).astype(np.float32)
    low = cv2.dct(small)[:hash_size, :hash_size]
    bits = (low > np.median(low)).flatten()
    return int("".join("1" if b else "0" for b in bits), 2)


def hamming(a: int, b: int) -> int:
    return (a ^ b).bit_count()


def find_duplicates(
    emb: np.ndarray,
    hashes: list[int] | np.ndarray,
    order_keys: list[tuple],
    same_person: float,
    phash_max_distance: int,
    embedding_min_similarity: float,
    graph: SimilarityGraph | None = None,
) -> list[int]:
    """For each face, -1 if kept, else the index of the kept face it duplicates.

    Args:
        emb: (N, D) L2-normalised embeddings.
        hashes: N perceptual hashes.
        order_keys: N sort keys; the smallest key of a duplicate set is kept (e.g. (-size, source, face_index)).
        graph: the faces' similarity graph at ``same_person`` (``curate/knn.py``), built here when None. Only its
            edges are judged: memory O(N k), not the N x N pairs.
    """
    n = emb.shape[0]
    if n == 0:
        return []
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components

    if graph is None:
        from idforge.curate.knn import knn_graph

        graph = knn_graph(emb, same_person)
    ii, jj, s = graph.i, graph.j, graph.sim
    hash_arr = np.asarray([int(h) for h in hashes], dtype=np.uint64)
    xor = np.bitwise_xor(hash_arr[ii], hash_arr[jj])
    dist = np.unpackbits(xor.view(np.uint8).reshape(-1, 8), axis=1).sum(1)
    dup = (dist <= phash_max_distance) | (s >= embedding_min_similarity)
    close = coo_matrix((np.ones(int(dup.sum()), dtype=np.int8), (ii[dup], jj[dup])), shape=(n, n))
    _, comp = connected_components(close, directed=False)
    out = [-1] * n
    order = np.argsort(comp, kind="stable")
    bounds = np.flatnonzero(np.diff(comp[order])) + 1
    for members in np.split(order, bounds):
        if len(members) < 2:
            continue
        ranked = sorted(members.tolist(), key=lambda k: order_keys[k])
        for k in ranked[1:]:
            out[k] = ranked[0]
    return out
