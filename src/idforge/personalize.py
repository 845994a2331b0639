"""One person's photos -> images of that person: ``idforge personalize``.

Curates the photos as one identity, then either fine-tunes a per-identity method on them or conditions a trained
population adapter (a given artifact) on them, generates the prompts, and writes a contact grid and an HTML page.
Every step is the library's own (``curate_dataset``, ``finetune_identity``, ``generate_images``); this module only
checks that the photos are usable for the method and lays the outputs out::

    OUT/dataset/     the curated photos (manifest, crops, embeddings)
    OUT/model/       the per-identity artifact (per-identity methods)
    OUT/generated/   images + sidecars + index.parquet
    OUT/grid.png     every image, one row per prompt
    OUT/report.html  the prompts, the grid and the reference faces
"""

from __future__ import annotations

import html
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from idforge.errors import ConfigError, DataError

log = logging.getLogger(__name__)

#: photos a per-identity method needs at least (the papers: SeFi-IDE and ID-EA one image, TI/DreamBooth 3-5).
MIN_PHOTOS_DEFAULT = 1
MIN_PHOTOS = {"textual-inversion": 3, "dreambooth-lora": 3}


@dataclass
class PersonalizeResult:
    identity: str
    photos_used: int
    grid: Path
    report: Path
    generated: Path
    artifact: Path


def _reject_lines(manifest: Any) -> str:
    rejected = manifest[manifest["status"] != "accepted"]
    return "; ".join(f"{Path(r.source).name}: {r.reason}" for r in rejected.itertuples())


def check_one_person(manifest: Any, photos: Path, method: str) -> str:
    """The one identity of a curated personal photo set, or a ``DataError`` that says which photos and what to do.

    Raises:
        DataError: no face in any photo; the photos group into several people; fewer usable photos than ``method``
            needs.
    """
    accepted = manifest[(manifest["status"] == "accepted") & manifest["identity"].notna()]
    if accepted.empty:
        raise DataError(f"no usable face in any photo of {photos} ({_reject_lines(manifest)}): use clear, "
                        f"front-facing photos of one person, one face each")
    groups = accepted.groupby("identity")["source"].apply(lambda s: sorted(Path(x).name for x in s))
    if len(groups) > 1:
        listing = " | ".join(f"{', '.join(files)}" for files in groups)
        raise DataError(f"the photos in {photos} show {len(groups)} different people ({listing}): keep only one "
                        f"person's photos in the folder")
    need = MIN_PHOTOS.get(method, MIN_PHOTOS_DEFAULT)
    if len(accepted) < need:
        raise DataError(f"{method} needs at least {need} usable photos of the person, {photos} gave "
                        f"{len(accepted)} (rejected: {_reject_lines(manifest) or 'none'}): add more photos")
    return str(groups.index[0])


def _grid(images: list[Any], columns: int, cell: int = 256) -> Any:
    from PIL import Image

    rows = max(1, -(-len(images) // columns))
    sheet = Image.new("RGB", (columns * cell, rows * cell), "white")
    for i, img in enumerate(images):
        thumb = img.convert("RGB").resize((cell, cell))
        sheet.paste(thumb, ((i % columns) * cell, (i // columns) * cell))
    return sheet


def _report(path: Path, identity: str, method: str, prompts: list[str], seeds: list[int], grid: Path,
            refs: list[Path]) -> None:
    from idforge.io.atomic import atomic_write_text

    ref_imgs = "".join(f'<img src="{html.escape(os.path.relpath(r, path.parent))}" width="128">' for r in refs)
    items = "".join(f"<li>{html.escape(p)}</li>" for p in prompts)
    atomic_write_text(path, f"""<!doctype html><meta charset="utf-8"><title>idforge personalize: {html.escape(identity)}
</title><h1>{html.escape(identity)} with {html.escape(method)}</h1><h2>References</h2><p>{ref_imgs}</p>
<h2>Prompts (rows) x seeds {html.escape(str(seeds))} (columns)</h2><ol>{items}</ol>
<p><img src="{html.escape(grid.name)}" style="max-width:100%"></p>
""")


def personalize(
    photos: str | os.PathLike[str],
    method: str,
    prompts: list[str],
    output_dir: str | os.PathLike[str],
    cfg: Any,
    *,
    artifact: str | os.PathLike[str] | None = None,
    seeds: list[int] | None = None,
) -> PersonalizeResult:
    """Photos of one person -> images for ``prompts`` (each holding ``{}`` where the person goes, or not).

    Args:
        method: a registered method; per-identity methods fine-tune on the photos, population methods need
            ``artifact`` (a trained adapter: ``idforge train``'s ``method.safetensors``).
        cfg: the root ``IdforgeConfig`` (a preset already applied).
    Raises:
        ConfigError: an unknown method, a population method without an artifact, no prompt. DataError: the photos
            are unusable (see :func:`check_one_person`).
    """
    import yaml

    from idforge.curate.manifest import read_manifest
    from idforge.curate.run import curate_dataset
    from idforge.evaluate.generate import generate_images
    from idforge.methods.registry import get_method

    photos, out = Path(photos), Path(output_dir)
    regime = get_method(method).regime  # ConfigError for an unknown name
    if regime == "population" and artifact is None:
        raise ConfigError(f"{method} is a population adapter: pass --model PATH to a trained method.safetensors "
                          "(from `idforge train`), or pick a per-identity method (id-ea, sefi-ide, pidiff, ...)")
    if not prompts:
        raise ConfigError("pass at least one --prompt")
    if not photos.is_dir():
        raise DataError(f"--photos {photos} is not a folder of photos")
    seeds = list(seeds or [0, 1])
    # One person: keep a single photo as an identity too (one-image methods), and group without labels so
    # that a folder of several people is caught rather than merged.
    cfg = cfg.model_copy(deep=True)
    cfg.curate.min_images_per_identity = 1
    dataset = out / "dataset"
    curate_dataset(str(photos), str(dataset), cfg=cfg)
    identity = check_one_person(read_manifest(dataset), photos, method)
    accepted = read_manifest(dataset)
    accepted = accepted[(accepted["status"] == "accepted") & (accepted["identity"] == identity)]

    if regime == "per-identity":
        from idforge.train.per_identity import finetune_identity

        finetune_identity(method, identity, dataset, cfg.model.base, out / "model", cfg.finetune,
                          tracking=cfg.tracking)  # a failure raises, its error recorded beside the artifact
        artifact = out / "model"
    rendered = [p if "{}" in p else f"{p}, {{}}" for p in prompts]
    prompt_file = out / "prompts.yaml"
    prompt_file.parent.mkdir(parents=True, exist_ok=True)
    prompt_file.write_text(yaml.safe_dump({"name": "personalize", "source": "idforge personalize --prompt",
                                           "categories": {"prompts": rendered}}))
    gen = generate_images(method, artifact, dataset, prompt_file, seeds, cfg.model.base, out / "generated", cfg,
                          identities=[identity])
    from PIL import Image

    index = gen.index.sort_values(["prompt_index", "seed"], kind="stable")
    images = [Image.open(gen.output_dir / rel) for rel in index["image"]]
    grid_path = out / "grid.png"
    _grid(images, columns=len(seeds)).save(grid_path)
    refs = [dataset / r for r in accepted["aligned"].dropna()]
    report = out / "report.html"
    _report(report, identity, method, rendered, seeds, grid_path, refs)
    log.info("personalize: %d images of %s -> %s", len(images), identity, grid_path)
    return PersonalizeResult(identity=identity, photos_used=len(accepted), grid=grid_path, report=report,
                             generated=out / "generated", artifact=Path(artifact))
