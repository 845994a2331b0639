"""The ``idforge`` command. A thin shell: parse arguments, load the config, call the library.

Every import of a heavy library happens inside a command body so ``idforge --help`` stays instant.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path
from typing import Annotated, Optional

import typer

from idforge.io.locations import local_input, local_output, local_output_file, parse_location
from idforge.io.uri import is_s3_uri

app = typer.Typer(
    name="idforge",
    help="Identity-preserving text-to-image: curate photos, train identity methods, evaluate, register.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
models_app = typer.Typer(help="Base models: build tiny offline test models, check what loads.", no_args_is_help=True)
pipeline_app = typer.Typer(help="Kubeflow pipelines: compile, run locally, submit, follow.", no_args_is_help=True)
config_app = typer.Typer(help="Inspect the resolved configuration.", no_args_is_help=True)
methods_app = typer.Typer(help="Identity methods: list them, show their config keys, inspect a checkpoint.",
                          no_args_is_help=True)
app.add_typer(models_app, name="models")
app.add_typer(pipeline_app, name="pipeline")
app.add_typer(config_app, name="config")
app.add_typer(methods_app, name="methods")

ConfigOpt = Annotated[
    Optional[list[Path]],
    typer.Option("--config", "-c", help="YAML config file(s), merged left to right.", show_default=False),
]
SetOpt = Annotated[
    Optional[list[str]],
    typer.Option("--set", "-s", help="Override a key: --set curate.min_face_px=96 (repeatable).", show_default=False),
]
PresetOpt = Annotated[
    Optional[str],
    typer.Option("--preset", help="A method's paper preset (`idforge methods presets`), merged before --config.",
                 show_default=False),
]


def _load(config: list[Path] | None, overrides: list[str] | None, preset: str | None = None):
    from idforge.config import load_config

    return load_config(config or [], overrides or [], preset=preset)


@app.callback()
def _root(verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Debug logging.")] = False) -> None:
    from idforge.logs import quiet_known_notices

    quiet_known_notices()
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )


# ----------------------------------------------------------------------------------------------------------------
# config


@config_app.command("show")
def config_show(config: ConfigOpt = None, set_: SetOpt = None, preset: PresetOpt = None) -> None:
    """Print the fully resolved config (defaults + preset + files + --set) as YAML."""
    from idforge.config import dump_config

    typer.echo(dump_config(_load(config, set_, preset)), nl=False)


# ----------------------------------------------------------------------------------------------------------------
# models


@models_app.command("make-tiny")
def models_make_tiny(
    out_dir: Annotated[str, typer.Argument(parser=parse_location,
                                           help="Directory (or s3://) to write the model into (save_pretrained).")],
    kind: Annotated[str, typer.Option(help="sd15 | sdxl | clip")] = "sd15",
    seed: Annotated[int, typer.Option(help="Seed of the random weights.")] = 0,
) -> None:
    """Build a tiny random model of the real diffusers/transformers classes, for offline tests and demos."""
    from idforge.diffusion.tiny import make_tiny

    with local_output(out_dir) as work:
        make_tiny(work, kind=kind, seed=seed)
    typer.echo(f"wrote tiny {kind} model to {out_dir}")


@models_app.command("check")
def models_check(
    model: Annotated[str, typer.Argument(help="Hub id or local directory.")],
    kind: Annotated[str, typer.Option(help="pipeline | clip")] = "pipeline",
) -> None:
    """Load a model the way the stages do and print what it is (fails with a clear error when it cannot)."""
    from idforge.diffusion.loading import describe_model

    typer.echo(describe_model(model, kind=kind))


# ----------------------------------------------------------------------------------------------------------------
# methods


@methods_app.command("list")
def methods_list() -> None:
    """Every registered method with its regime (population / per-identity)."""
    from idforge.methods.describe import method_summaries

    for row in method_summaries():
        typer.echo(f"{row['name']:<20} {row['regime']:<13} {row['summary']}")


@methods_app.command("show")
def methods_show(name: Annotated[str, typer.Argument(help="Method name, e.g. infinite-id.")]) -> None:
    """The method's config keys with defaults."""
    from idforge.methods.describe import describe_method

    typer.echo(describe_method(name))


@methods_app.command("presets")
def methods_presets() -> None:
    """The paper presets (`--preset NAME`), one line each: name and the paper it reproduces."""
    from idforge.presets import available_presets, preset_summary

    for name, path in available_presets().items():
        typer.echo(f"{name:<20} {preset_summary(path)}")


@methods_app.command("inspect")
def methods_inspect(path: Annotated[str, typer.Argument(parser=parse_location,
                                                        help="A method checkpoint (.safetensors, or s3://).")]) -> None:
    """Method, config, UNet signature and parameter counts stored in a checkpoint."""
    from idforge.errors import DataError
    from idforge.methods.describe import describe_checkpoint

    try:
        typer.echo(describe_checkpoint(local_input(path)))
    except (FileNotFoundError, ValueError) as exc:
        raise DataError(str(exc)) from None


# ----------------------------------------------------------------------------------------------------------------
# stages


@app.command()
def curate(
    input: Annotated[str, typer.Option("--input", "-i", parser=parse_location,
                                       help="Folder or s3://bucket/prefix of raw photos.")],
    output: Annotated[str, typer.Option("--output", "-o", parser=parse_location,
                                        help="Dataset directory (or s3:// URI) to write.")],
    labels: Annotated[Optional[str], typer.Option(parser=parse_location,
                                                  help="CSV of source,identity to seed or override grouping.")] = None,
    ray_address: Annotated[Optional[str], typer.Option(
        help="Curate on this Ray cluster with Ray Data (sets curate.engine=ray and curate.ray_address).")] = None,
    config: ConfigOpt = None,
    set_: SetOpt = None,
) -> None:
    """Raw photos -> aligned, quality-gated, identity-grouped dataset with a manifest of every input."""
    from idforge.curate.run import curate_dataset

    cfg = _load(config, [*(set_ or []), *(["curate.engine=ray", f"curate.ray_address={ray_address}"]
                                           if ray_address else [])])
    report = curate_dataset(input, output, cfg=cfg, labels=labels)
    typer.echo(report.summary())


def _seeds(spec: str | None) -> list[int] | None:
    """``0..3`` -> [0, 1, 2, 3]; ``1,5,9`` -> [1, 5, 9]; None -> the protocol's."""
    from idforge.errors import ConfigError

    if spec is None:
        return None
    try:
        if ".." in spec:
            lo, hi = spec.split("..", 1)
            return list(range(int(lo), int(hi) + 1))
        return [int(x) for x in spec.split(",") if x.strip()]
    except ValueError:
        raise ConfigError(f"--seeds {spec!r} must look like 0..3 or 1,5,9") from None


@app.command()
def prepare(
    dataset: Annotated[str, typer.Option(parser=parse_location,
                                         help="Curated dataset directory (output of `idforge curate`).")],
    output: Annotated[str, typer.Option("--output", "-o", parser=parse_location,
                                        help="Cache directory (reused across runs).")],
    model: Annotated[Optional[str], typer.Option(help="Base model id or dir (default model.base).")] = None,
    config: ConfigOpt = None,
    set_: SetOpt = None,
) -> None:
    """Cache VAE latents, CLIP features, face and caption embeddings; a second run with the same inputs is a no-op."""
    from idforge.config import write_resolved_config
    from idforge.train.prepare import prepare_dataset

    cfg = _load(config, set_)
    with local_output(output, cfg.storage, what="prepare", prune=True) as out:
        index = prepare_dataset(local_input(dataset, cfg.storage), model or cfg.model.base, out, cfg.prepare,
                                clip_model=cfg.model.clip, device=cfg.run.device,
                                local_files_only=cfg.model.local_files_only)
        write_resolved_config(cfg, out)
    typer.echo(index.summary())


@app.command()
def train(
    data: Annotated[str, typer.Option(parser=parse_location,
                                      help="Prepared data directory (output of `idforge prepare`).")],
    output: Annotated[str, typer.Option("--output", "-o", parser=parse_location,
                                        help="Run directory: checkpoints, method.safetensors.")],
    method: Annotated[Optional[str], typer.Option(help="Population method: infinite-id | id-adapter.")] = None,
    model: Annotated[Optional[str], typer.Option(help="Base model id or dir (default model.base).")] = None,
    workers: Annotated[int, typer.Option(help="Ray Train workers (DDP ranks).")] = 1,
    gpus_per_worker: Annotated[
        float, typer.Option(help="0 = CPU workers; -1 = auto (one GPU each where there are GPUs).")
    ] = 0.0,
    ray_address: Annotated[Optional[str], typer.Option(help="Ray cluster address; default: a local Ray.")] = None,
    resume: Annotated[bool, typer.Option(help="Continue the run recorded in --output.")] = True,
    config: ConfigOpt = None,
    set_: SetOpt = None,
    preset: PresetOpt = None,
) -> None:
    """Train a tuning-free identity adapter with Ray Train (local CPU workers or a cluster)."""
    from idforge.train.population import train_population

    overrides = list(set_ or []) + ([f"train.method={method}"] if method else [])
    cfg = _load(config, overrides, preset)
    if is_s3_uri(output) and cfg.train.storage_path is None:
        # Ray Train's checkpoints beside the outputs on the bucket: a rerun on another machine resumes from them.
        ray_dir = output.rstrip("/") + "/ray"
        cfg = cfg.model_copy(update={"train": cfg.train.model_copy(update={"storage_path": ray_dir})})
    with local_output(output, cfg.storage, what="train") as out:
        result = train_population(cfg, data, model or cfg.model.base, workers=workers,
                                  gpus_per_worker=gpus_per_worker, output_dir=out, resume=resume,
                                  ray_address=ray_address, local_files_only=cfg.model.local_files_only)
    typer.echo(f"trained {cfg.train.method} for {result.steps} steps -> {output}")


@app.command()
def finetune(
    dataset: Annotated[str, typer.Option(parser=parse_location, help="Curated dataset directory.")],
    output: Annotated[str, typer.Option("--output", "-o", parser=parse_location,
                                        help="Artifacts go to OUTPUT/<identity>/.")],
    identity: Annotated[Optional[list[str]], typer.Option(help="Identity to fine-tune (repeatable).")] = None,
    all_: Annotated[bool, typer.Option("--all", help="Every identity of the dataset, as parallel Ray tasks.")] = False,
    method: Annotated[Optional[str], typer.Option(
        help="Per-identity method: id-ea | sefi-ide | pidiff | textual-inversion | dreambooth-lora "
             "(default: the --preset's method).")] = None,
    model: Annotated[Optional[str], typer.Option(help="Base model id or dir (default model.base).")] = None,
    config: ConfigOpt = None,
    set_: SetOpt = None,
    preset: PresetOpt = None,
) -> None:
    """Fine-tune a per-identity method: one identity, or all of them fanned out (failed ones are reported; a rerun
    redoes only what is not done)."""
    from idforge.errors import ConfigError

    cfg = _load(config, set_, preset)
    # A preset is named for its method, so `--preset pidiff` alone says which method to fine-tune.
    method = method or preset
    if method is None:
        raise ConfigError("pass --method NAME (or --preset NAME, which fine-tunes the preset's method)")
    base = model or cfg.model.base
    if all_ == bool(identity):
        raise ConfigError("pass exactly one of --identity ID (repeatable) or --all")
    data = local_input(dataset, cfg.storage)
    if identity and len(identity) == 1:
        from idforge.train.per_identity import finetune_identity

        with local_output(output, cfg.storage, what="finetune") as out:
            result = finetune_identity(method, identity[0], data, base, out, cfg.finetune, tracking=cfg.tracking)
        typer.echo(f"{identity[0]}: {result.status} -> {output.rstrip('/')}/{identity[0]}")
        return
    from idforge.train.fanout import finetune_all, format_status

    with local_output(output, cfg.storage, what="finetune --all") as out:
        results = finetune_all(method, data, base, out, cfg.finetune, identities=identity or None,
                               tracking=cfg.tracking)
    typer.echo(format_status(results))
    if any(r.status == "failed" for r in results):
        raise typer.Exit(code=1)


@app.command()
def generate(
    output: Annotated[str, typer.Option("--output", "-o", parser=parse_location,
                                        help="Where images, sidecars and index.parquet go.")],
    refs: Annotated[str, typer.Option(parser=parse_location,
                                      help="Curated dataset dir, folder of identity folders, or photos.")],
    method: Annotated[Optional[str], typer.Option(help="Method name (default: the one in the artifact).")] = None,
    artifact: Annotated[Optional[str], typer.Option(parser=parse_location,
                                                    help="Method checkpoint file or per-identity directory.")] = None,
    prompts: Annotated[Optional[str], typer.Option(parser=parse_location,
                                                   help="Prompt set YAML (default: the protocol's).")] = None,
    seeds: Annotated[Optional[str], typer.Option(help="0..3 or 1,5,9 (default: the protocol's).")] = None,
    model: Annotated[Optional[str], typer.Option(help="Base model id or dir (default model.base).")] = None,
    identity: Annotated[Optional[list[str]], typer.Option(help="Only these identities (repeatable).")] = None,
    config: ConfigOpt = None,
    set_: SetOpt = None,
    preset: PresetOpt = None,
) -> None:
    """Prompts x identities x seeds -> images, each with the exact config and seed that made it (resumable)."""
    from idforge.evaluate.generate import generate_images

    cfg = _load(config, set_, preset)
    inputs = [local_input(x, cfg.storage) for x in (artifact, refs, prompts)]
    with local_output(output, cfg.storage, what="generate") as out:
        result = generate_images(method, inputs[0], inputs[1], inputs[2], _seeds(seeds), model, out, cfg,
                                 identities=identity or None)
    typer.echo(result.summary())


@app.command()
def evaluate(
    generated: Annotated[str, typer.Option(parser=parse_location, help="Output directory of `idforge generate`.")],
    output: Annotated[str, typer.Option("--output", "-o", parser=parse_location,
                                        help="metrics.parquet, report.html go here.")],
    dataset: Annotated[Optional[str], typer.Option(parser=parse_location,
                                                   help="Curated dataset (reference identities).")] = None,
    run_name: Annotated[Optional[str], typer.Option(help="MLflow run name.")] = None,
    config: ConfigOpt = None,
    set_: SetOpt = None,
) -> None:
    """Identity similarity, CLIP-T, CLIP-I, LPIPS, diversity -> metrics.parquet, report.html and an MLflow run."""
    from idforge.evaluate.run import evaluate_generated

    cfg = _load(config, set_)
    with local_output(output, cfg.storage, what="evaluate") as out:
        result = evaluate_generated(local_input(generated, cfg.storage), local_input(dataset, cfg.storage), out, cfg,
                                    run_name=run_name)
    typer.echo(result.summary_text())


@app.command()
def compare(
    runs: Annotated[list[str], typer.Argument(help="Two or more evaluation MLflow run ids.")],
    output: Annotated[Optional[str], typer.Option(
        parser=parse_location, help="Also write the table (.csv, .md or .parquet; or s3://).")] = None,
    config: ConfigOpt = None,
    set_: SetOpt = None,
) -> None:
    """Side-by-side metrics of evaluation runs, with deltas against the first."""
    from idforge.evaluate.run import compare_runs

    cfg = _load(config, set_)
    if output is None:
        table = compare_runs(runs, cfg)
    else:
        with local_output_file(output, cfg.storage) as path:
            table = compare_runs(runs, cfg, output=path)
    typer.echo(table.to_string())


@app.command()
def register(
    run: Annotated[str, typer.Option(help="Evaluation MLflow run id.")],
    gates: Annotated[str, typer.Option(parser=parse_location, help="Gates YAML (path or s3://).")] = (
        "configs/gates.yaml"),
    model_name: Annotated[Optional[str], typer.Option(help="Registered model name (default idforge-<method>).")] = None,
    config: ConfigOpt = None,
    set_: SetOpt = None,
) -> None:
    """Register the evaluated model; alias `champion` moves only when every gate passes."""
    from idforge.evaluate.register import register_run

    cfg = _load(config, set_)
    result = register_run(run, local_input(gates, cfg.storage), cfg, model_name=model_name)
    typer.echo(result.summary())
    if not result.promoted:
        raise typer.Exit(code=3)


# ----------------------------------------------------------------------------------------------------------------
# pipelines

GatesOpt = Annotated[
    Optional[str], typer.Option(parser=parse_location, help="Gates YAML (path or s3://) passed as gates_yaml.")
]
ArgOpt = Annotated[
    Optional[list[str]],
    typer.Option("--arg", "-a", help="Pipeline parameter: --arg raw_uri=data/samples (repeatable).",
                 show_default=False),
]


VerboseOpt = Annotated[
    bool, typer.Option("--verbose", help="Show every step's full output (default: one line per step, the rest in "
                                         "a log file under outputs/logs/).")
]


def _quiet_log(name: str, verbose: bool) -> Path | None:
    """Where a quiet local run writes its full log (None: ``--verbose``, everything on screen)."""
    from pipelines.console import default_log_path

    return None if verbose else default_log_path(Path("outputs"), name)


PlatformOpt = Annotated[
    Optional[Path],
    typer.Option(help="YAML of the cluster's names for the steps' Secrets/ConfigMap, GPU tolerations and node "
                      "selector (pipelines/platform.py; default: what k8s/ creates)."),
]


def _pipeline_args(args: list[str] | None) -> dict[str, str]:
    from idforge.errors import ConfigError

    out = {}
    for item in args or []:
        if "=" not in item:
            raise ConfigError(f"pipeline argument {item!r} must look like name=value")
        key, value = item.split("=", 1)
        out[key.strip()] = value
    return out


def _pipeline_config_yaml(config: list[Path] | None, overrides: list[str] | None, preset: str | None = None) -> str:
    """The resolved config as YAML, with the paths steps read made absolute (``pipelines.runner``)."""
    from pipelines.runner import pipeline_config_yaml

    return pipeline_config_yaml(_load(config, overrides, preset), Path.cwd())


@pipeline_app.command("compile")
def pipeline_compile(
    out: Annotated[Optional[Path], typer.Option(help="Output directory (default pipelines/compiled).")] = None,
    registry: Annotated[Optional[str], typer.Option(help="Image registry prefix.")] = None,
    tag: Annotated[Optional[str], typer.Option(help="Image tag.")] = None,
    platform: PlatformOpt = None,
) -> None:
    """Compile every pipeline to KFP v2 YAML."""
    from components.images import Images
    from pipelines.platform import Platform
    from pipelines.runner import COMPILED_DIR, compile_all

    images = Images.load(registry, tag)
    for path in compile_all(out or COMPILED_DIR, images, Platform.load(platform)):
        typer.echo(str(path))


@pipeline_app.command("list")
def pipeline_list() -> None:
    """Names of the pipelines."""
    from pipelines.runner import registry

    for name in sorted(registry()):
        typer.echo(name)


@pipeline_app.command("run")
def pipeline_run(
    name: Annotated[str, typer.Argument(help="curation | train-adapter | personalize | end-to-end | retrain")],
    local: Annotated[bool, typer.Option("--local",
                                        help="Run here with kfp's local runner (required for now).")] = False,
    arg: ArgOpt = None,
    gates: GatesOpt = None,
    pipeline_root: Annotated[Path, typer.Option(help="Where task outputs go.")] = Path("outputs/kfp"),
    cache: Annotated[bool, typer.Option(help="Reuse outputs of unchanged steps.")] = True,
    verbose: VerboseOpt = False,
    config: ConfigOpt = None,
    set_: SetOpt = None,
    preset: PresetOpt = None,
) -> None:
    """Run a pipeline locally (kfp.local SubprocessRunner: no Docker, no pip at run time)."""
    from idforge.errors import ConfigError
    from pipelines.runner import run_local, typed_arguments

    if not local:
        raise ConfigError("`idforge pipeline run` runs locally: pass --local, or use `idforge pipeline submit`")
    arguments = typed_arguments(name, _pipeline_args(arg))
    arguments.setdefault("config_yaml", _pipeline_config_yaml(config, set_, preset))
    if gates is not None:
        arguments["gates_yaml"] = local_input(gates).read_text()
    log_file = _quiet_log(name, verbose)
    run = run_local(name, arguments, pipeline_root=pipeline_root, enable_caching=cache, log_file=log_file)
    typer.echo(f"pipeline {name} finished; outputs under {run.pipeline_root}")
    if log_file is not None:
        typer.echo(f"full log: {log_file}")


@pipeline_app.command("submit")
def pipeline_submit(
    name: Annotated[str, typer.Argument(help="Pipeline name (see `idforge pipeline list`).")],
    host: Annotated[str, typer.Option(help="Kubeflow Pipelines endpoint, e.g. http://127.0.0.1:8080")],
    experiment: Annotated[str, typer.Option(help="KFP experiment.")] = "idforge",
    arg: ArgOpt = None,
    gates: GatesOpt = None,
    registry: Annotated[Optional[str], typer.Option(help="Image registry prefix.")] = None,
    tag: Annotated[Optional[str], typer.Option(help="Image tag.")] = None,
    service_account: Annotated[
        Optional[str], typer.Option(help="Kubernetes service account the run's pods use (k8s/: idforge-pipeline).")
    ] = "idforge-pipeline",
    pipeline_root: Annotated[
        Optional[str],
        typer.Option(envvar="IDFORGE_PIPELINE_ROOT", help="Where artifacts go (k8s bucket layout: s3://idforge/kfp)."),
    ] = None,
    platform: PlatformOpt = None,
    namespace: Annotated[
        Optional[str], typer.Option(help="Kubeflow profile namespace the run executes in (k8s/: idforge; none for "
                                         "single-namespace KFP).")
    ] = "idforge",
    config: ConfigOpt = None,
    set_: SetOpt = None,
    preset: PresetOpt = None,
) -> None:
    """Submit a pipeline run to a Kubeflow Pipelines endpoint and print its run id."""
    from components.images import Images
    from idforge.config import dump_config
    from pipelines.platform import Platform
    from pipelines.runner import submit, typed_arguments

    images = Images.load(registry, tag)
    arguments = typed_arguments(name, _pipeline_args(arg), images)
    # On a cluster the tracking URI comes from the pods' MLFLOW_TRACKING_URI: do not bake a local path in.
    arguments.setdefault("config_yaml", dump_config(_load(config, set_, preset)))
    if gates is not None:
        arguments["gates_yaml"] = local_input(gates).read_text()
    run_id = submit(name, host, arguments, experiment=experiment, images=images,
                    service_account=service_account, pipeline_root=pipeline_root, platform=Platform.load(platform),
                    namespace=namespace or None)
    typer.echo(run_id)


@pipeline_app.command("status")
def pipeline_status(
    run_id: Annotated[str, typer.Argument(help="Run id printed by `idforge pipeline submit`.")],
    host: Annotated[str, typer.Option(help="Kubeflow Pipelines endpoint.")],
    wait: Annotated[bool, typer.Option(help="Block until the run ends.")] = False,
) -> None:
    """Print a submitted run's state."""
    from pipelines.runner import status

    typer.echo(status(run_id, host, wait=wait))


@app.command()
def personalize(
    photos: Annotated[str, typer.Option(parser=parse_location, help="A folder (or s3://) of one person's photos.")],
    method: Annotated[Optional[str], typer.Option(help="Method (default: the --preset's).")] = None,
    prompt: Annotated[Optional[list[str]], typer.Option(
        help='Prompt, "{}" where the person goes (repeatable), e.g. "a photo of {} on the beach".')] = None,
    output: Annotated[str, typer.Option("--output", "-o", parser=parse_location,
                                        help="Where dataset, model, images, grid go (or s3://).")] = (
        "outputs/personalize"),
    model: Annotated[Optional[str], typer.Option(
        parser=parse_location, help="A trained population adapter (method.safetensors) for id-adapter / "
                                    "infinite-id.")] = None,
    seeds: Annotated[Optional[str], typer.Option(help="0..3 or 1,5,9 (default 0,1).")] = None,
    config: ConfigOpt = None,
    set_: SetOpt = None,
    preset: PresetOpt = None,
) -> None:
    """One command from one person's photos to images of them: curate, fine-tune (or condition an adapter),
    generate, and write a grid and a report."""
    from idforge.errors import ConfigError
    from idforge.personalize import personalize as run

    cfg = _load(config, set_, preset)
    method = method or preset
    if method is None:
        raise ConfigError("pass --method NAME (or --preset NAME)")
    with local_output(output, cfg.storage) as out:
        result = run(local_input(photos, cfg.storage), method, list(prompt or []), out, cfg,
                     artifact=local_input(model, cfg.storage), seeds=_seeds(seeds))
    typer.echo(f"{result.identity}: {result.photos_used} photo(s) -> {output}")
    typer.echo(f"  grid   : {result.grid}")
    typer.echo(f"  report : {result.report}")


@app.command()
def doctor(
    ray_address: Annotated[Optional[str], typer.Option(help="A Ray head to check (http://HEAD:8265).")] = None,
    kfp_host: Annotated[Optional[str], typer.Option(help="A Kubeflow Pipelines endpoint to check.")] = None,
    config: ConfigOpt = None,
    set_: SetOpt = None,
    preset: PresetOpt = None,
) -> None:
    """What this environment has and lacks for the config: torch and GPUs, models, S3, MLflow, Ray, KFP.

    Exit code 0 only when everything the config needs is there; each gap comes with its fix."""
    from idforge.doctor import format_table, run_checks

    rows = run_checks(_load(config, set_, preset), ray_address=ray_address, kfp_host=kfp_host)
    for line in format_table(rows):
        typer.echo(line)
    failed = [r.name for r in rows if r.failed]
    if failed:
        typer.secho(f"{len(failed)} needed thing(s) missing: {', '.join(failed)}", err=True, fg=typer.colors.RED)
        raise typer.Exit(1)
    typer.secho("everything this config needs is here", fg=typer.colors.GREEN)


@app.command()
def demo(
    model: Annotated[Optional[str], typer.Option(help="Base model id or dir (default: a tiny random SD1.5).")] = None,
    clip: Annotated[Optional[str], typer.Option(help="CLIP id or dir (default: a tiny random CLIP).")] = None,
    method: Annotated[str, typer.Option(help="Method to train and evaluate.")] = "infinite-id",
    cache: Annotated[bool, typer.Option(help="Reuse outputs of unchanged steps.")] = True,
    verbose: VerboseOpt = False,
    config: ConfigOpt = None,
    set_: SetOpt = None,
) -> None:
    """The main job: the end-to-end pipeline on data/samples with embedded defaults (run from the repo root)."""
    from pipelines.demo import run_demo

    log_file = _quiet_log("demo", verbose)
    if log_file is not None:
        typer.echo(f"end-to-end pipeline on data/samples (one line per step; full log: {log_file})")
    result = run_demo(Path.cwd(), model=model, clip=clip, method=method, config_files=config, overrides=set_,
                      cache=cache, log_file=log_file)
    typer.echo("")
    typer.secho(f"end-to-end pipeline finished in {result.seconds:.0f} s", fg=typer.colors.GREEN)
    typer.echo(f"  pipeline outputs : {result.pipeline_root}")
    typer.echo(f"  report           : {result.report or 'not found (see the evaluate step log above)'}")
    typer.echo(f"  MLflow store     : {result.tracking_uri}")
    typer.echo(f"  MLflow UI        : {result.mlflow_ui}")
    typer.echo(f"  then open        : {result.mlflow_runs}")
    if result.log_file is not None:
        typer.echo(f"  full log         : {result.log_file}")


def main() -> None:
    """Entry point: bad input becomes one line on stderr and exit code 2, never a traceback."""
    from idforge.errors import IdforgeError

    try:
        app()
    except IdforgeError as exc:
        typer.secho(f"error: {exc}", err=True, fg=typer.colors.RED)
        sys.exit(2)


if __name__ == "__main__":
    main()
