"""The main job (`make demo`): the end-to-end pipeline on the bundled samples with embedded defaults.

kfp local runner, local Ray, SQLite MLflow in the working directory, the local DVC remote, and tiny random base
and CLIP models built on the spot unless real ones are given. A second run reuses every cached step.
"""

import logging
import time
from dataclasses import dataclass
from pathlib import Path

from idforge.errors import DataError

log = logging.getLogger(__name__)

TINY_BASE = Path(".cache/models/tiny-sd15")
TINY_CLIP = Path(".cache/models/tiny-clip")


@dataclass
class DemoResult:
    pipeline_root: Path
    report: Path | None
    mlflow_ui: str
    mlflow_runs: str
    tracking_uri: str
    seconds: float
    log_file: Path | None = None


def run_demo(
    repo_root: Path,
    model: str | None = None,
    clip: str | None = None,
    method: str = "infinite-id",
    config_files: list[Path] | None = None,
    overrides: list[str] | None = None,
    pipeline_root: Path = Path("outputs/kfp"),
    cache: bool = True,
    log_file: Path | None = None,
) -> DemoResult:
    from idforge.config import load_config
    from idforge.diffusion.tiny import make_tiny
    from idforge.io.samples import ensure_samples
    from idforge.track import experiment_url, tracking_uri, ui_command
    from pipelines.runner import find_outputs, pipeline_config_yaml, run_local

    repo_root = repo_root.resolve()
    if not (repo_root / "data" / "samples.dvc").is_file():
        raise DataError(f"{repo_root} is not the idforge repository (no data/samples.dvc): run `make demo` from it")
    started = time.time()
    samples = ensure_samples(repo_root)
    if model is None:
        base = repo_root / TINY_BASE
        if not (base / "model_index.json").is_file():
            make_tiny(base, kind="sd15")
        model = str(base)
    if clip is None:
        clip_dir = repo_root / TINY_CLIP
        if not (clip_dir / "config.json").is_file():
            make_tiny(clip_dir, kind="clip")
        clip = str(clip_dir)

    files = config_files if config_files is not None else [repo_root / "configs" / "demo.yaml"]
    cfg = load_config(files, [f"model.base={model}", f"model.clip={clip}", f"evaluate.clip_model={clip}",
                              *(overrides or [])])
    config_yaml = pipeline_config_yaml(cfg, repo_root)
    arguments = {
        "raw_uri": str(samples),
        "labels_uri": str(samples / "labels.csv"),
        "base_model": model,
        "method": method,
        "config_yaml": config_yaml,
        "gates_yaml": (repo_root / "configs" / "gates.yaml").read_text(),
        # Embedded default: local Ray with CPU workers (the pipeline's default asks for GPUs, as on a cluster).
        "workers": 1,
        "gpus_per_worker": 0.0,
    }
    root = (repo_root / pipeline_root).resolve()
    run = run_local("end-to-end", arguments, pipeline_root=root, enable_caching=cache,
                    log_file=(repo_root / log_file) if log_file is not None else None)
    outputs = find_outputs(run.pipeline_root)
    return DemoResult(
        pipeline_root=run.pipeline_root,
        report=outputs.get("report"),
        mlflow_ui=ui_command(cfg.tracking),
        mlflow_runs=experiment_url(cfg.tracking),
        tracking_uri=tracking_uri(cfg.tracking),
        seconds=time.time() - started,
        log_file=(repo_root / log_file) if log_file is not None else None,
    )
