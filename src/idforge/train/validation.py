"""Does identity flow? The held-out denoising loss with the right identity's condition vs a wrong one's.

For held-out images (never seen in training, not even as references) the training objective is evaluated with
fixed noise and timesteps, once conditioned on references of the image's own identity (matched)
and once on each other identity's references (mismatched). An adapter that uses its identity input denoises the
person's unseen photo better with the person's condition: ``gap = mismatched - matched > 0``. An adapter that
ignores its input has ``gap == 0`` exactly (same prediction either way), so a test on the gap cannot pass by luck
of initialisation; an untrained adapter (zero-initialised output paths) shows no gap either.

Datasets too small to hold photos out (a few photos per person) use the cross-photo variant instead: each training
photo conditioned on another photo of its person vs a photo of another person, with fresh noise.
"""

from __future__ import annotations

import hashlib
import logging
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import pandas as pd

    from idforge.methods.base import TrainBatch
    from idforge.methods.testing import IdentityGap
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
    from idforge.methods.base import TrainBatch
    from idforge.train.dataset import collate

    identities = sorted(references.members)
    pairs = []  # (held-out row, its identity, the other identity)
    for row in (int(r) for r in heldout.targets):
        ident = heldout.all_items.at[row, "identity"]
        if ident in references.members:
            pairs += [(row, ident, other) for other in identities if other != ident]
    if not pairs:
        raise ValueError("no held-out image has an identity present in the references (and another identity to "
                         "compare with): nothing to measure")
    pairs = _subsample(pairs, max_pairs, seed)
    matched = [_sample(heldout, references, row, _refs(references, ident, refs_per_item)) for row, ident, _ in pairs]
    mismatched = [_sample(heldout, references, row, _refs(references, other, refs_per_item))
                  for row, _, other in pairs]
    return TrainBatch.from_dict(collate(matched)), TrainBatch.from_dict(collate(mismatched))


def _subsample(items: list, max_items: int | None, seed: int) -> list:
    """A seeded subset of ``max_items`` items in their original order, or all of them."""
    import random

    if max_items is None or len(items) <= max_items:
        return items
    return sorted(random.Random(seed).sample(items, max_items))


def cross_photo_batches(dataset: PreparedDataset, refs_per_item: int = 1, max_pairs: int | None = None,
                        seed: int = 0) -> tuple[TrainBatch, TrainBatch]:
    """(matched, mismatched) batches where no image is its own reference, for datasets too small to hold out photos.

    Every image of an identity with at least two photos is conditioned once on each *other* photo of its identity
    (matched) and, for each such pair, on a photo of every other identity (mismatched); a reference photo is
    replicated ``refs_per_item`` times, as inference does. With fresh noise this measures whether the identity
    reaches the denoiser from a different photo of the person than the one being denoised. ``max_pairs`` keeps a
    seeded subset of the (image, reference, other identity) triples, so a large dataset costs a fixed amount.
    """
    from idforge.methods.base import TrainBatch
    from idforge.train.dataset import collate

    identities = sorted(dataset.members)
    triples = []  # (target row, own reference row, other reference row)
    for row in (int(r) for r in dataset.targets):
        ident = dataset.all_items.at[row, "identity"]
        own = [int(r) for r in dataset.members[ident] if int(r) != row]
        for k, ref in enumerate(own):
            for other in identities:
                if other != ident:
                    members = dataset.members[other]
                    triples.append((row, ref, int(members[k % len(members)])))
    if not triples:
        raise ValueError("no identity has two photos and no other identity to compare with: nothing to measure")
    triples = _subsample(triples, max_pairs, seed)
    matched = [dataset.compose(row, [ref] * refs_per_item, flip=False) for row, ref, _ in triples]
    mismatched = [dataset.compose(row, [other] * refs_per_item, flip=False) for row, _, other in triples]
    return TrainBatch.from_dict(collate(matched)), TrainBatch.from_dict(collate(mismatched))


def identity_gap(method: Any, pipe: Any, heldout: PreparedDataset, references: PreparedDataset,
                 refs_per_item: int = 1, repeats: int = 8, seed: int = 0, max_pairs: int | None = None
                 ) -> IdentityGap:
    """Held-out diffusion loss of ``method`` (attached to ``pipe``) with matched vs mismatched identity.

    The measurement is ``idforge.methods.testing.identity_gap`` (fixed noise and timesteps shared by both
    conditions, ``repeats`` draws, no face loss); this function supplies the batches from the prepared cache.
    """
    from idforge.methods.testing import identity_gap as measure

    match, mismatch = heldout_batches(heldout, references, refs_per_item, max_pairs, seed)
    device = pipe.unet.device
    return measure(method, pipe, match.to(device), mismatch.to(device), repeats=repeats, seed=seed)


def _sample(heldout: PreparedDataset, references: PreparedDataset, row: int, ref_rows: list[int]) -> dict:
    """A held-out target with references taken from another dataset view of the same prepared cache."""
    target = heldout.compose(row, [row], flip=False)
    refs = references.compose(ref_rows[0], ref_rows, flip=False)
    for k in ("face_embeds", "clip_image_embeds", "clip_patch_tokens", "ref_pixels"):
        target[k] = refs[k]
    return target
