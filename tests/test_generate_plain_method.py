"""A minimal honest Method for the generation/evaluation tests: "no identity" (the plain base pipeline).

It implements the whole protocol: its only module (a projection of the reference face embeddings) is saved and
loaded like any method's, ``identity_condition`` builds a real condition, but no attention processor reads it, so
the images are the base model's. It is the floor every identity method must beat, and it lets the driver, the
evaluator and the registry be tested without depending on any particular method. The registered pyfunc model
imports this module by name in a fresh process (the driver never special-cases it).
"""

from __future__ import annotations

from typing import Any

import pytest
import torch
from torch import nn

from idforge.methods.base import BaseMethod, Method, MethodConfig
from idforge.methods.objective import diffusion_loss, training_scheduler
from idforge.methods.registry import register_method
from idforge.methods.types import Condition, IdentityRefs, TrainBatch


class PlainConfig(MethodConfig):
    dim: int = 8
    init_seed: int = 0


@register_method
class PlainNoIdentity(BaseMethod):
    name = "test-no-identity"
    regime = "population"
    Config = PlainConfig

    def build(self, pipe: Any) -> None:
        gen = torch.Generator().manual_seed(self.config.init_seed)
        proj = nn.Linear(512, self.config.dim)
        with torch.no_grad():
            proj.weight.copy_(torch.randn(proj.weight.shape, generator=gen) * 0.02)
            proj.bias.zero_()
        self.modules["image_proj"] = proj

    def make_processors(self, pipe: Any) -> dict[str, Any]:
        return {}  # nothing injected: the base model's own processors stay

    def training_loss(self, batch: TrainBatch, pipe: Any, *, generator: torch.Generator | None = None):
        from idforge.diffusion.text import TextCondition, unet_call

        batch.require("text_embeds", "face_embeds")
        tokens = self.modules["image_proj"](batch.face_embeds.mean(1))
        text = TextCondition(batch.text_embeds)
        out = diffusion_loss(lambda x, t: unet_call(pipe, x, t, text), batch.latents, training_scheduler(pipe),
                             generator=generator)
        # keep the projection in the graph so the parameters get (zero-effect) gradients
        return {"loss": out.loss + 0.0 * tokens.sum(), "diffusion": out.loss.detach()}

    def identity_condition(self, refs: IdentityRefs, pipe: Any) -> Condition:
        refs.require("face_embeds")
        emb = refs.face_embeds.to(self.device, torch.float32).mean(0, keepdim=True)
        return Condition(self.name, {"tokens": self.modules["image_proj"](emb)[:, None]},
                         {"class_noun": refs.class_noun, "num_refs": refs.num_refs})


@pytest.mark.slow
def test_plain_method_implements_the_protocol(tiny_sd15_dir):
    from idforge.diffusion.loading import load_pipeline

    pipe = load_pipeline(tiny_sd15_dir)
    m = PlainNoIdentity()
    assert isinstance(m, Method)
    m.attach(pipe)
    refs = IdentityRefs(face_embeds=torch.nn.functional.normalize(torch.randn(2, 512), dim=-1))
    cond = m.identity_condition(refs, pipe)
    assert cond.tensors["tokens"].shape == (1, 1, 8)
    a = m.generate(pipe, ["a photo of a person"], cond, seeds=[3], num_inference_steps=2)
    b = m.generate(pipe, ["a photo of a person"], cond, seeds=[3], num_inference_steps=2)
    assert len(a) == 1 and a[0].size == (64, 64)
    assert a[0].tobytes() == b[0].tobytes()
    m.detach(pipe)
