"""Generation on Ray actors (``generate.engine=ray``) on a local two-CPU Ray: the same index rows and the same PNG
bytes as the local engine on the tiny model, resumable the same way; and how identities are cut into work units."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest

from idforge.config import IdforgeConfig
from idforge.evaluate.generate import WorkUnit
from idforge.evaluate.generate_ray import split_units

REPO = Path(__file__).resolve().parents[1]
IDENTITIES = ["obama", "macron"]


def test_split_units_keeps_identities_whole_unless_workers_would_idle():
    units = [WorkUnit(i, ("r.png",), (0, 1, 2, 3, 4)) for i in ("a", "b")]
    assert split_units(units, 2) == units and split_units(units, 1) == units
    four = split_units(units, 4)  # 2 identities, 4 workers: each identity's seeds in 2 groups
    assert [(u.identity, u.seeds) for u in four] == [("a", (0, 1, 2)), ("a", (3, 4)), ("b", (0, 1, 2)),
                                                     ("b", (3, 4))]
    many = split_units(units[:1], 16)  # never an empty group: one seed per unit at most
    assert [u.seeds for u in many] == [(0,), (1,), (2,), (3,), (4,)]
    assert split_units([], 3) == []


@pytest.fixture(scope="module")
def artifact(tmp_path_factory, tiny_sd15_dir):
    from idforge.diffusion.loading import load_pipeline
    from idforge.methods.checkpoint import save_method
    from tests.test_generate_plain_method import PlainNoIdentity

    pipe = load_pipeline(tiny_sd15_dir)
    method = PlainNoIdentity()
    method.attach(pipe)
    path = save_method(method, tmp_path_factory.mktemp("art") / "method.safetensors")
    method.detach(pipe)
    return path


@pytest.fixture(scope="module")
def local_ray():
    """One local two-CPU Ray for the module (an engine run joins it instead of starting its own: faster)."""
    import ray

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


def _cfg(tiny_sd15_dir, tiny_clip_dir, engine: str) -> IdforgeConfig:
    return IdforgeConfig.model_validate({
        "model": {"base": str(tiny_sd15_dir), "clip": str(tiny_clip_dir)},
        "generate": {"protocol": str(REPO / "configs/protocols/smoke.yaml"), "batch_size": 2, "engine": engine,
                     "workers": 2, "device": "cpu"},
    })


def _pngs(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*.png"))}


@pytest.fixture(scope="module")
def both_engines(artifact, tiny_sd15_dir, tiny_clip_dir, samples_dir, local_ray, tmp_path_factory):
    """The smoke protocol (2 identities x 3 prompts x 2 seeds) drawn by the local engine and by 2 Ray actors."""
    from idforge.evaluate.generate import generate_images

    root = tmp_path_factory.mktemp("engines")
    local = generate_images(None, artifact, samples_dir, None, None, None, root / "local",
                            _cfg(tiny_sd15_dir, tiny_clip_dir, "local"), identities=IDENTITIES)
    on_ray = generate_images(None, artifact, samples_dir, None, None, None, root / "ray",
                             _cfg(tiny_sd15_dir, tiny_clip_dir, "ray"), identities=IDENTITIES)
    return root, local, on_ray


@pytest.mark.slow
def test_ray_engine_gives_the_local_engines_index_and_bytes(both_engines):
    root, local, on_ray = both_engines
    assert (local.generated, on_ray.generated, on_ray.skipped) == (12, 12, 0)
    pd.testing.assert_frame_equal(local.index, on_ray.index)
    a, b = _pngs(root / "local"), _pngs(root / "ray")
    assert len(a) == 12 + sum(1 for _ in (root / "local" / "refs").rglob("*.png")) and a.keys() == b.keys()
    assert a == b  # every generated image and reference crop, byte for byte
    run_l, run_r = (json.loads((root / d / "generate.json").read_text()) for d in ("local", "ray"))
    assert run_r["artifacts"] == run_l["artifacts"] and run_r["identities"] == run_l["identities"] == IDENTITIES


@pytest.mark.slow
def test_ray_engine_resumes_like_the_local_one(both_engines, artifact, tiny_sd15_dir, tiny_clip_dir, samples_dir,
                                               tmp_path):
    import shutil

    from idforge.evaluate.generate import generate_images

    root, _, on_ray = both_engines
    copy = tmp_path / "ray"
    shutil.copytree(root / "ray", copy)
    victims = on_ray.index[on_ray.index["seed"] == 1]["image"].tolist()[:4]
    for rel in victims:
        (copy / rel).unlink()
    again = generate_images(None, artifact, samples_dir, None, None, None, copy,
                            _cfg(tiny_sd15_dir, tiny_clip_dir, "ray"), identities=IDENTITIES)
    assert (again.generated, again.skipped) == (4, 8)  # only the removed images are drawn again...
    assert _pngs(copy) == _pngs(root / "local")  # ...to the same bytes


def test_ray_engine_raises_the_workers_error(artifact, tiny_sd15_dir, tiny_clip_dir, samples_dir, local_ray,
                                            tmp_path):
    from idforge.errors import ConfigError
    from idforge.evaluate.generate import generate_images

    with pytest.raises(ConfigError, match="holds method 'test-no-identity', not 'id-adapter'"):
        generate_images("id-adapter", artifact, samples_dir, None, [0], None, tmp_path / "gen",
                        _cfg(tiny_sd15_dir, tiny_clip_dir, "ray"), identities=["obama"])
    assert not (tmp_path / "gen" / "index.parquet").exists()
