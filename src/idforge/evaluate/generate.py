"""The evaluation protocol's generation driver: prompts x identities x seeds -> images + their exact recipe.

Works for any method that implements ``idforge.methods.base.Method``: it loads the method from its artifact,
builds each identity's condition from the reference photos (``method.identity_condition``), and calls
``method.generate`` in batches of prompts, one seed at a time (the shared sampler derives all randomness from the
seed, so an image depends on its prompt and seed only, not on what else shares the batch).

Output directory::

    generate.json                  run record: method, artifact(s), base model, protocol, sampling, resolved config
    index.parquet                  one row per image (the sidecars, collected)
    images/<identity>/<category>/p<NN>_s<seed>.png  (+ .json sidecar: the exact recipe of that image)
    refs/<identity>/<k>.png        the reference faces the condition was built from (512 FFHQ-aligned crops)

Resumable: an image whose PNG and sidecar exist with the same recipe hash is skipped; a changed recipe (other
artifact, sampling, prompt) regenerates it.

Engines (``generate.engine``): the work is cut into units (an identity's prompts for some of its seeds, with its
reference photo paths) that an :class:`IdentityGenerator` draws, loading the pipeline, face model and CLIP once.
``local`` runs one in this process; ``ray`` runs one per Ray actor (``idforge.evaluate.generate_ray``). Both write
the same files, byte for byte; an identity's references are aligned when its unit runs, so memory holds one
identity's faces at a time.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from idforge.errors import ConfigError, DataError
from idforge.io.atomic import atomic_path, atomic_write_text
from idforge.io.identity import identity_path
from idforge.io.lock import holds_output_lock
from idforge.io.space import check_free_space, count_files, png_bytes

if TYPE_CHECKING:  # pragma: no cover
    import pandas as pd

    from idforge.evaluate.config import GenerateConfig

log = logging.getLogger(__name__)

ARTIFACT_NAMES = ("method.safetensors", "learned_embeds.safetensors")
ARTIFACT_META = "artifact.json"  # written beside a per-identity checkpoint by the per-identity training loop


# ----------------------------------------------------------------------------------------------------------------
# small helpers


def file_sha256(path: str | os.PathLike[str]) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _json_hash(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _slug(s: str) -> str:
    out = "".join(c if c.isalnum() or c in "-_." else "-" for c in s).strip("-.")
    return out or "x"


def save_png(path: Path, image: Any) -> None:
    """Write a PIL image or uint8 array as PNG atomically."""
    from PIL import Image

    im = image if isinstance(image, Image.Image) else Image.fromarray(np.asarray(image, dtype=np.uint8))
    with atomic_path(path) as tmp:
        im.save(tmp, format="PNG")


def resolve_artifact(artifact: str | os.PathLike[str] | None, identity: str) -> Path | None:
    """The method checkpoint for ``identity``.

    ``artifact`` is one checkpoint file (population methods: every identity); or a directory of per-identity
    artifacts as ``idforge finetune --all`` writes them (``<dir>/<identity>/artifact.json`` naming the weights file,
    or ``<dir>/<identity>/method.safetensors``, or ``<dir>/<identity>.safetensors``); or one identity's artifact
    directory (``artifact.json`` / ``method.safetensors`` directly inside). None = no artifact.
    """
    if artifact is None:
        return None
    a = Path(artifact)
    if a.is_file():
        return a
    if a.is_dir():
        for d in (identity_path(a, identity), a):
            meta = d / ARTIFACT_META
            if meta.is_file():
                try:
                    return d / json.loads(meta.read_text())["file"]
                except (ValueError, KeyError):
                    raise DataError(f"{meta} is not a valid artifact record (needs a 'file' key)") from None
            for n in ARTIFACT_NAMES:
                if (d / n).is_file():
                    return d / n
            if d is a and identity_path(a, identity, ".safetensors").is_file():
                return identity_path(a, identity, ".safetensors")
        raise DataError(
            f"artifact directory {a} has no checkpoint for identity {identity!r} (looked for "
            f"{identity}/{ARTIFACT_META}, {identity}/method.safetensors, {identity}.safetensors, method.safetensors)"
        )
    raise DataError(f"method artifact {a} does not exist; pass the checkpoint (or artifact directory) training wrote")


def artifact_identities(artifact: str | os.PathLike[str] | None) -> list[str] | None:
    """The identities a per-identity artifact directory holds (``<dir>/<identity>/`` with a checkpoint), sorted;
    None when ``artifact`` is not such a directory (one checkpoint serves every identity)."""
    if artifact is None or not Path(artifact).is_dir():
        return None
    a = Path(artifact)
    if (a / ARTIFACT_META).is_file() or any((a / n).is_file() for n in ARTIFACT_NAMES):
        return None
    found = sorted(d.name for d in a.iterdir() if d.is_dir() and not d.name.startswith(("_", "."))
                   and ((d / ARTIFACT_META).is_file() or any((d / n).is_file() for n in ARTIFACT_NAMES)))
    return found or None


def artifact_record(path: Path | None) -> dict[str, Any]:
    """The ``artifact.json`` beside a per-identity checkpoint (class noun, identity phrase...), or {}."""
    if path is None or not (path.parent / ARTIFACT_META).is_file():
        return {}
    try:
        return json.loads((path.parent / ARTIFACT_META).read_text())
    except ValueError:
        return {}


def ensure_method_registered(name: str | None) -> None:
    """Make ``name`` resolvable by the registry: per-identity methods register when their modules import."""
    from idforge.methods.registry import available_methods

    if name is None or name in available_methods():
        return
    try:
        from idforge.methods.personalized import register_per_identity_methods
    except ImportError:
        return
    register_per_identity_methods()


def device_of(name: str) -> str:
    from idforge.evaluate.metrics import resolve_device

    return resolve_device(name)


# ----------------------------------------------------------------------------------------------------------------
# the driver


@dataclass
class GenerationResult:
    output_dir: Path
    index: "pd.DataFrame"
    generated: int
    skipped: int
    seconds: float

    @property
    def count(self) -> int:
        """Images in the index (generated now or before)."""
        return len(self.index)

    def summary(self) -> str:
        n_ids = self.index["identity"].nunique() if len(self.index) else 0
        return (
            f"{len(self.index)} images ({self.generated} generated, {self.skipped} already there) for {n_ids} "
            f"identities in {self.seconds:.1f} s -> {self.output_dir}"
        )


class _MethodCache:
    """Keeps one attached method; swaps it when an identity needs another checkpoint."""

    def __init__(self, method_name: str | None, pipe: Any, overrides: dict[str, Any]) -> None:
        self.method_name = method_name
        self.pipe = pipe
        self.overrides = overrides
        self.path: Path | None = None
        self.method: Any = None

    def get(self, path: Path | None) -> Any:
        from idforge.methods.checkpoint import load_method, read_method_metadata
        from idforge.methods.registry import get_method

        if self.method is not None and path == self.path:
            return self.method
        if self.method is not None:
            self.method.detach(self.pipe)
        if path is None:
            if not self.method_name:
                raise ConfigError("generate: give --method or an --artifact to load the method from")
            ensure_method_registered(self.method_name)
            method = get_method(self.method_name, **self.overrides)
            method.attach(self.pipe)
        else:
            meta = read_method_metadata(path)
            if self.method_name and meta["method"] != self.method_name:
                raise ConfigError(
                    f"artifact {path} holds method {meta['method']!r}, not {self.method_name!r}; "
                    "pass the matching --method (or leave it out)"
                )
            ensure_method_registered(meta["method"])
            method = load_method(path, self.pipe, **self.overrides)
        method.eval()
        self.method, self.path = method, path
        return method


@dataclass(frozen=True)
class WorkUnit:
    """One identity's images for some of the seeds: the engines' unit of work. Within it the driver's batching is
    the local engine's (the prompts still to do of one seed, in ``batch_size`` chunks), so a unit's PNGs are the same
    bytes whichever engine or worker draws them."""

    identity: str
    references: tuple[str, ...]  # the identity's reference photo files
    seeds: tuple[int, ...]


@dataclass
class UnitOutcome:
    identity: str
    artifact: dict[str, Any]  # {"path", "sha256", "method"} as generate.json records it
    generated: int
    skipped: int


@dataclass
class GenerationPlan:
    """What every worker needs to draw any unit (small and picklable: no images, no models)."""

    cfg: Any  # the root IdforgeConfig
    method_name: str | None
    artifact: str | None
    base_model: str
    output_dir: str
    pset_path: str
    categories: list[str]
    prompts_per_category: int | None
    sampling: dict[str, Any]
    overrides: dict[str, Any]
    prealigned: bool

    @property
    def gcfg(self) -> "GenerateConfig":
        return _configs(self.cfg)[1]


class IdentityGenerator:
    """A worker: loads the conditioning face model, CLIP and the pipeline once, then draws unit after unit (the
    local engine runs one in-process; the Ray engine one per actor). ``close`` hands the pipeline back clean."""

    def __init__(self, plan: GenerationPlan, pipe: Any = None) -> None:
        from idforge.diffusion.loading import load_pipeline
        from idforge.faces import load_analyzer
        from idforge.io.prompts import load_prompt_set

        self.plan = plan
        cfg, gcfg = plan.cfg, plan.gcfg
        self.pset = load_prompt_set(plan.pset_path)
        self.analyzer = load_analyzer(gcfg.conditioning_backend, model_dir=gcfg.face_model_dir)
        self.clip_id = gcfg.clip_model or cfg.model.clip
        self.clip = _load_clip_for_refs(self.clip_id, gcfg.clip_features, cfg.model.local_files_only)
        if pipe is None:
            pipe = load_pipeline(plan.base_model, kind=cfg.model.kind, dtype=cfg.model.dtype,
                                 device=device_of(gcfg.device), local_files_only=cfg.model.local_files_only,
                                 revision=cfg.model.revision)
        self.pipe = pipe
        self.methods = _MethodCache(plan.method_name, pipe, plan.overrides)

    def close(self) -> None:
        if self.methods.method is not None:
            self.methods.method.detach(self.pipe)
            self.methods.method = self.methods.path = None

    def run(self, unit: WorkUnit, progress: Any = None) -> UnitOutcome:
        """Draw the unit's images that are not already there (same recipe hash); ``progress(n)`` per image."""
        from idforge.evaluate.refs import PREALIGNED_MARKER, align_references, identity_refs, read_rgb
        from idforge.train.clip_features import check_clip_features, read_beside

        plan, gcfg, pipe = self.plan, self.plan.gcfg, self.pipe
        tick = progress or (lambda n: None)
        out = Path(plan.output_dir)
        ident = unit.identity
        # one identity's faces at a time: memory stays one identity's references, however many identities
        ref = align_references(ident, [read_rgb(p) for p in unit.references], self.analyzer, list(unit.references),
                               plan.prealigned)
        art_path = resolve_artifact(plan.artifact, ident)
        if self.clip is not None:
            check_clip_features(read_beside(art_path), self.clip_id, gcfg.clip_hidden_layer, gcfg.clip_crop,
                                f"method artifact {art_path}")
        method = self.methods.get(art_path)
        art = {"path": str(art_path) if art_path else None,
               "sha256": file_sha256(art_path) if art_path else None, "method": method.name}
        for k, crop in enumerate(ref.crops512):
            p = out / "refs" / _slug(ident) / f"{k}.png"
            if not p.exists():
                save_png(p, crop)
        (out / "refs" / PREALIGNED_MARKER).touch()
        subject = _subject(method, gcfg.subject, artifact_record(art_path).get("class_noun", gcfg.class_noun))
        prompts = [
            rp for rp in self.pset.items(subject)
            if rp.category in plan.categories and (plan.prompts_per_category is None
                                                   or rp.index < plan.prompts_per_category)
        ]
        generated = skipped = 0
        cond = None
        for seed in unit.seeds:
            todo = []
            for rp in prompts:
                recipe = _recipe(method.name, art, plan.base_model, plan.overrides, plan.sampling, rp, seed, ident,
                                 ref.sources, subject, gcfg.subject)
                png = out / "images" / _slug(ident) / _slug(rp.category) / f"p{rp.index:02d}_s{seed}.png"
                if _is_done(png, recipe["recipe_hash"]):
                    skipped += 1
                    tick(1)
                    continue
                todo.append((rp, png, recipe))
            if not todo:
                continue
            if cond is None:
                refs_obj = identity_refs(ref, self.analyzer, self.clip, clip_crop=gcfg.clip_crop,
                                         clip_hidden_layer=gcfg.clip_hidden_layer, class_noun=gcfg.class_noun)
                cond = method.identity_condition(refs_obj.to(pipe.device), pipe)
            for i in range(0, len(todo), gcfg.batch_size):
                chunk = todo[i : i + gcfg.batch_size]
                images = method.generate(pipe, [rp.text for rp, _, _ in chunk], cond, seeds=[seed],
                                         batch_size=gcfg.batch_size, **plan.sampling)
                if len(images) != len(chunk):
                    raise RuntimeError(f"method {method.name!r} returned {len(images)} images for {len(chunk)} "
                                       "prompts x 1 seed; Method.generate must return one per (prompt, seed)")
                for (_rp, png, recipe), img in zip(chunk, images, strict=True):
                    save_png(png, img)
                    recipe["image"] = png.relative_to(out).as_posix()
                    recipe["width"], recipe["height"] = img.size
                    atomic_write_text(png.with_suffix(".json"), json.dumps(recipe, indent=1, sort_keys=True))
                    generated += 1
                    tick(1)
        return UnitOutcome(ident, art, generated, skipped)


def images_per_identity(plan: GenerationPlan, seeds: Sequence[int], pset: Any) -> int:
    per_seed = sum(min(len(pset.categories[c]), plan.prompts_per_category or 10**9) for c in plan.categories)
    return per_seed * len(seeds)


@holds_output_lock("generate")
def generate_images(
    method_name: str | None,
    artifact: str | os.PathLike[str] | None,
    refs: str | os.PathLike[str],
    prompt_set: str | os.PathLike[str] | None,
    seeds: Sequence[int] | None,
    base_model: str | None,
    output_dir: str | os.PathLike[str],
    cfg: Any = None,
    *,
    identities: Sequence[str] | None = None,
    method_overrides: dict[str, Any] | None = None,
    pipe: Any = None,
) -> GenerationResult:
    """Generate every (identity, prompt, seed) of the protocol with one method.

    Args:
        method_name: registry name (``get_method``); None = the one named in the artifact.
        artifact: method checkpoint (file, or a directory of per-identity checkpoints; see ``resolve_artifact``).
        refs: reference photos (curated dataset dir, folder of identity folders, folder of photos, one photo).
        prompt_set: prompt-set YAML; None = the protocol's (``cfg.generate.protocol``).
        seeds: seeds, one image per seed per prompt; None = the protocol's.
        base_model: base pipeline id or directory; None = ``cfg.model.base``.
        output_dir: where the images, sidecars and index go (see module docstring).
        cfg: the root ``IdforgeConfig`` (its ``generate``, ``model`` and ``curate`` sections are read);
            ``generate.engine`` picks where the images are drawn (this process, or Ray actors).
        identities: subset of the references' identities.
        method_overrides: inference-time method config (e.g. Infinite-ID switches), recorded per image.
        pipe: an already loaded pipeline to reuse (must be ``base_model``'s; local engine only).
    """
    from idforge.evaluate.protocol import load_protocol
    from idforge.evaluate.refs import discover_references, references_prealigned
    from idforge.io.prompts import load_prompt_set

    t0 = time.perf_counter()
    cfg, gcfg = _configs(cfg)
    protocol = load_protocol(gcfg.protocol)
    pset_path = Path(prompt_set) if prompt_set is not None else protocol.prompt_set_path()
    pset = load_prompt_set(pset_path)
    seeds = [int(s) for s in (seeds if seeds is not None else protocol.seeds_used)]
    if not seeds or len(set(seeds)) != len(seeds):
        raise ConfigError(f"generate: seeds must be a non-empty list of distinct integers, got {seeds}")
    categories = protocol.categories or list(pset.categories)
    unknown = [c for c in categories if c not in pset.categories]
    if unknown:
        raise ConfigError(f"protocol {protocol.name!r} names categories {unknown} that prompt set {pset_path} lacks; "
                          f"it has: {', '.join(pset.categories)}")
    base_model = base_model or cfg.model.base
    sampling = {
        "num_inference_steps": gcfg.num_inference_steps or protocol.sampling.num_inference_steps,
        "guidance_scale": gcfg.guidance_scale if gcfg.guidance_scale is not None else protocol.sampling.guidance_scale,
        "height": gcfg.height or protocol.sampling.height,
        "width": gcfg.width or protocol.sampling.width,
        "negative_prompt": gcfg.negative_prompt,
        "scheduler": gcfg.scheduler,
    }
    overrides = dict(method_overrides or {})
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)

    if identities is None:
        identities = artifact_identities(artifact)
    ref_paths = discover_references(refs, identities)
    plan = GenerationPlan(
        cfg=cfg, method_name=method_name, artifact=str(artifact) if artifact is not None else None,
        base_model=str(base_model), output_dir=str(out), pset_path=str(pset_path), categories=list(categories),
        prompts_per_category=protocol.prompts_per_category, sampling=sampling, overrides=overrides,
        prealigned=references_prealigned(refs),
    )
    units = [WorkUnit(ident, tuple(str(p) for p in paths), tuple(seeds)) for ident, paths in ref_paths.items()]
    total = images_per_identity(plan, seeds, pset) * len(units)
    check_free_space(out, max(total - count_files(out / "images", "*.png"), 0),  # what a resumed run still writes
                     png_bytes(sampling["height"] or 1024, sampling["width"] or 1024), "generate", unit="images")
    outcomes = _run_units(plan, units, total, pipe)
    artifacts = {u.identity: u.artifact for u in sorted(outcomes, key=lambda o: o.identity)}
    artifacts = {ident: artifacts[ident] for ident in ref_paths if ident in artifacts}  # the references' order
    generated = sum(o.generated for o in outcomes)
    skipped = sum(o.skipped for o in outcomes)

    index = collect_index(out)
    run = {
        "method": method_name or (next(iter(artifacts.values()))["method"] if artifacts else None),
        "artifacts": artifacts,
        "base_model": str(base_model),
        "refs": str(refs),
        "identities": list(ref_paths),
        "prompt_set": str(pset_path),
        "prompt_set_name": pset.name,
        "seeds": seeds,
        "sampling": sampling,
        "method_overrides": overrides,
        "protocol": {"name": protocol.name, "fingerprint": protocol.fingerprint(), "source": protocol.source},
        "conditioning_backend": gcfg.conditioning_backend,
        "config": cfg.model_dump(mode="json") if hasattr(cfg, "model_dump") else {},
    }
    atomic_write_text(out / "generate.json", json.dumps(run, indent=1, sort_keys=True, default=str))
    result = GenerationResult(out, index, generated, skipped, time.perf_counter() - t0)
    log.info("%s", result.summary())
    return result


def _run_units(plan: GenerationPlan, units: list[WorkUnit], total: int, pipe: Any) -> list[UnitOutcome]:
    """Draw every unit on the configured engine; the outcomes in any order."""
    from tqdm.auto import tqdm

    bar = tqdm(total=total, desc="generate", unit="img", disable=None)
    try:
        if plan.gcfg.engine == "ray":
            from idforge.evaluate.generate_ray import run_units_on_ray

            if pipe is not None:
                log.info("generate.engine=ray: the given pipeline is not used; each actor loads %s", plan.base_model)
            return run_units_on_ray(plan, units, progress=bar.update)
        worker = IdentityGenerator(plan, pipe=pipe)
        try:
            return [worker.run(u, progress=bar.update) for u in units]
        finally:
            worker.close()
    finally:
        bar.close()


def _configs(cfg: Any) -> tuple[Any, "GenerateConfig"]:
    from idforge.config import IdforgeConfig
    from idforge.evaluate.config import GenerateConfig

    cfg = cfg if cfg is not None else IdforgeConfig()
    gcfg = getattr(cfg, "generate", None)
    return cfg, gcfg if gcfg is not None else GenerateConfig()


def _subject(method: Any, default: str, class_noun: str = "person") -> str:
    """The words that stand for the identity in a prompt. A method whose identity lives in the prompt (learned
    pseudo-words) says which through ``identity_phrase(class_noun)``; the others get the plain phrase
    ("a person"), the class noun of which IDAdapter's textual injection finds."""
    hook = getattr(method, "identity_phrase", None)
    return str(hook(class_noun)) if callable(hook) else default


def _recipe(method: str, art: dict[str, Any], base_model: str, overrides: dict[str, Any], sampling: dict[str, Any],
            rp: Any, seed: int, ident: str, ref_sources: list[str], subject: str, plain_subject: str) -> dict[str, Any]:
    recipe = {
        "method": method,
        "artifact": art["path"],
        "artifact_sha256": art["sha256"],
        "base_model": str(base_model),
        "method_overrides": overrides,
        "sampling": sampling,
        "identity": ident,
        "references": ref_sources,
        "category": rp.category,
        "prompt_index": rp.index,
        "prompt_template": rp.template,
        "prompt": rp.text,
        # CLIP-T scores the prompt as a person would read it: pseudo-tokens replaced by the plain subject
        "prompt_eval": rp.template.replace("{}", plain_subject),
        "subject": subject,
        "seed": int(seed),
    }
    recipe["recipe_hash"] = _json_hash(recipe)
    return recipe


def _is_done(png: Path, recipe_hash: str) -> bool:
    side = png.with_suffix(".json")
    if not (png.is_file() and side.is_file()):
        return False
    try:
        return json.loads(side.read_text()).get("recipe_hash") == recipe_hash
    except (OSError, ValueError):
        return False


def _load_clip_for_refs(clip_id: str, mode: str, local_files_only: bool) -> Any:
    """The CLIP model the reference features are computed with; "auto" tolerates its absence (methods that need
    CLIP features then raise naming the missing field), "on" requires it, "off" skips it."""
    if mode == "off":
        return None
    from idforge.diffusion.loading import load_clip
    from idforge.errors import ModelNotFoundError

    try:
        return load_clip(clip_id, local_files_only=local_files_only)
    except ModelNotFoundError as exc:
        if mode == "on":
            raise
        log.warning("CLIP features for the references are off: %s", exc)
        return None


def collect_index(output_dir: str | os.PathLike[str]) -> "pd.DataFrame":
    """Gather every sidecar under ``images/`` into ``index.parquet`` (written atomically) and return it."""
    import pandas as pd

    out = Path(output_dir)
    rows = []
    for side in sorted((out / "images").rglob("*.json")):
        rec = json.loads(side.read_text())
        if (out / rec.get("image", "")).is_file():
            rows.append(rec)
    df = pd.DataFrame(rows)
    if len(df):
        for col in ("sampling", "method_overrides", "references"):
            df[col] = df[col].map(lambda v: json.dumps(v, sort_keys=True))
        df = df.sort_values(["identity", "category", "prompt_index", "seed"], kind="stable").reset_index(drop=True)
    with atomic_path(out / "index.parquet") as tmp:
        df.to_parquet(tmp, index=False)
    return df


def read_index(generated_dir: str | os.PathLike[str]) -> "pd.DataFrame":
    import pandas as pd

    p = Path(generated_dir) / "index.parquet"
    if not p.is_file():
        raise DataError(f"{generated_dir} has no index.parquet: run `idforge generate --output {generated_dir}` first")
    return pd.read_parquet(p)
