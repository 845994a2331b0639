"""The driver runs every registered method unchanged (here: each built-in one, tiny-sized, freshly initialised),
and the identity actually reaches the method: two people give different images for the same prompt and seed."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

from idforge.config import IdforgeConfig

REPO = Path(__file__).resolve().parents[1]

# sizes that fit the tiny models (CLIP vision hidden size 32)
TINY = {
    "infinite-id": {"clip_dim": 32, "mapper_hidden": 32},
    "id-adapter": {"clip_dim": 32, "mff_dim": 32, "mff_heads": 4, "num_refs": 2},
}


@pytest.fixture(scope="module")
def one_prompt(tmp_path_factory) -> Path:
    """The smoke protocol cut to its one plain prompt (categories select from the prompt set)."""
    data = yaml.safe_load((REPO / "configs/protocols/smoke.yaml").read_text())
    data.update(prompt_set=str(REPO / "data/prompts/smoke.yaml"), categories=["plain"])
    path = tmp_path_factory.mktemp("proto") / "one.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


@pytest.fixture(scope="module")
def pipe(tiny_sd15_dir):
    from idforge.diffusion.loading import load_pipeline

    return load_pipeline(tiny_sd15_dir)


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(TINY))
def test_driver_generates_with_builtin_method(name, pipe, tiny_sd15_dir, tiny_clip_dir, samples_dir, one_prompt,
                                              tmp_path):
    import torch

    from idforge.evaluate.generate import generate_images
    from idforge.methods.checkpoint import save_method
    from idforge.methods.registry import get_method

    torch.manual_seed(0)
    method = get_method(name, TINY[name])
    method.attach(pipe)
    # stand-in for training: adapters start as exact no-ops (zero gates/outputs), so move every weight a little
    with torch.no_grad():
        for p in method.trainable_parameters():
            p.add_(0.2 * torch.randn_like(p))
    artifact = save_method(method, tmp_path / "method.safetensors")
    method.detach(pipe)
    cfg = IdforgeConfig.model_validate({
        "model": {"base": str(tiny_sd15_dir), "clip": str(tiny_clip_dir)},
        "generate": {"protocol": str(one_prompt), "clip_features": "on"},
    })
    res = generate_images(name, artifact, samples_dir, None, [0], None, tmp_path / "gen", cfg,
                          identities=["obama", "macron"], pipe=pipe)
    assert res.generated == 2 and set(res.index["method"]) == {name}
    # the pipeline is handed back as it came: no processor of the method left installed
    assert not any(type(p).__module__.startswith("idforge") for p in pipe.unet.attn_processors.values())
    idx = res.index
    a = idx[(idx.identity == "obama") & (idx.category == "plain")]["image"].item()
    b = idx[(idx.identity == "macron") & (idx.category == "plain")]["image"].item()
    img_a = np.asarray(Image.open(tmp_path / "gen" / a)).astype(int)
    img_b = np.asarray(Image.open(tmp_path / "gen" / b)).astype(int)
    assert img_a.shape == (64, 64, 3)
    assert np.abs(img_a - img_b).max() > 0, f"{name}: the identity did not change the image"


def test_wrong_method_name_for_artifact(pipe, tiny_sd15_dir, tiny_clip_dir, samples_dir, tmp_path):
    from idforge.errors import ConfigError
    from idforge.evaluate.generate import generate_images
    from idforge.methods.checkpoint import save_method
    from idforge.methods.registry import get_method

    method = get_method("infinite-id", TINY["infinite-id"])
    method.attach(pipe)
    artifact = save_method(method, tmp_path / "m.safetensors")
    method.detach(pipe)
    cfg = IdforgeConfig.model_validate({"model": {"base": str(tiny_sd15_dir), "clip": str(tiny_clip_dir)},
                              "generate": {"protocol": str(REPO / "configs/protocols/smoke.yaml")}})
    with pytest.raises(ConfigError, match="holds method 'infinite-id', not 'id-adapter'"):
        generate_images("id-adapter", artifact, samples_dir, None, [0], None, tmp_path / "gen", cfg,
                        identities=["obama"], pipe=pipe)
    assert not (tmp_path / "gen" / "index.parquet").exists()


@pytest.mark.slow
def test_driver_per_identity_artifacts(pipe, tiny_sd15_dir, tiny_clip_dir, samples_dir, one_prompt, tmp_path):
    """A per-identity method (textual inversion): one artifact directory per identity, as `finetune --all`
    writes them; the prompt carries the method's pseudo-word, and each identity gets its own weights."""
    import torch

    from idforge.evaluate.generate import generate_images
    from idforge.methods.personalized import register_per_identity_methods
    from idforge.methods.registry import get_method

    register_per_identity_methods()
    arts = tmp_path / "finetuned"
    for i, ident in enumerate(["obama", "macron"]):
        m = get_method("textual-inversion")
        m.attach(pipe)
        with torch.no_grad():
            m.vectors.add_(torch.randn(m.vectors.shape, generator=torch.Generator().manual_seed(i)))
        m.save_artifact(arts / ident)
        m.detach(pipe)
    cfg = IdforgeConfig.model_validate({"model": {"base": str(tiny_sd15_dir), "clip": str(tiny_clip_dir)},
                                        "generate": {"protocol": str(one_prompt)}})
    res = generate_images(None, arts, samples_dir, None, [0], None, tmp_path / "gen", cfg,
                          identities=["obama", "macron"], pipe=pipe)
    idx = res.index.set_index("identity")
    assert set(idx["method"]) == {"textual-inversion"}
    assert idx.loc["obama", "prompt"] == "a photo of <idf>" and idx.loc["obama", "prompt_eval"] == "a photo of a person"
    assert idx.loc["obama", "artifact"].endswith("obama/method.safetensors")
    assert idx.loc["macron", "artifact"].endswith("macron/method.safetensors")
    a = np.asarray(Image.open(tmp_path / "gen" / idx.loc["obama", "image"])).astype(int)
    b = np.asarray(Image.open(tmp_path / "gen" / idx.loc["macron", "image"])).astype(int)
    assert np.abs(a - b).max() > 0


def test_generation_refuses_clip_features_other_than_the_training_ones(pipe, tiny_sd15_dir, tiny_clip_dir,
                                                                       samples_dir, one_prompt, tmp_path):
    """The record prepare wrote travels beside the artifact; another hidden layer (or model) is refused, naming both
    values, before any image is drawn; the matching settings generate, at generate.width/height, with DDIM."""
    import json

    import torch

    from idforge.errors import ConfigError
    from idforge.evaluate.generate import generate_images
    from idforge.methods.checkpoint import save_method
    from idforge.methods.registry import get_method
    from idforge.train.clip_features import FILE, clip_record

    torch.manual_seed(0)
    method = get_method("infinite-id", TINY["infinite-id"])
    method.attach(pipe)
    artifact = save_method(method, tmp_path / "method.safetensors")
    method.detach(pipe)
    (tmp_path / FILE).write_text(json.dumps(clip_record(str(tiny_clip_dir), -1, "ffhq")))

    def cfg(**gen):
        return IdforgeConfig.model_validate({
            "model": {"base": str(tiny_sd15_dir), "clip": str(tiny_clip_dir)},
            "generate": {"protocol": str(one_prompt), "clip_features": "on", **gen}})

    with pytest.raises(ConfigError, match=r"hidden_layer: trained on -1, generating with -2.*clip_hidden_layer"):
        generate_images("infinite-id", artifact, samples_dir, None, [0], None, tmp_path / "gen", cfg(),
                        identities=["obama"], pipe=pipe)
    assert not (tmp_path / "gen" / "images").exists()
    res = generate_images("infinite-id", artifact, samples_dir, None, [0], None, tmp_path / "gen",
                          cfg(clip_hidden_layer=-1, width=96, height=64, scheduler="DDIMScheduler"),
                          identities=["obama"], pipe=pipe)
    image = Image.open(tmp_path / "gen" / res.index["image"].iloc[0])
    assert image.size == (96, 64)
    with pytest.raises(ConfigError, match="not a diffusers scheduler class"):
        generate_images("infinite-id", artifact, samples_dir, None, [1], None, tmp_path / "gen2",
                        cfg(clip_hidden_layer=-1, scheduler="NoSuchScheduler"), identities=["obama"], pipe=pipe)
