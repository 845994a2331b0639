"""The ``idforge`` command. A thin shell: parse arguments, load the config, call the library.

Every import of a heavy library happens inside a command body so ``idforge --help`` stays instant.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path
from typing import Annotated, Optional

import typer

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
app.add_typer(models_app, name="models")
app.add_typer(pipeline_app, name="pipeline")
app.add_typer(config_app, name="config")

ConfigOpt = Annotated[
    Optional[list[Path]],
    typer.Option("--config", "-c", help="YAML config file(s), merged left to right.", show_default=False),
]
SetOpt = Annotated[
    Optional[list[str]],
    typer.Option("--set", "-s", help="Override a key: --set curate.min_face_px=96 (repeatable).", show_default=False),
]


def _load(config: list[Path] | None, overrides: list[str] | None):
    from idforge.config import load_config

    return load_config(config or [], overrides or [])


@app.callback()
def _root(verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Debug logging.")] = False) -> None:
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )


# ----------------------------------------------------------------------------------------------------------------
# config


@config_app.command("show")
def config_show(config: ConfigOpt = None, set_: SetOpt = None) -> None:
    """Print the fully resolved config (defaults + files + --set) as YAML."""
    from idforge.config import dump_config

    typer.echo(dump_config(_load(config, set_)), nl=False)


# ----------------------------------------------------------------------------------------------------------------
# models


@models_app.command("make-tiny")
def models_make_tiny(
    out_dir: Annotated[Path, typer.Argument(help="Directory to write the model into (save_pretrained layout).")],
    kind: Annotated[str, typer.Option(help="sd15 | sdxl | clip")] = "sd15",
    seed: Annotated[int, typer.Option(help="Seed of the random weights.")] = 0,
) -> None:
    """Build a tiny random model of the real diffusers/transformers classes, for offline tests and demos."""
    from idforge.diffusion.tiny import make_tiny

    path = make_tiny(out_dir, kind=kind, seed=seed)
    typer.echo(f"wrote tiny {kind} model to {path}")


@models_app.command("check")
def models_check(
    model: Annotated[str, typer.Argument(help="Hub id or local directory.")],
    kind: Annotated[str, typer.Option(help="pipeline | clip")] = "pipeline",
) -> None:
    """Load a model the way the stages do and print what it is (fails with a clear error when it cannot)."""
    from idforge.diffusion.loading import describe_model

    typer.echo(describe_model(model, kind=kind))


# ----------------------------------------------------------------------------------------------------------------
# stages


@app.command()
def curate(
    input: Annotated[str, typer.Option("--input", "-i", help="Folder or s3://bucket/prefix of raw photos.")],
    output: Annotated[str, typer.Option("--output", "-o", help="Dataset directory (or s3:// URI) to write.")],
    labels: Annotated[Optional[Path], typer.Option(help="CSV of source,identity to seed or override grouping.")] = None,
    config: ConfigOpt = None,
    set_: SetOpt = None,
) -> None:
    """Raw photos -> aligned, quality-gated, identity-grouped dataset with a manifest of every input."""
    from idforge.curate.run import curate_dataset

    cfg = _load(config, set_)
    report = curate_dataset(input, output, cfg=cfg, labels=str(labels) if labels else None)
    typer.echo(report.summary())


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
