"""Stage 6: near-duplicate removal: the same person in a near-identical image (re-encode, resize, light crop).

Two faces are duplicates when their identity embeddings are at least ``grouping threshold`` similar (same person)
AND either their aligned crops' perceptual hashes are within ``phash_max_distance`` bits or their embeddings are at
least ``embedding_min_similarity`` similar. Of each duplicate set the kept face is the largest, then the
lexicographically first source, so the choice does not depend on file order.
"""

from __future__ import annotations

import numpy as np


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
    hashes: list[int],
    order_keys: list[tuple],
    same_person: float,
    phash_max_distance: int,
    embedding_min_similarity: float,
) -> list[int]:
    """For each face, -1 if kept, else the index of the kept face it duplicates.

    Args:
        emb: (N, D) L2-normalised embeddings.
        hashes: N perceptual hashes.
        order_keys: N sort keys; the smallest key of a duplicate set is kept (e.g. (-size, source, face_index)).
    """
    n = emb.shape[0]
    if n == 0:
        return []
    from scipy.sparse import coo_matrix

    # Blocks of rows keep memory at block x N instead of N x N; only same-person pairs get their hashes compared.
    rows_i, rows_j = [], []
    hash_arr = np.array(hashes, dtype=np.uint64)
    for start in range(0, n, 2048):
        sim = emb[start : start + 2048] @ emb.T
        ii, jj = np.nonzero(sim >= same_person)
        ii = ii + start
        keep = jj > ii
        ii, jj = ii[keep], jj[keep]
        if ii.size == 0:
            continue
        s = sim[ii - start, jj]
        xor = np.bitwise_xor(hash_arr[ii], hash_arr[jj])
        dist = np.unpackbits(xor.view(np.uint8).reshape(-1, 8), axis=1).sum(1)
        dup = (dist <= phash_max_distance) | (s >= embedding_min_similarity)
        rows_i.append(ii[dup])
        rows_j.append(jj[dup])
    ii = np.concatenate(rows_i) if rows_i else np.zeros(0, np.int64)
    jj = np.concatenate(rows_j) if rows_j else np.zeros(0, np.int64)
    close = coo_matrix((np.ones(ii.size, dtype=np.int8), (ii, jj)), shape=(n, n))
    from scipy.sparse.csgraph import connected_components

    _, comp = connected_components(close, directed=False)
    out = [-1] * n
    for c in np.unique(comp):
        members = sorted(np.flatnonzero(comp == c).tolist(), key=lambda k: order_keys[k])
        for k in members[1:]:
            out[k] = members[0]
    return out
