"""Datasets over the ``prepare`` cache: identity-grouped samples in ``TrainBatch`` layout, sharded per worker.

An item is a target image plus N reference images of the same identity:
- IDAdapter: N different images of one identity (the target may be one of them: ``ref_includes_target``);
- Infinite-ID: N = 1, an ID image and a *different* photo of the same person as the target.

Every random choice of a sample (flip, caption, references) is a pure function of (seed, index, position in the
stream), so a resumed run sees exactly the batches the interrupted one would have seen.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from idforge.errors import DataError
from idforge.train.shards import ShardReader, is_sharded

if TYPE_CHECKING:
    import pandas as pd
    import torch

log = logging.getLogger(__name__)

# Below this total size the item files are kept in memory after the first read.
DEFAULT_MEMORY_CACHE_BYTES = 2 << 30


def read_prepared(prepared_dir: str | os.PathLike[str]) -> tuple[pd.DataFrame, dict[str, Any]]:
    """(index table, prepared.json) of a ``prepare`` output; ``DataError`` when it is not one."""
    import pandas as pd

    root = Path(prepared_dir)
    info_path, index_path = root / "prepared.json", root / "index.parquet"
    if not info_path.is_file() or not index_path.is_file():
        raise DataError(f"{root} is not a prepared dataset (no prepared.json/index.parquet): run "
                        "`idforge prepare --dataset CURATED --model MODEL --output DIR` first")
    return pd.read_parquet(index_path), json.loads(info_path.read_text())


def heal_hint(root: Path) -> str:
    """The fix for a damaged prepared item: prepare re-encodes exactly the items that fail its check."""
    return (f"run `idforge prepare` again with the same dataset, model and --output {root}: it re-encodes only "
            "the damaged items")


def verify_prepared(prepared_dir: str | os.PathLike[str]) -> None:
    """Check every item file of a prepared dataset (and its caption file) for truncation or a garbled header, before
    training starts: one header read per file.

    Raises:
        DataError: a file is missing or damaged (up to 5 named, with the count and the fix).
    """
    from idforge.train.item_file import damaged_items

    root = Path(prepared_dir)
    index, info = read_prepared(root)
    files = list(dict.fromkeys(index["file"])) + ([info["text_file"]] if info.get("text_file") else [])  # shards: once
    bad = damaged_items(root, files)
    if bad:
        named = "; ".join(f"{root / f}: {why}" for f, why in list(bad.items())[:5])
        more = f" (and {len(bad) - 5} more)" if len(bad) > 5 else ""
        raise DataError(f"{len(bad)} prepared item(s) of {root} are damaged: {named}{more}; {heal_hint(root)}")


class PreparedDataset:
    """A map-style torch dataset over prepared items (one entry per target image).

    ``ds[i]`` or ``ds[(i, position)]`` returns a dict of tensors (no batch dimension), the fields of
    ``idforge.methods.types.TrainBatch``:
        latents (4, h, w), input_ids (L,) [+ input_ids_2], text_embeds (L, D) [+ pooled_text_embeds (Dp,)],
        face_embeds (N, Dface), clip_image_embeds (N, Dclip), clip_patch_tokens (N, P, Dvis),
        ref_pixels (3, 112, 112) float in [0, 1] (the first reference), target_kps (5, 2),
        face_mask (1, h, w) (ones when curation wrote no mask), identity () long.
    ``position`` (the sample's place in the training stream) seeds the random choices; plain ``i`` uses 0.
    """

    def __init__(
        self,
        prepared_dir: str | os.PathLike[str],
        *,
        refs_per_item: int = 1,
        ref_includes_target: bool = False,
        flip_prob: float = 0.5,
        seed: int = 0,
        identities: Sequence[str] | None = None,
        keys: Sequence[str] | None = None,
        memory_cache_bytes: int = DEFAULT_MEMORY_CACHE_BYTES,
    ) -> None:
        from safetensors.torch import load_file

        if refs_per_item < 1:
            raise DataError(f"refs_per_item must be >= 1, got {refs_per_item}")
        self.root = Path(prepared_dir)
        index, self.info = read_prepared(self.root)
        # ``identities``/``keys`` restrict the whole universe: targets AND references (a held-out image must
        # never be seen in training, not even as a reference).
        if identities is not None:
            index = index[index["identity"].isin(list(identities))]
        if keys is not None:
            index = index[index["key"].isin(list(keys))]
        if index.empty:
            raise DataError(f"no prepared item of {self.root} matches the requested identities/keys")
        self.all_items = index.reset_index(drop=True)
        self.targets = self.all_items.index.to_numpy()
        self.refs_per_item = refs_per_item
        self.ref_includes_target = ref_includes_target
        self.flip_prob = flip_prob
        self.seed = seed
        self.members = {ident: grp.index.to_numpy() for ident, grp in self.all_items.groupby("identity", sort=True)}
        # identity ids index the full prepared list, so they agree between subsets of one prepared dataset
        self.identity_names = list(self.info.get("identities") or sorted(self.members))
        self.resolution = int(self.info["resolution"])
        text = load_file(str(self.root / self.info["text_file"]))
        self.text = {k: v.float() if v.is_floating_point() else v for k, v in text.items()}
        self.caption_rows: dict[str, list[int]] = {}  # the template captions of each class noun
        for i, cap in enumerate(self.info["captions"]):
            if cap.get("kind", "template") == "template":
                self.caption_rows.setdefault(cap["class_noun"], []).append(i)
        # a photo's own caption (captions.csv / sidecar .txt through curation), else -1: the templates
        own = self.all_items["caption_row"] if "caption_row" in self.all_items else None
        self.own_caption = own.to_numpy() if own is not None else np.full(len(self.all_items), -1)
        self.class_nouns = dict(zip(self.all_items["identity"], self.all_items["class_noun"], strict=True))
        # the shard layout (prepare.engine=ray) names a shard per item: each file counts once
        self._shards = ShardReader() if is_sharded(self.info) else None
        size = sum((self.root / f).stat().st_size for f in set(self.all_items["file"]))
        self._memory: dict[int, dict[str, torch.Tensor]] | None = {} if size <= memory_cache_bytes else None
        singles = [i for i, m in self.members.items() if len(m) < 2]
        if singles and not ref_includes_target:
            log.warning("%d identities have a single image: their target is also their reference (%s...)",
                        len(singles), ", ".join(singles[:3]))

    def __len__(self) -> int:
        return len(self.targets)

    def target_buckets(self) -> list[tuple[int, int]]:
        """(height, width) in pixels of each target (``ds[i]``): one square for ``prepare.target: aligned`` (and
        caches prepared before buckets were recorded), the aspect buckets for ``photo``."""
        if "bucket_h" not in self.all_items:
            return [(self.resolution, self.resolution)] * len(self.targets)
        hs, ws = self.all_items["bucket_h"].to_numpy(), self.all_items["bucket_w"].to_numpy()
        return [(int(hs[r]), int(ws[r])) for r in self.targets]

    def _target_width(self, row: int) -> int:
        return int(self.all_items.at[row, "bucket_w"]) if "bucket_w" in self.all_items else self.resolution

    # -- items ----------------------------------------------------------------------------------------------------

    def item(self, row: int) -> dict[str, torch.Tensor]:
        """The cached tensors of one item (row of the full index), float32/uint8 as stored (fp16 -> fp32)."""
        if self._memory is not None and row in self._memory:
            return self._memory[row]
        from safetensors.torch import load_file

        path = self.root / self.all_items.at[row, "file"]
        try:
            raw = (self._shards.read(path, self.all_items.at[row, "key"]) if self._shards is not None
                   else load_file(str(path)))
        except FileNotFoundError:
            raise DataError(f"prepared item {path} is missing: {heal_hint(self.root)}") from None
        except Exception as exc:  # noqa: BLE001 - safetensors' own error types vary by version (SafetensorError...)
            from idforge.train.item_file import safetensors_problem

            problem = safetensors_problem(path) or f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]}"
            raise DataError(f"prepared item {path} is unreadable ({problem}): {heal_hint(self.root)}") from None
        data = {k: v.float() if v.is_floating_point() else v for k, v in raw.items()}
        if self._memory is not None:
            self._memory[row] = data
        return data

    def _rng(self, target_row: int, position: int) -> np.random.Generator:
        return np.random.default_rng([self.seed, int(target_row), int(position)])

    def reference_rows(self, target_row: int, rng: np.random.Generator) -> list[int]:
        """N rows of the target's identity: without replacement when the identity has enough images."""
        members = self.members[self.all_items.at[target_row, "identity"]]
        pool = members if self.ref_includes_target else members[members != target_row]
        if len(pool) == 0:
            pool = members
        replace = len(pool) < self.refs_per_item
        return [int(r) for r in rng.choice(pool, size=self.refs_per_item, replace=replace)]

    def __getitem__(self, key: int | tuple[int, int]) -> dict[str, torch.Tensor]:
        index, position = (key if isinstance(key, tuple) else (key, 0))
        row = int(self.targets[int(index)])
        rng = self._rng(row, position)
        flip = "latents_flip" in self.item(row) and rng.random() < self.flip_prob
        noun = self.class_nouns[self.all_items.at[row, "identity"]]
        caption = int(self.own_caption[row]) if self.own_caption[row] >= 0 else int(rng.choice(self.caption_rows[noun]))
        return self.compose(row, self.reference_rows(row, rng), flip=flip, caption=caption)

    def compose(self, row: int, ref_rows: Sequence[int], flip: bool = False, caption: int | None = None
                ) -> dict[str, torch.Tensor]:
        """One sample from explicit choices: target ``row`` (of the full index), its reference rows, flip and
        caption (an index into ``info["captions"]``; None = the photo's own caption, else the identity's first
        template caption)."""

        target = self.item(row)
        if caption is None:
            own = int(self.own_caption[row])
            caption = own if own >= 0 else self.caption_rows[self.class_nouns[self.all_items.at[row, "identity"]]][0]
        refs = [self.item(int(r)) for r in ref_rows]
        return compose_sample(target, refs, flip=flip, width=self._target_width(row), text=self.text,
                              caption=caption,
                              identity=self.identity_names.index(self.all_items.at[row, "identity"]))

    def identity_refs(self, identity: str, n: int | None = None, rows: Sequence[int] | None = None):
        """``IdentityRefs`` of one identity (its first ``n`` images, or the given rows), for sampling/evaluation."""


        if rows is None:
            if identity not in self.members:
                raise DataError(f"identity {identity!r} is not in {self.root} (known: {sorted(self.members)[:5]}...)")
            rows = [int(r) for r in self.members[identity][: (n or len(self.members[identity]))]]
        return refs_of_items([self.item(int(r)) for r in rows], self.class_nouns[identity])


def compose_sample(target: dict[str, torch.Tensor], refs: Sequence[dict[str, torch.Tensor]], *, flip: bool,
                   width: int, text: dict[str, torch.Tensor], caption: int, identity: int) -> dict[str, torch.Tensor]:
    """One training sample (``TrainBatch``'s fields, no batch dimension) from a target item, its reference items,
    whether to mirror it (``width``: the target's width in pixels, for the landmarks) and a caption row of
    ``text``: the one layout every prepared-data reader produces."""
    import torch

    flip = flip and "latents_flip" in target
    latents = target["latents_flip"] if flip else target["latents"]
    h, w = latents.shape[-2:]
    kps = target["target_kps"]
    mask = target.get("face_mask")
    if flip:
        from idforge.train.prepare import flip_kps

        kps = flip_kps(kps, width)
        mask = None if mask is None else torch.flip(mask, dims=[-1])
    sample = {
        "latents": latents,
        "face_embeds": torch.stack([r["face_embed"] for r in refs]),
        "clip_image_embeds": torch.stack([r["clip_image_embed"] for r in refs]),
        "clip_patch_tokens": torch.stack([r["clip_patch_tokens"] for r in refs]),
        "ref_pixels": refs[0]["ref_pixels"].float() / 255.0,
        "target_kps": kps,
        "face_mask": mask if mask is not None else torch.ones(1, h, w),
        "identity": torch.tensor(int(identity)),
    }
    for name in ("input_ids", "input_ids_2", "text_embeds", "pooled_text_embeds"):
        if name in text:
            sample[name] = text[name][caption]
    return sample


def refs_of_items(items: Sequence[dict[str, torch.Tensor]], class_noun: str) -> Any:
    """``IdentityRefs`` of an identity's prepared items (for sampling and evaluation)."""
    import torch

    from idforge.methods.types import IdentityRefs

    return IdentityRefs(
        face_embeds=torch.stack([i["face_embed"] for i in items]),
        clip_image_embeds=torch.stack([i["clip_image_embed"] for i in items]),
        clip_patch_tokens=torch.stack([i["clip_patch_tokens"] for i in items]),
        face_crops=torch.stack([i["ref_pixels"].float() / 255.0 for i in items]),
        class_noun=class_noun,
    )


class ShardedStreamSampler:
    """An endless, deterministic stream of ``(index, position)`` keys for one data-parallel rank.

    The global stream is the concatenation of per-epoch permutations of ``range(n)`` (seeded by (seed, epoch));
    rank ``r`` of ``world_size`` takes global positions ``r, r + W, r + 2W, ...`` starting at its ``start``-th
    sample, so ranks see disjoint data each epoch and a resumed run continues exactly where it stopped.
    """

    def __init__(self, n: int, rank: int = 0, world_size: int = 1, seed: int = 0, start: int = 0) -> None:
        if n < 1:
            raise DataError("cannot sample from an empty dataset")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is outside world size {world_size}")
        self.n, self.rank, self.world_size, self.seed, self.start = n, rank, world_size, seed, start

    def _perm(self, epoch: int) -> np.ndarray:
        return np.random.default_rng([self.seed, 7919, epoch]).permutation(self.n)

    def __iter__(self) -> Iterator[tuple[int, int]]:
        position = self.start * self.world_size + self.rank
        epoch, perm = -1, None
        while True:
            e, offset = divmod(position, self.n)
            if e != epoch:
                epoch, perm = e, self._perm(e)
            yield int(perm[offset]), position
            position += self.world_size


def collate(samples: Sequence[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """Stack per-sample dicts into a batch dict (every sample has the same keys and shapes).

    Raises DataError naming the field when shapes differ (samples of different aspect buckets: batch them with
    ``bucket_sampler.BucketBatchSampler``, as ``make_loader`` does)."""
    import torch

    out = {}
    for k in samples[0]:
        shapes = {tuple(s[k].shape) for s in samples}
        if len(shapes) > 1:
            raise DataError(f"cannot batch samples whose {k!r} shapes differ ({sorted(shapes)}): they come from "
                            "different aspect buckets (prepare.target: photo); batch each bucket apart "
                            "(idforge.train.bucket_sampler)")
        out[k] = torch.stack([s[k] for s in samples])
    return out


def make_loader(dataset: PreparedDataset, batch_size: int, rank: int = 0, world_size: int = 1, seed: int = 0,
                start_sample: int = 0, num_workers: int = 0):
    """An endless DataLoader of collated batches for one rank (``start_sample``: samples this rank already used).

    With more than one aspect bucket (``prepare.target: photo``) each batch holds one bucket
    (``BucketBatchSampler``; ``start_sample`` must then be a whole number of batches, as the loop's steps are)."""
    from torch.utils.data import DataLoader

    buckets = dataset.target_buckets()
    if len(set(buckets)) > 1:
        from idforge.train.bucket_sampler import BucketBatchSampler

        if start_sample % batch_size:
            raise ValueError(f"start_sample {start_sample} is not a whole number of batches of {batch_size}")
        batches = BucketBatchSampler(buckets, batch_size, rank, world_size, seed, start_sample // batch_size)
        return DataLoader(dataset, batch_sampler=batches, collate_fn=collate, num_workers=num_workers,
                          persistent_workers=num_workers > 0, pin_memory=False)
    sampler = ShardedStreamSampler(len(dataset), rank, world_size, seed, start_sample)
    return DataLoader(dataset, batch_size=batch_size, sampler=sampler, collate_fn=collate, num_workers=num_workers,
                      persistent_workers=num_workers > 0, pin_memory=False)
