"""Batches that hold one aspect bucket each (``prepare.target: photo``): items of different buckets have latents of
different shapes and cannot be stacked.

The stream is deterministic like ``dataset.ShardedStreamSampler``'s: epoch ``e`` permutes each bucket's items
(seeded by (seed, e)), cuts them into batches of ``batch_size`` (a bucket's last batch may be smaller, so every
item is used exactly once per epoch), and shuffles the batches of all buckets together. The global stream is the
concatenation of the epochs' batches; rank ``r`` of ``world_size`` takes global batches ``r, r + W, ...`` starting
at its ``start``-th, so ranks see disjoint batches and a resumed run continues where it stopped.
"""

from __future__ import annotations

from collections.abc import Hashable, Iterator, Sequence

import numpy as np

from idforge.errors import DataError


class BucketBatchSampler:
    """An endless stream of batches (lists of ``(index, position)`` keys) for ``DataLoader(batch_sampler=...)``.

    Args:
        buckets: the bucket of each dataset index (any hashable, e.g. (height, width)).
        batch_size: items per batch (the last batch of a bucket in an epoch may hold fewer).
        rank, world_size: this data-parallel rank.
        seed: the stream's seed.
        start: batches this rank already consumed (resume).
    ``position`` of a key is ``global batch number * batch_size + place in the batch``: unique in the stream, it
    seeds the sample's random choices (``PreparedDataset.__getitem__``).
    """

    def __init__(self, buckets: Sequence[Hashable], batch_size: int, rank: int = 0, world_size: int = 1,
                 seed: int = 0, start: int = 0) -> None:
        if len(buckets) < 1:
            raise DataError("cannot sample from an empty dataset")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is outside world size {world_size}")
        if start < 0:
            raise ValueError(f"start must be >= 0, got {start}")
        keys = sorted(set(buckets), key=repr)  # a fixed order whatever the index order of the buckets
        where = {b: k for k, b in enumerate(keys)}
        ids = np.array([where[b] for b in buckets])
        self.members = [np.flatnonzero(ids == k) for k in range(len(keys))]
        self.bucket_keys = keys
        self.batch_size, self.rank, self.world_size, self.seed, self.start = batch_size, rank, world_size, seed, start
        self.batches_per_epoch = sum(-(-len(m) // batch_size) for m in self.members)

    def epoch_batches(self, epoch: int) -> list[np.ndarray]:
        """Every batch of one epoch, in stream order (all ranks together)."""
        rng = np.random.default_rng([self.seed, 7927, epoch])
        batches = []
        for m in self.members:
            perm = rng.permutation(m)
            batches += [perm[i:i + self.batch_size] for i in range(0, len(perm), self.batch_size)]
        return [batches[i] for i in rng.permutation(len(batches))]

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        g = self.start * self.world_size + self.rank  # global batch number
        epoch, batches = -1, []
        while True:
            e, offset = divmod(g, self.batches_per_epoch)
            if e != epoch:
                epoch, batches = e, self.epoch_batches(e)
            yield [(int(i), g * self.batch_size + j) for j, i in enumerate(batches[offset])]
            g += self.world_size
