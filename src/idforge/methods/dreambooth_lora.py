"""DreamBooth with LoRA (Ruiz et al., 2023 + Hu et al., 2021), the diffusers ``train_dreambooth_lora.py`` recipe.

peft LoRA adapters (rank ``rank``, alpha ``alpha``) on the UNet attention projections (to_q/to_k/to_v/to_out.0);
only the LoRA A/B matrices train, the prompt names the identity with a rare word plus the class noun
(``"sks person"``). No prior-preservation images are generated here (the per-identity loop has no class set);
add them to the dataset if language drift matters for a study.

The artifact holds our checkpoint and ``pytorch_lora_weights.safetensors`` in diffusers LoRA format, so a plain
``pipe.load_lora_weights(artifact_dir)`` reproduces the fine-tuned UNet.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, ClassVar

import torch
from pydantic import Field
from torch import Tensor, nn

from idforge.methods.base import MethodConfig
from idforge.methods.objective import diffusion_loss
from idforge.methods.personalized import PersonalizedConfig, PersonalizedMethod, TrainRecipe
from idforge.methods.registry import register_method
from idforge.methods.types import TrainBatch

ADAPTER = "idforge_dreambooth"
LORA_FILE = "pytorch_lora_weights.safetensors"


class DreamBoothLoRAConfig(PersonalizedConfig):
    """diffusers ``train_dreambooth_lora.py`` defaults: rank 4, lr 1e-4, 500 steps, batch 1."""

    rank: int = Field(default=4, ge=1)
    alpha: float | None = Field(default=None, description="LoRA alpha; None = rank (scaling 1)")
    target_modules: list[str] = Field(default_factory=lambda: ["to_q", "to_k", "to_v", "to_out.0"])
    rare_word: str = Field(default="sks", description="identifier word placed before the class noun")
    train: TrainRecipe = Field(default_factory=lambda: TrainRecipe(steps=500, batch_size=1, lr=1e-4))


@register_method
class DreamBoothLoRA(PersonalizedMethod):
    name: ClassVar[str] = "dreambooth-lora"
    Config: ClassVar[type[MethodConfig]] = DreamBoothLoRAConfig
    config: DreamBoothLoRAConfig

    def identity_phrase(self, class_noun: str = "person") -> str:
        return f"{self.config.rare_word} {class_noun}"

    def _lora_config(self) -> Any:
        from peft import LoraConfig

        cfg = self.config
        return LoraConfig(r=cfg.rank, lora_alpha=cfg.alpha if cfg.alpha is not None else cfg.rank,
                          init_lora_weights="gaussian", target_modules=list(cfg.target_modules))

    def build(self, pipe: Any) -> None:
        from peft.tuners.lora import LoraLayer

        unet = pipe.unet
        if ADAPTER in getattr(unet, "peft_config", {}):
            # A previous (detached) LoRA of ours on this UNet: replace it, one identity at a time.
            unet.delete_adapters(ADAPTER)
        unet.add_adapter(self._lora_config(), adapter_name=ADAPTER)
        layers = nn.ModuleDict()
        for name, module in unet.named_modules():
            if isinstance(module, LoraLayer) and ADAPTER in module.lora_A:
                # The same nn.Linear objects the UNet runs: ``self.modules`` owns references, not copies.
                layers[name.replace(".", "_")] = nn.ModuleDict({"A": module.lora_A[ADAPTER],
                                                                "B": module.lora_B[ADAPTER]})
        if not layers:
            raise ValueError(f"no UNet module matched LoRA target_modules {self.config.target_modules}")
        self.modules["lora"] = layers

    def make_processors(self, pipe: Any) -> dict[str, Any]:
        return {}

    def on_attach(self, pipe: Any) -> None:
        super().on_attach(pipe)
        pipe.unet.enable_adapters()
        pipe.unet.set_adapter(ADAPTER)
        self._apply_scale()

    def detach(self, pipe: Any | None = None) -> None:
        """Turn the LoRA off (the UNet computes the base model again); the adapter stays loaded for re-attach."""
        unet = self._unet
        super().detach(pipe)
        if unet is not None:
            unet.disable_adapters()

    def _apply_scale(self) -> None:
        if self._unet is not None:
            self._unet.set_adapters([ADAPTER], weights=[self.state.scale])

    def set_scale(self, scale: float) -> None:
        super().set_scale(scale)
        self._apply_scale()

    def training_loss(self, batch: TrainBatch, pipe: Any, *, generator: torch.Generator | None = None
                      ) -> dict[str, Tensor]:
        batch.require("latents")
        text = self.encode_batch_text(pipe, batch)
        out = diffusion_loss(self.denoise_fn(pipe, text, batch), batch.latents, self._scheduler,
                             noise=batch.noise, timesteps=batch.timesteps, generator=generator)
        return {"loss": out.loss, "diffusion": out.loss.detach()}

    def diffusers_state_dict(self, pipe: Any) -> dict[str, Tensor]:
        """The LoRA weights under diffusers' key names (``down_blocks....to_q.lora_A.weight``)."""
        from diffusers.utils import convert_state_dict_to_diffusers
        from peft.utils import get_peft_model_state_dict

        sd = get_peft_model_state_dict(pipe.unet, adapter_name=ADAPTER)
        return {k: v.detach().cpu().contiguous() for k, v in convert_state_dict_to_diffusers(sd).items()}

    def artifact_extra(self) -> dict[str, Any]:
        return {"diffusers_lora": LORA_FILE}

    def save_artifact(self, out_dir: Any, class_noun: str = "person") -> Path:
        """Our checkpoint plus the diffusers LoRA file (``pipe.load_lora_weights(out_dir)`` reads it)."""
        from diffusers import StableDiffusionPipeline

        if self._unet is None:
            raise ValueError("attach the method before saving its LoRA export")
        out = super().save_artifact(out_dir, class_noun)
        holder = type("_Pipe", (), {"unet": self._unet})()
        lora_cfg = self._unet.peft_config[ADAPTER]
        StableDiffusionPipeline.save_lora_weights(
            str(out), unet_lora_layers=self.diffusers_state_dict(holder), safe_serialization=True,
            unet_lora_adapter_metadata=lora_cfg.to_dict(),
        )
        return out
