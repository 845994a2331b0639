"""Evaluate a generation run: per-image metrics, aggregates, ``report.html``, MLflow; and compare runs.

``evaluate_generated(generated_dir, dataset_dir, output_dir, cfg)`` writes into ``output_dir``::

    metrics.parquet      one row per generated image: its recipe columns + every metric
    aggregates.parquet   level (method | identity | category), key, metric columns
    summary.json         the run-level numbers (what the registry gates read), MLflow run id
    report.html          the index page; identities/<id>.html pages and thumbs/ beside it (idforge.evaluate.report)

Scoring streams identity by identity (``_score_streaming``): the models load once, then each identity's generated
images and references are read, scored and dropped, so memory is one identity's images plus O(rows) metric
columns, however many identities there are. It logs the summary metrics, per-category metrics, a capped per-image
table (``evaluate.mlflow_table_rows``: lowest and highest id_sim rows; the full table is the metrics.parquet
artifact), image grids of the first ``evaluate.mlflow_grids`` identities and the report pages to an MLflow run.
``compare_runs(run_ids)`` puts the metrics of several evaluation runs side by side with deltas.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from idforge.errors import ConfigError, DataError
from idforge.io.atomic import atomic_path, atomic_write_text
from idforge.io.lock import holds_output_lock

if TYPE_CHECKING:  # pragma: no cover
    import pandas as pd

    from idforge.evaluate.config import EvaluateConfig

log = logging.getLogger(__name__)

# summary metrics drawn as per-category bars in the report, when present
BAR_METRICS = ("id_sim", "id_sim_excl_missing", "face_det_rate", "clip_t", "clip_i")


@dataclass
class EvaluationResult:
    output_dir: Path
    metrics: "pd.DataFrame"  # per image
    summary: dict[str, float]
    run_id: str | None = None
    report: Path | None = None
    aggregates: dict[str, "pd.DataFrame"] = field(default_factory=dict)

    @property
    def report_path(self) -> Path | None:
        return self.report

    def summary_text(self) -> str:
        keys = [k for k in ("id_sim", "id_sim_excl_missing", "face_det_rate", "clip_t", "clip_i") if k in self.summary]
        nums = ", ".join(f"{k}={self.summary[k]:.4f}" for k in keys)
        run = f", MLflow run {self.run_id}" if self.run_id else ""
        return f"{len(self.metrics)} images evaluated: {nums}{run}; report {self.report}"


def _configs(cfg: Any) -> tuple[Any, "EvaluateConfig"]:
    from idforge.config import IdforgeConfig
    from idforge.evaluate.config import EvaluateConfig

    cfg = cfg if cfg is not None else IdforgeConfig()
    ecfg = getattr(cfg, "evaluate", None)
    return cfg, ecfg if ecfg is not None else EvaluateConfig()


def _read_images(root: Path, rel_paths: Sequence[str]) -> list[np.ndarray]:
    from idforge.evaluate.refs import read_rgb

    return [read_rgb(root / p) for p in rel_paths]


def _image_sizes(root: Path, rel_paths: Sequence[str]) -> list[tuple[int, int]]:
    """(width, height) of each image from its header alone (no pixels decoded)."""
    from PIL import Image

    from idforge.evaluate.refs import read_rgb

    out = []
    for p in rel_paths:
        try:
            with Image.open(root / p) as im:
                out.append(im.size)
        except (OSError, ValueError):
            read_rgb(root / p)  # raises the DataError that names the file
            raise
    return out


def _score_streaming(index: "pd.DataFrame", gen_dir: Path, dataset_dir: Any, ref_paths: dict[str, list[Path]],
                     protocol: Any, primary: str, ecfg: "EvaluateConfig",
                     out: Path) -> tuple[dict[str, np.ndarray], dict[str, list[Path]], str | None]:
    """Every per-image metric column, computed identity by identity: only one identity's generated images and
    references are in memory at a time (the models are loaded once). Returns the columns (full length, index
    order, in the order the metrics define them), the report's reference thumbnails (files written under ``out``)
    and the perceptual metric's label (None when off).

    Each metric compares an image with its own identity's references, or with other images of its identity (the
    diversity metrics), so scoring identity by identity gives the same values as scoring all at once.
    """
    import pandas as pd

    from idforge.evaluate.refs import read_rgb

    m = protocol.metrics
    n = len(index)
    ident_col = index["identity"].astype(str)
    groups = ident_col.groupby(ident_col).indices  # identity -> row positions, sorted by identity
    cols: dict[str, np.ndarray] = {}
    device = _device(ecfg.device)
    backends = list(dict.fromkeys([primary, *protocol.face_backends])) if (m.identity or m.diversity or m.clip_i) \
        else []
    analyzers = {}
    if backends:
        from idforge.evaluate.metrics import identity_similarity, reference_embedding, scan_faces
        from idforge.evaluate.refs import align_references, references_prealigned
        from idforge.faces import load_analyzer

        prealigned = references_prealigned(dataset_dir if dataset_dir is not None else gen_dir / "refs")
        for backend in backends:
            model_dir = ecfg.insightface_model_dir if backend == "insightface" else None
            analyzers[backend] = load_analyzer(backend, model_dir=model_dir)
            cols[f"face_detected_{backend}"] = np.zeros(n, dtype=bool)
            cols[f"det_score_{backend}"] = np.full(n, np.nan, np.float32)
            cols[f"id_sim_{backend}"] = np.full(n, np.nan, np.float32)
    scorer = None
    if m.clip_t or m.clip_i:
        from idforge.evaluate.metrics import ClipScorer, clip_i, clip_t

        scorer = ClipScorer(ecfg.clip_model or protocol.clip_model, device=device, batch_size=ecfg.batch_size)
        if m.clip_t:
            cols["clip_t"] = np.full(n, np.nan, np.float32)
        if m.clip_i:
            cols["clip_i"] = np.full(n, np.nan, np.float32)
            cols["clip_i_on_face"] = np.zeros(n, dtype=bool)
    lp = None
    lpips_label = None
    if m.lpips or m.diversity:
        from idforge.evaluate.lpips import load_lpips
        from idforge.evaluate.metrics import lpips_to_references, pairwise_embedding_distance, pairwise_lpips, to_tensor

        lp = load_lpips(ecfg.lpips_backend or protocol.lpips_backend, device=device)
        lpips_label = lp.label
        # one resize for the whole run (the smallest image side, at most 256): read from the headers
        size = int(min(256, min(min(wh) for wh in _image_sizes(gen_dir, index["image"].tolist()))))
        ref_lp = np.full(n, np.nan, np.float32)
        div_lp = np.full(n, np.nan, np.float32)
        div_id = np.full(n, np.nan, np.float32)
    prompt_col = index["prompt_template"] if "prompt_template" in index else index["prompt"]
    eval_prompts = (index["prompt_eval"] if "prompt_eval" in index else index["prompt"]).astype(str)
    image_col = index["image"].tolist()
    ref_thumbs: dict[str, list[Path]] = {}
    any_ref_faces = False

    from tqdm.auto import tqdm

    for ident, idx in tqdm(groups.items(), desc="evaluate", unit="identity", disable=None):
        images = _read_images(gen_dir, [image_col[i] for i in idx])
        faces = None  # the primary backend's aligned references of this identity
        emb = kps = None
        if backends:
            ref_images = [read_rgb(p) for p in ref_paths[ident]]
            for backend in backends:
                f = align_references(ident, ref_images, analyzers[backend], [str(p) for p in ref_paths[ident]],
                                     prealigned)
                ref = reference_embedding(analyzers[backend].embed_aligned(f.crops112))
                scan = scan_faces(analyzers[backend], images, batch_size=ecfg.batch_size)
                cols[f"face_detected_{backend}"][idx] = scan.detected
                cols[f"det_score_{backend}"][idx] = scan.det_score
                cols[f"id_sim_{backend}"][idx] = identity_similarity(scan, ref)
                if backend == primary:
                    faces, emb, kps = f, scan.embeddings, scan.kps
            del ref_images
            any_ref_faces = True
            ref_thumbs[ident] = _save_ref_thumbs(out, ident, faces.crops512, ecfg.report_thumb_px)
        if scorer is not None:
            if m.clip_t:
                cols["clip_t"][idx] = clip_t(scorer, images, eval_prompts.iloc[idx].tolist())
            if m.clip_i:
                faces_or_images, on_face = _face_crops(images, kps)
                if faces is not None:
                    feats = scorer.image_features(list(faces.crops512))
                    ref_feat = feats.mean(0) / feats.mean(0).norm()
                    cols["clip_i"][idx] = clip_i(scorer, faces_or_images, ref_feat)
                cols["clip_i_on_face"][idx] = on_face
        if lp is not None:
            gen_t = to_tensor(images, size=size, device=device)
            if m.lpips and faces is not None:
                ref_t = to_tensor(list(faces.crops512[:4]), size=size, device=device)
                ref_lp[idx] = lpips_to_references(lp, gen_t, ref_t, ecfg.batch_size)
            if m.diversity:
                # image diversity within identity x prompt (seeds only differ); identity-embedding spread
                # (pose/expression) over all of the identity's images
                for _, sub in pd.Series(np.arange(len(idx))).groupby(prompt_col.iloc[idx].to_numpy()).groups.items():
                    sub = np.asarray(sub)
                    div_lp[idx[sub]] = pairwise_lpips(lp, gen_t[sub], ecfg.batch_size)
                if emb is not None:
                    div_id[idx] = pairwise_embedding_distance(emb)
            del gen_t
        del images, faces

    out_cols: dict[str, np.ndarray] = {}
    for backend in backends:
        for c in (f"face_detected_{backend}", f"det_score_{backend}", f"id_sim_{backend}"):
            out_cols[c] = cols[c]
    if backends:
        out_cols["id_sim"] = cols[f"id_sim_{primary}"]
        out_cols["face_detected"] = cols[f"face_detected_{primary}"]
    for c in ("clip_t", "clip_i", "clip_i_on_face"):
        if c in cols:
            out_cols[c] = cols[c]
    if lp is not None:
        if m.lpips and any_ref_faces:
            out_cols[lp.label] = ref_lp
        if m.diversity:
            out_cols[f"div_{lp.label}"] = div_lp
            if backends:
                out_cols["div_id"] = div_id
    return out_cols, ref_thumbs, lpips_label


def _save_ref_thumbs(out: Path, ident: str, crops: np.ndarray, px: int) -> list[Path]:
    from idforge.evaluate.report import save_thumbnail, thumbnail_dir

    folder = thumbnail_dir(out, ident)
    return [save_thumbnail(c, folder / f"ref{k}.jpg", px) for k, c in enumerate(crops)]


@holds_output_lock("evaluate")
def evaluate_generated(
    generated_dir: str | os.PathLike[str],
    dataset_dir: str | os.PathLike[str] | None,
    output_dir: str | os.PathLike[str],
    cfg: Any = None,
    *,
    run_name: str | None = None,
    parent_run_id: str | None = None,
) -> EvaluationResult:
    """Score every image of ``generated_dir`` (written by ``generate_images``) against the identities' references.

    ``dataset_dir``: the reference photos (curated dataset, identity folders...; see ``evaluate.refs``); None =
    the aligned reference crops the generation run saved under ``generated_dir/refs``.

    Raises:
        DataError: no index, unreadable images, an identity without references.
    """
    import pandas as pd

    from idforge.evaluate.generate import read_index
    from idforge.evaluate.protocol import load_protocol

    t0 = time.perf_counter()
    cfg, ecfg = _configs(cfg)
    protocol = load_protocol(ecfg.protocol)
    gen_dir = Path(generated_dir)
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    index = read_index(gen_dir)
    if index.empty:
        raise DataError(f"{gen_dir}/index.parquet lists no images: nothing to evaluate")
    run_info = _read_json(gen_dir / "generate.json")
    conditioning = run_info.get("conditioning_backend") or ecfg.conditioning_backend
    primary = protocol.primary_face_backend(conditioning)
    identities = sorted(index["identity"].astype(str).unique())
    ref_paths = _reference_paths(gen_dir, dataset_dir, identities)
    scores, ref_thumbs, lpips_label = _score_streaming(index, gen_dir, dataset_dir, ref_paths, protocol, primary,
                                                       ecfg, out)
    rows = index.copy()
    for col, values in scores.items():  # the columns in the order the metrics define them
        rows[col] = values
    summary: dict[str, float] = {}

    metric_cols = _metric_columns(rows, protocol.face_backends, lpips_label)
    aggregates = {
        "method": _aggregate(rows, "method", metric_cols),
        "identity": _aggregate(rows, "identity", metric_cols),
        "category": _aggregate(rows, "category", metric_cols),
    }
    overall = _aggregate(rows.assign(_all="all"), "_all", metric_cols)
    summary = {k: float(v) for k, v in overall.iloc[0].items()}
    summary["num_images"] = float(len(rows))

    with atomic_path(out / "metrics.parquet") as tmp:
        rows.to_parquet(tmp, index=False)
    agg_long = pd.concat(
        [df.reset_index().rename(columns={level: "key"}).assign(level=level) for level, df in aggregates.items()],
        ignore_index=True,
    )
    with atomic_path(out / "aggregates.parquet") as tmp:
        agg_long.to_parquet(tmp, index=False)

    info = {
        "method": ", ".join(sorted(rows["method"].astype(str).unique())),
        "protocol": f"{protocol.name} ({protocol.fingerprint()})",
        "generated": str(gen_dir),
        "references": str(dataset_dir) if dataset_dir is not None else str(gen_dir / "refs"),
        "base model": run_info.get("base_model", ""),
        "conditioning face model": conditioning,
        "headline ID backend": primary,
        "CLIP model": ecfg.clip_model or protocol.clip_model,
        "perceptual metric": lpips_label or "off",
        "images": len(rows),
    }
    result = EvaluationResult(out, rows, summary, aggregates=aggregates)
    tcfg = getattr(cfg, "tracking", None)
    if ecfg.log_to_mlflow and (tcfg is None or tcfg.enabled):
        _log_to_mlflow(result, cfg, run_name or f"evaluate-{info['method']}", parent_run_id, info, protocol,
                       ref_thumbs, ecfg, gen_dir)
    else:
        result.report = _write_report(result, info, ref_thumbs, None, ecfg, gen_dir)
    _write_summary(result, info)
    log.info("%s (%.1f s)", result.summary_text(), time.perf_counter() - t0)
    return result


def _read_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


def _device(name: str) -> str:
    from idforge.evaluate.metrics import resolve_device

    return resolve_device(name)


def _reference_paths(gen_dir: Path, dataset_dir: Any, identities: list[str]) -> dict[str, list[Path]]:
    from idforge.evaluate.refs import discover_references

    if dataset_dir is not None:
        return discover_references(dataset_dir, identities)
    if not (gen_dir / "refs").is_dir():
        raise DataError(f"no references: pass --dataset, or keep {gen_dir}/refs that generate wrote")
    return discover_references(gen_dir / "refs", identities)


def _face_crops(images: list[np.ndarray], kps: np.ndarray | None) -> tuple[list[np.ndarray], np.ndarray]:
    """FFHQ-aligned face crops (512) where a face was found, the whole image otherwise; and the on-face mask."""
    from idforge.faces.align import align_face

    out, on_face = [], np.zeros(len(images), dtype=bool)
    for i, img in enumerate(images):
        if kps is not None and not np.isnan(kps[i]).any():
            out.append(align_face(img, kps[i], size=512, border="reflect"))
            on_face[i] = True
        else:
            out.append(img)
    return out, on_face


def _metric_columns(rows: "pd.DataFrame", backends: Sequence[str], lpips_label: str | None) -> list[str]:
    cols = []
    for b in backends:
        cols += [f"id_sim_{b}"]
    cols += ["id_sim", "clip_t", "clip_i"]
    if lpips_label:
        cols += [lpips_label, f"div_{lpips_label}"]
    cols += ["div_id"]
    return [c for c in cols if c in rows.columns]


def _aggregate(rows: "pd.DataFrame", by: str, metric_cols: list[str]) -> "pd.DataFrame":
    """Per group: identity metrics as the papers report them (detection rate; mean with misses = 0; mean over
    detected faces); every other metric as the mean over images where it is defined."""
    import pandas as pd

    from idforge.evaluate.metrics import summarize_identity

    out = {}
    for key, grp in rows.groupby(by, sort=True):
        rec: dict[str, float] = {"images": float(len(grp))}
        for c in metric_cols:
            vals = grp[c].to_numpy(dtype=np.float64)
            if c.startswith("id_sim"):
                s = summarize_identity(vals)
                suffix = c[len("id_sim"):]  # "" or "_opencv"
                rec[f"face_det_rate{suffix}"] = s["face_det_rate"]
                rec[f"id_sim{suffix}"] = s["id_sim"]
                rec[f"id_sim{suffix}_excl_missing"] = s["id_sim_excl_missing"]
            else:
                rec[c] = float(np.nanmean(vals)) if np.isfinite(vals).any() else float("nan")
        out[key] = rec
    df = pd.DataFrame.from_dict(out, orient="index")
    df.index.name = by
    return df


def _write_report(result: EvaluationResult, info: dict[str, Any], ref_thumbs: dict[str, list[Path]],
                  mlflow_url: str | None, ecfg: "EvaluateConfig", gen_dir: Path) -> Path:
    from idforge.evaluate.report import ReportData, write_report

    refs: dict[str, list[Any]] = dict(ref_thumbs)
    if not refs and (gen_dir / "refs").is_dir():  # identity metrics off: show the crops generate saved
        from idforge.evaluate.refs import discover_references

        refs = {i: list(ps) for i, ps in discover_references(gen_dir / "refs").items()}
    summary = result.aggregates["method"]
    data = ReportData(
        title=f"idforge evaluation: {info['method']}",
        summary=summary,
        per_category=result.aggregates["category"],
        per_identity=result.aggregates["identity"],
        images=result.metrics,
        images_root=gen_dir,
        references=refs,
        info=info,
        mlflow_url=mlflow_url,
        bar_metrics=[c for c in BAR_METRICS if c in summary.columns],
        thumb_px=ecfg.report_thumb_px,
    )
    path = write_report(result.output_dir / "report.html", data)
    result.report = path
    return path


def capped_table(metrics: "pd.DataFrame", rows: int, by: str = "id_sim") -> "pd.DataFrame":
    """At most ``rows`` rows of the per-image table for MLflow's table view: the lowest ``rows // 2`` and the
    highest ``rows - rows // 2`` by ``by`` (NaN counts as lowest; the first rows when ``by`` is absent), in index
    order, object columns as text. The whole table is the metrics.parquet artifact."""
    if len(metrics) > rows:
        if by in metrics.columns:
            order = metrics[by].to_numpy(dtype=np.float64)
            order = np.argsort(np.where(np.isnan(order), -np.inf, order), kind="stable")
            keep = np.sort(np.concatenate([order[: rows // 2], order[len(order) - (rows - rows // 2):]]))
            metrics = metrics.iloc[keep]
        else:
            metrics = metrics.iloc[:rows]
    table = metrics.copy()
    for c in table.columns:
        if table[c].dtype == object:
            table[c] = table[c].astype(str)
    return table


def run_url(tracking_uri: str, experiment_id: str, run_id: str) -> str:
    """Browser link to a run: the server's own URL, or the default ``mlflow ui`` address for a local store."""
    base = tracking_uri.rstrip("/") if tracking_uri.startswith(("http://", "https://")) else "http://127.0.0.1:5000"
    return f"{base}/#/experiments/{experiment_id}/runs/{run_id}"


def _log_to_mlflow(result: EvaluationResult, cfg: Any, run_name: str, parent_run_id: str | None,
                   info: dict[str, Any], protocol: Any, ref_thumbs: dict[str, list[Path]],
                   ecfg: "EvaluateConfig", gen_dir: Path) -> None:
    import mlflow

    from idforge import track

    tags = {"idforge.stage": "evaluate", "idforge.method": info["method"], "idforge.protocol": protocol.name}
    with track.start_run(getattr(cfg, "tracking", None), run_name=run_name, parent_run_id=parent_run_id,
                         tags=tags) as run:
        if run is None:
            _write_report(result, info, ref_thumbs, None, ecfg, gen_dir)
            return
        result.run_id = run.info.run_id
        track.log_dataset(info["references"], context="evaluation", name="references")
        mlflow.log_params({
            "method": info["method"][:500],
            "protocol": protocol.name,
            "protocol_fingerprint": protocol.fingerprint(),
            "generated_dir": str(gen_dir)[:500],
            "references": str(info["references"])[:500],
            "base_model": str(info["base model"])[:500],
            "clip_model": str(info["CLIP model"])[:500],
            "headline_id_backend": info["headline ID backend"],
            "perceptual_metric": info["perceptual metric"],
        })
        track.log_metrics({k: v for k, v in result.summary.items() if np.isfinite(v)})
        for cat, rec in result.aggregates["category"].iterrows():
            track.log_metrics({f"cat.{cat}.{k}": v for k, v in rec.items() if np.isfinite(v)})
        # the per-image table, browsable in the MLflow UI: capped (the UI and the store choke on 10^6 rows); the
        # whole table is the metrics.parquet artifact below
        if ecfg.mlflow_table_rows:
            mlflow.log_table(capped_table(result.metrics, ecfg.mlflow_table_rows), artifact_file="metrics_table.json")
        # image grids of the first identities only: the report pages show every identity
        for k, (ident, grp) in enumerate(result.metrics.groupby("identity", sort=True)):
            if k >= ecfg.mlflow_grids:
                break
            grp = grp.sort_values(["category", "prompt_index", "seed"])
            cols = grp["seed"].nunique()
            rows = int(np.ceil(len(grp) / cols))
            imgs = _read_images(gen_dir, grp["image"].tolist())
            track.log_image_grid(imgs, rows, cols, f"grids/{ident}.png")
        url = run_url(mlflow.get_tracking_uri(), run.info.experiment_id, run.info.run_id)
        report = _write_report(result, info, ref_thumbs, url, ecfg, gen_dir)
        _write_summary(result, info)
        track.log_artifact(result.output_dir / "metrics.parquet")
        track.log_artifact(result.output_dir / "aggregates.parquet")
        track.log_artifact(result.output_dir / "summary.json")
        if (gen_dir / "generate.json").is_file():
            track.log_artifact(gen_dir / "generate.json")  # what `idforge register` rebuilds the model from
        track.log_html(report)
        from idforge.evaluate.report import PAGES_DIR, THUMBS_DIR

        for sub in (PAGES_DIR, THUMBS_DIR):  # the identity pages and their thumbnails, beside report.html
            if (result.output_dir / sub).is_dir():
                track.log_artifacts(result.output_dir / sub, sub)


def _write_summary(result: EvaluationResult, info: dict[str, Any]) -> None:
    data = {
        "metrics": {k: (None if not np.isfinite(v) else v) for k, v in result.summary.items()},
        "run_id": result.run_id,
        "info": {k: str(v) for k, v in info.items()},
    }
    atomic_write_text(result.output_dir / "summary.json", json.dumps(data, indent=1, sort_keys=True))


# ----------------------------------------------------------------------------------------------------------------
# comparing runs


def compare_runs(
    run_ids: Sequence[str], cfg: Any = None, output: str | os.PathLike[str] | None = None,
    metrics: Sequence[str] | None = None,
) -> "pd.DataFrame":
    """Side-by-side metrics of evaluation runs: one row per metric, one column per run, and ``delta <run>``
    columns (that run minus the first). Written to ``output`` (``.csv``, ``.md`` or ``.parquet``) when given.

    Raises:
        ConfigError: fewer than two runs, or a run id that does not exist at the tracking URI.
    """
    import pandas as pd
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    from idforge import track

    if len(run_ids) < 2:
        raise ConfigError(f"compare needs at least two run ids, got {len(run_ids)}")
    uri = track.tracking_uri(getattr(cfg, "tracking", None))
    client = MlflowClient(tracking_uri=uri)
    cols: dict[str, dict[str, float]] = {}
    for rid in run_ids:
        try:
            run = client.get_run(rid)
        except MlflowException:
            raise ConfigError(f"MLflow run {rid!r} does not exist at {uri}") from None
        label = f"{run.data.params.get('method', run.info.run_name)} [{rid[:8]}]"
        cols[label] = {k: v for k, v in run.data.metrics.items() if not k.startswith("cat.")}
    df = pd.DataFrame(cols)
    if metrics:
        df = df.reindex(list(metrics))
    df = df.sort_index()
    first = df.columns[0]
    for c in list(df.columns[1:]):
        df[f"delta {c}"] = df[c] - df[first]
    df.index.name = "metric"
    if output is not None:
        _write_table(df, Path(output))
    return df


def _write_table(df: "pd.DataFrame", path: Path) -> None:
    suffix = path.suffix.lower()
    with atomic_path(path) as tmp:
        if suffix == ".parquet":
            df.to_parquet(tmp)
        elif suffix == ".md":
            tmp.write_text(df.to_markdown() if _has_tabulate() else df.to_string())
        else:
            df.to_csv(tmp)


def _has_tabulate() -> bool:
    import importlib.util

    return importlib.util.find_spec("tabulate") is not None
