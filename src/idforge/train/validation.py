"""Does identity flow? The held-out denoising loss with the right identity's condition vs a wrong one's.

For held-out images (never seen in training, not even as references) the training objective is evaluated with
fixed noise and timesteps, once conditioned on references of the image's own identity (matched)
and once on each other identity's references (mismatched). An adapter that uses its identity input denoises the
person's unseen photo better with the person's condition: ``gap = mismatched - matched > 0``. An adapter that
ignores its input has ``gap == 0`` exactly (same prediction either way), so a test on the gap cannot pass by luck
of initialisation; an untrained adapter (zero-initialised output paths) shows no gap either.

Datasets too small to hold photos out (a few photos per person) use the cross-photo variant instead: each training
photo conditioned on another photo of its person vs a photo of another person, with fresh noise.

The batch builders here read the prepared cache; the measurement (``identity_gap``) takes any pair of batches, so
the method tests use it on synthetic ones.
"""

from __future__ import annotations

import bisect
import hashlib
import logging
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import pandas as pd
    from torch import Tensor

    from idforge.methods.base import Method
    from idforge.methods.types import TrainBatch
    from idforge.train.dataset import PreparedDataset

log = logging.getLogger(__name__)


def split_holdout(index: pd.DataFrame, per_identity: int, seed: int = 0) -> tuple[list[str], list[str]]:
    """(train keys, held-out keys): ``per_identity`` images of every identity that has more than that many.

    The choice is a hash of (seed, key), so it is stable across runs, machines and dataset re-orderings.
    """
    train, held = [], []
    for _, grp in index.groupby("identity", sort=True):
        keys = sorted(grp["key"], key=lambda k: hashlib.sha256(f"{seed}:{k}".encode()).hexdigest())
        n = per_identity if len(keys) > per_identity else 0
        held += keys[:n]
        train += keys[n:]
    return train, held


def _refs(dataset: PreparedDataset, identity: str, n: int) -> list[int]:
    members = [int(r) for r in dataset.members[identity]]
    return [members[i % len(members)] for i in range(n)]


def heldout_batches(heldout: PreparedDataset, references: PreparedDataset, refs_per_item: int = 1,
                    max_pairs: int | None = None, seed: int = 0) -> tuple[TrainBatch, TrainBatch]:
    """(matched, mismatched) batches over every (held-out image, other identity) pair.

    Both share the targets' latents and captions; ``matched`` takes its references from the target's own identity
    in ``references``, ``mismatched`` from the other identity of the pair. Both datasets must come from one prepare.
    ``max_pairs`` keeps a seeded subset of the pairs, so a large dataset costs a fixed amount.
    """
    identities = sorted(references.members)
    rows = [int(r) for r in heldout.targets]
    # Each held-out row whose identity is in the references pairs with every other identity: counted, not listed.
    idents = [heldout.all_items.at[row, "identity"] for row in rows]
    counts = [len(identities) - 1 if ident in references.members else 0 for ident in idents]
    if not sum(counts):
        raise ValueError("no held-out image has an identity present in the references (and another identity to "
                         "compare with): nothing to measure")
    pairs = []  # (held-out row, its identity, the other identity)
    for i, local in sample_pair_indices(counts, max_pairs, seed):
        own = bisect.bisect_left(identities, idents[i])
        pairs.append((rows[i], idents[i], identities[local + (local >= own)]))
    matched = [_sample(heldout, references, row, _refs(references, ident, refs_per_item)) for row, ident, _ in pairs]
    mismatched = [_sample(heldout, references, row, _refs(references, other, refs_per_item))
                  for row, _, other in pairs]
    return pair_batches(matched, mismatched)


def pair_batches(matched: list[dict], mismatched: list[dict]) -> tuple[Any, Any]:
    """(matched, mismatched) as one ``TrainBatch`` each, or, when the targets come from several aspect buckets
    (``prepare.target: photo``: latents of different shapes), as lists with one batch per bucket, in the same
    order on both sides; ``identity_gap`` takes either."""
    from idforge.methods.types import TrainBatch
    from idforge.train.dataset import collate

    shapes = [tuple(s["latents"].shape) for s in matched]
    groups = sorted(set(shapes))
    if len(groups) == 1:
        return TrainBatch.from_dict(collate(matched)), TrainBatch.from_dict(collate(mismatched))
    pick = lambda samples, g: [s for s, sh in zip(samples, shapes, strict=True) if sh == g]  # noqa: E731
    return ([TrainBatch.from_dict(collate(pick(matched, g))) for g in groups],
            [TrainBatch.from_dict(collate(pick(mismatched, g))) for g in groups])


def sample_pair_indices(counts: list[int], max_items: int | None, seed: int) -> list[tuple[int, int]]:
    """A seeded subset of ``max_items`` (row, pair within row) indices, in enumeration order, or all of them.

    Row ``i`` owns ``counts[i]`` consecutive pairs of one virtual enumeration; only the drawn indices are decoded,
    so the cost is O(rows + max_items) however many pairs there are (enumerating them all ran out of memory at
    ~15 k identities). ``random.sample`` over a ``range`` draws the same indices as over a list of that length, so
    a seed picks the pairs that enumerating and sampling them picked.
    """
    import itertools
    import random

    starts = list(itertools.accumulate(counts, initial=0))
    total = starts[-1]
    if max_items is None or total <= max_items:
        chosen = range(total)
    else:
        chosen = sorted(random.Random(seed).sample(range(total), max_items))
    out = []
    for index in chosen:
        i = bisect.bisect_right(starts, index) - 1
        out.append((i, index - starts[i]))
    return out


def cross_photo_batches(dataset: PreparedDataset, refs_per_item: int = 1, max_pairs: int | None = None,
                        seed: int = 0) -> tuple[TrainBatch, TrainBatch]:
    """(matched, mismatched) batches where no image is its own reference, for datasets too small to hold out photos.

    Every image of an identity with at least two photos is conditioned once on each *other* photo of its identity
    (matched) and, for each such pair, on a photo of every other identity (mismatched); a reference photo is
    replicated ``refs_per_item`` times, as inference does. With fresh noise this measures whether the identity
    reaches the denoiser from a different photo of the person than the one being denoised. ``max_pairs`` keeps a
    seeded subset of the (image, reference, other identity) triples, so a large dataset costs a fixed amount.
    """
    identities = sorted(dataset.members)
    rows = [int(r) for r in dataset.targets]
    idents = [dataset.all_items.at[row, "identity"] for row in rows]
    # Row i has (photos of its identity - 1) own references x (identities - 1) others: counted, not listed.
    counts = [(len(dataset.members[ident]) - 1) * (len(identities) - 1) for ident in idents]
    if not sum(counts):
        raise ValueError("no identity has two photos and no other identity to compare with: nothing to measure")
    triples = []  # (target row, own reference row, other reference row)
    for i, local in sample_pair_indices(counts, max_pairs, seed):
        row, ident = rows[i], idents[i]
        k, o = divmod(local, len(identities) - 1)
        own_members = [int(r) for r in dataset.members[ident] if int(r) != row]
        pos = bisect.bisect_left(identities, ident)
        members = dataset.members[identities[o + (o >= pos)]]
        triples.append((row, own_members[k], int(members[k % len(members)])))
    matched = [dataset.compose(row, [ref] * refs_per_item, flip=False) for row, ref, _ in triples]
    mismatched = [dataset.compose(row, [other] * refs_per_item, flip=False) for row, _, other in triples]
    return pair_batches(matched, mismatched)


def _sample(heldout: PreparedDataset, references: PreparedDataset, row: int, ref_rows: list[int]) -> dict:
    """A held-out target with references taken from another dataset view of the same prepared cache."""
    target = heldout.compose(row, [row], flip=False)
    refs = references.compose(ref_rows[0], ref_rows, flip=False)
    for k in ("face_embeds", "clip_image_embeds", "clip_patch_tokens", "ref_pixels"):
        target[k] = refs[k]
    return target


# ----------------------------------------------------------------------------------------------------------------
# the measurement


def fix_noise(batch: TrainBatch, scheduler: Any, seed: int, t_min: int = 0, t_max: int | None = None) -> TrainBatch:
    """The batch with fixed noise and timesteps drawn from ``seed`` (for comparable held-out losses)."""
    import torch

    from idforge.methods.objective import sample_timesteps

    g = torch.Generator().manual_seed(seed)
    noise = torch.randn(batch.latents.shape, generator=g)
    t = sample_timesteps(scheduler, batch.batch_size, "cpu", g, t_min, t_max)
    return replace(batch, noise=noise.to(batch.latents.device), timesteps=t.to(batch.latents.device))


@dataclass(frozen=True)
class IdentityGap:
    """Mean held-out diffusion losses with the matching and the mismatched identity; gap = mismatch - match."""

    match: float
    mismatch: float

    @property
    def gap(self) -> float:
        return self.mismatch - self.match

    @property
    def relative_gap(self) -> float:
        return self.gap / max(self.match, 1e-12)


def held_out_loss(method: Method, pipe: Any, batch: TrainBatch, chunk: int = 16) -> float:
    """The diffusion part of the training objective (no face loss, no dropout), as a float.

    Evaluated without gradients, ``chunk`` samples at a time (the per-sample mean is the same), so a validation
    batch of any size fits in the memory of a training step.
    """
    import torch

    training = method.modules.training
    method.modules.eval()
    total = 0.0
    try:
        with torch.no_grad():
            for start in range(0, batch.batch_size, chunk):
                part = batch.rows(start, start + chunk)
                # Without target landmarks no face loss is computed: the measure is the denoising loss alone.
                out = method.training_loss(replace(part, target_kps=None), pipe)
                total += float(out.get("diffusion", out["loss"])) * part.batch_size
    finally:
        method.modules.train(training)
    return total / batch.batch_size


def identity_gap(method: Method, pipe: Any, batch_match: TrainBatch | list[TrainBatch],
                 batch_mismatch: TrainBatch | list[TrainBatch] | None = None,
                 repeats: int = 4, seed: int = 0, t_min: int = 0, t_max: int | None = None) -> IdentityGap:
    """Held-out loss of ``batch_match`` with its own identity vs with ``batch_mismatch``'s identity features.

    ``batch_mismatch`` only lends its identity fields (``TrainBatch.with_identity_of``); None = ``batch_match``'s
    identities rolled by one (sample i gets sample i+1's features; needs samples of different identities).
    Each repeat draws one fixed noise/timestep set shared by both conditions, so the gap measures identity alone.
    Lists of batches (one per aspect bucket, ``pair_batches``) give the per-sample mean over all of them.
    """
    import torch

    if isinstance(batch_match, list):
        others = batch_mismatch if batch_mismatch is not None else [None] * len(batch_match)
        gaps = [(identity_gap(method, pipe, a, b, repeats, seed, t_min, t_max), a.batch_size)
                for a, b in zip(batch_match, others, strict=True)]
        n = sum(size for _, size in gaps)
        return IdentityGap(sum(g.match * size for g, size in gaps) / n, sum(g.mismatch * size for g, size in gaps) / n)

    from idforge.methods.objective import training_scheduler

    if batch_mismatch is None:
        def roll(t: Tensor | None) -> Tensor | None:
            return None if t is None else torch.roll(t, 1, dims=0)

        batch_mismatch = replace(batch_match, **{n: roll(getattr(batch_match, n)) for n in (
            "face_embeds", "clip_image_embeds", "clip_patch_tokens", "ref_pixels", "identity")})
    mismatched = batch_match.with_identity_of(batch_mismatch)
    sched = training_scheduler(pipe)
    match = mismatch = 0.0
    for r in range(repeats):
        a = fix_noise(batch_match, sched, seed + r, t_min, t_max)
        b = replace(mismatched, noise=a.noise, timesteps=a.timesteps)
        match += held_out_loss(method, pipe, a)
        mismatch += held_out_loss(method, pipe, b)
    return IdentityGap(match / repeats, mismatch / repeats)
