"""Samplers by name (generate.scheduler, finetune.sample_scheduler): the right diffusers class on the model's own
noise schedule, an unknown name lists the choices, and the sampler really changes the images."""

from __future__ import annotations

import pytest
import torch

from idforge.diffusion.schedulers import SCHEDULER_NAMES, make_scheduler
from idforge.errors import ConfigError


@pytest.fixture(scope="module")
def pipe(tiny_sd15_dir, one_torch_thread):
    from idforge.diffusion.loading import load_pipeline

    return load_pipeline(tiny_sd15_dir)


EXPECTED = {"ddim": "DDIMScheduler", "dpm++": "DPMSolverMultistepScheduler", "euler": "EulerDiscreteScheduler",
            "euler_a": "EulerAncestralDiscreteScheduler"}


def test_names_build_their_class_on_the_models_schedule(pipe):
    assert SCHEDULER_NAMES == ("model", "ddim", "dpm++", "euler", "euler_a")
    model = pipe.scheduler
    own = make_scheduler("model", model)
    assert type(own) is type(model) and own is not model
    for name, cls in EXPECTED.items():
        s = make_scheduler(name, model)
        assert type(s).__name__ == cls, name
        for key in ("num_train_timesteps", "beta_start", "beta_end", "beta_schedule", "prediction_type"):
            assert s.config[key] == model.config[key], (name, key)
    assert make_scheduler("dpm++", model).config.algorithm_type == "dpmsolver++"


def test_unknown_name_lists_the_choices(pipe):
    from idforge.config import load_config

    with pytest.raises(ConfigError, match=r"unknown scheduler 'plms'; choices: model, ddim, dpm\+\+, euler, euler_a"):
        make_scheduler("plms", pipe.scheduler)
    with pytest.raises(ConfigError, match=r"generate\.scheduler.*unknown scheduler 'plms'; choices: model, ddim"):
        load_config(overrides=["generate.scheduler=plms"])
    with pytest.raises(ConfigError, match=r"finetune\.sample_scheduler"):
        load_config(overrides=["finetune.sample_scheduler=plms"])
    assert load_config(overrides=["generate.scheduler=dpm++"]).generate.scheduler == "dpm++"


def test_the_sampler_changes_the_images_and_each_runs(pipe):
    from idforge.methods.registry import get_method

    m = get_method("dreambooth-lora")
    m.attach(pipe)
    cond = m.sample_condition(pipe)
    kw = {"num_inference_steps": 3, "seeds": [0], "guidance_scale": 3.0}
    images = {name: m.generate(pipe, ["a photo of a person"], cond, scheduler=name, **kw)[0]
              for name in SCHEDULER_NAMES}
    pixels = {name: torch.tensor(list(img.getdata()), dtype=torch.float32) for name, img in images.items()}
    assert not torch.equal(pixels["ddim"], pixels["euler"])
    assert not torch.equal(pixels["euler"], pixels["euler_a"])  # ancestral noise
    again = m.generate(pipe, ["a photo of a person"], cond, scheduler="euler_a", **kw)[0]
    assert list(again.getdata()) == list(images["euler_a"].getdata())  # seeded: reproducible
    with pytest.raises(ConfigError, match="scheduler"):
        m.generate(pipe, ["a photo of a person"], cond, scheduler="plms", **kw)
    m.detach()
