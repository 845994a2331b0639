"""SeFi-IDE, "Beyond Inserting" (Li et al., 2024): per-stage K/V identity tokens and a face-wise attention loss.

- Semantic-fidelity tokens (``modules["tokens"].kv``, (S, 2, D), S = ``num_stages`` = 5): the identity's pseudo-word
  is a different token for each UNet stage and for keys vs values. The cross-attention layers are split, in the
  UNet's forward order (down, mid, up), into S contiguous stages; at stage i the pseudo-word is encoded with P_i^K
  to form the KEYS and with P_i^V to form the VALUES (each through the frozen text encoder, all 2S variants in one
  batched call). The other prompt words are untouched.
- Face-wise attention loss: the cross-attention maps of the identity token(s), averaged over heads and layers of
  every layer, are pushed inside the face mask from curation: the loss is the share of that attention falling on
  the background (averaged over layers), so the identity attends to the face and not to layout/background;
  weight ``attn_loss_weight``.

The per-stage contexts reach the processors through ``encoder_hidden_states`` itself: ``encode_prompts`` returns
``[base | K_1 | V_1 | ... | K_S | V_S]`` concatenated along the sequence (each L tokens); every cross-attention
processor of ours slices its stage's K and V segments, so the sampler's batching/guidance works unchanged.
"""

from __future__ import annotations

import math
from typing import Any, ClassVar

import numpy as np
import torch
import torch.nn.functional as F
from pydantic import Field
from torch import Tensor, nn

from idforge.diffusion.attention import AttnSite, finish, heads, merge_heads, prepare
from idforge.methods.base import MethodConfig
from idforge.methods.objective import diffusion_loss
from idforge.methods.personalized import (
    PersonalizedConfig,
    PersonalizedMethod,
    PlaceholderTokens,
    TrainRecipe,
    token_embedding,
)
from idforge.methods.registry import register_method
from idforge.methods.types import Condition, TrainBatch


class SeFiIDEConfig(PersonalizedConfig):
    """One reference image; the paper gives no optimiser numbers, so the textual-inversion recipe is the default."""

    num_stages: int = Field(default=5, ge=1, description="per-stage K/V token pairs (paper: 5)")
    placeholder: str = Field(default="<sefi>")
    init_word: str = Field(default="person")
    attn_loss_weight: float = Field(default=0.01, ge=0, description="weight of the face-wise attention loss")
    train: TrainRecipe = Field(default_factory=lambda: TrainRecipe(steps=500, batch_size=1, lr=5e-3))


def face_attention_loss(attn_map: Tensor, mask: Tensor) -> Tensor:
    """Face-wise attention loss: the share of the identity token's attention that falls outside the face.

    attn_map: (B, h, w) non-negative attention of the identity token(s) over the spatial positions.
    mask:     (B, h, w) in [0, 1], 1 = face. Returns a scalar in [0, 1] (mean over the batch): 0 when all attention
    is on the face, 1 when all of it is on the background; scale-free, so it moves WHERE the token attends, not how
    much (the diffusion loss decides that).
    """
    if attn_map.shape != mask.shape:
        raise ValueError(f"attention map {tuple(attn_map.shape)} and mask {tuple(mask.shape)} differ in shape")
    a = attn_map.float().flatten(1)
    outside = (a * (1 - mask.float().flatten(1))).sum(1) / a.sum(1).clamp_min(1e-8)
    return outside.mean()


def stage_of_sites(sites: list[AttnSite], num_stages: int) -> dict[str, int]:
    """Cross-attention processor name -> stage index, stages contiguous in forward order (down, mid, up).

    Layers of the same block stay in one stage. Raises ``ValueError`` when the UNet has fewer blocks with
    cross-attention than stages.
    """
    order = {"down": 0, "mid": 1, "up": 2}
    groups: dict[tuple[int, int], list[str]] = {}
    for s in sites:
        groups.setdefault((order[s.block], s.block_index), []).append(s.name)
    keys = sorted(groups)
    if len(keys) < num_stages:
        raise ValueError(f"the UNet has {len(keys)} blocks with cross-attention, fewer than num_stages={num_stages}")
    out: dict[str, int] = {}
    for stage, chunk in enumerate(np.array_split(np.arange(len(keys)), num_stages)):
        for gi in chunk:
            for name in groups[keys[int(gi)]]:
                out[name] = stage
    return out


class StageTokens(nn.Module):
    """``kv`` (S, 2, D): P_i^K = kv[i, 0], P_i^V = kv[i, 1], in the text encoder's token-embedding space."""

    def __init__(self, stages: int, dim: int) -> None:
        super().__init__()
        self.kv = nn.Parameter(torch.zeros(stages, 2, dim))


class SeFiCrossAttnProcessor:
    """Cross-attention whose keys/values come from this stage's K/V segments of the packed context.

    With an ordinary (unpacked) context it behaves as ``AttnProcessor2_0``. When ``state.flags["capture"]`` is a
    list, it appends ``(B, N)`` head-averaged attention of the identity positions ``state.context["id_pos"]``.
    """

    def __init__(self, stage: int, num_stages: int, state: Any) -> None:
        self.stage = stage
        self.num_stages = num_stages
        self.state = state

    def __call__(self, attn: Any, hidden_states: Tensor, encoder_hidden_states: Tensor | None = None,
                 attention_mask: Tensor | None = None, temb: Tensor | None = None, *args: Any, **kwargs: Any
                 ) -> Tensor:
        ctx = encoder_hidden_states
        if ctx is None:
            raise ValueError("SeFi-IDE processors are installed on cross-attention layers only")
        segments = 1 + 2 * self.num_stages
        packed = self.state.flags.get("sefi_len")
        if packed and ctx.shape[1] == packed * segments:
            length = packed
            k_ctx = ctx[:, (1 + 2 * self.stage) * length:(2 + 2 * self.stage) * length]
            v_ctx = ctx[:, (2 + 2 * self.stage) * length:(3 + 2 * self.stage) * length]
        else:
            length = ctx.shape[1]
            k_ctx = v_ctx = ctx
        prep = prepare(attn, hidden_states, attention_mask, temb, context_len=length)
        if attn.norm_cross:
            k_ctx = attn.norm_encoder_hidden_states(k_ctx)
            v_ctx = attn.norm_encoder_hidden_states(v_ctx)
        q, k, v = attn.to_q(prep.hidden), attn.to_k(k_ctx), attn.to_v(v_ctx)
        capture = self.state.flags.get("capture")
        if capture is None:
            from idforge.diffusion.attention import sdpa

            return finish(attn, sdpa(attn, q, k, v, prep.mask), prep)
        qh, kh, vh = heads(attn, q), heads(attn, k), heads(attn, v)
        if attn.norm_q is not None:
            qh = attn.norm_q(qh)
        if attn.norm_k is not None:
            kh = attn.norm_k(kh)
        logits = qh @ kh.transpose(-1, -2) * (qh.shape[-1] ** -0.5)
        if prep.mask is not None:
            logits = logits + prep.mask
        probs = logits.softmax(-1)  # (B, H, N, L)
        pos = self.state.context["id_pos"].to(probs.device)  # (B, L) bool
        ident = (probs.mean(1) * pos[:, None, :].to(probs.dtype)).sum(-1)  # (B, N)
        capture.append(ident)
        return finish(attn, merge_heads(attn, probs @ vh).to(q.dtype), prep)


@register_method
class SeFiIDE(PersonalizedMethod):
    name: ClassVar[str] = "sefi-ide"
    Config: ClassVar[type[MethodConfig]] = SeFiIDEConfig
    config: SeFiIDEConfig

    def __init__(self, config: SeFiIDEConfig | None = None) -> None:
        super().__init__(config)
        self.tokens = PlaceholderTokens([self.config.placeholder], fallback_word=self.config.init_word)
        self._stages: dict[str, int] = {}

    def identity_phrase(self, class_noun: str = "person") -> str:
        return self.tokens.phrase

    def build(self, pipe: Any) -> None:
        from idforge.diffusion.attention import select_sites

        self._stages = stage_of_sites(select_sites(pipe.unet, "cross"), self.config.num_stages)
        dim = pipe.text_encoder.get_input_embeddings().embedding_dim
        tokens = StageTokens(self.config.num_stages, dim)
        with torch.no_grad():
            tokens.kv.copy_(token_embedding(pipe, self.config.init_word).expand_as(tokens.kv))
        self.modules["tokens"] = tokens

    def make_processors(self, pipe: Any) -> dict[str, Any]:
        from idforge.diffusion.attention import select_sites

        self._stages = stage_of_sites(select_sites(pipe.unet, "cross"), self.config.num_stages)
        return {name: SeFiCrossAttnProcessor(stage, self.config.num_stages, self.state)
                for name, stage in self._stages.items()}

    def on_attach(self, pipe: Any) -> None:
        super().on_attach(pipe)
        self.tokens.install(pipe)
        self.state.flags["sefi_len"] = int(pipe.tokenizer.model_max_length)

    def detach(self, pipe: Any | None = None) -> None:
        super().detach(pipe)
        self.state.flags.pop("sefi_len", None)

    @property
    def kv(self) -> Tensor:
        return self.modules["tokens"].kv

    def pack_ids(self, pipe: Any, input_ids: Tensor, with_identity: bool) -> Any:
        """Token ids (B, L) -> TextCondition with hidden (B, (1 + 2S) L, D): base, then K/V per stage."""
        from idforge.diffusion.text import TextCondition

        s = self.config.num_stages
        b, length = input_ids.shape
        if not with_identity:
            base = self.tokens.encode_ids(pipe, input_ids, None).hidden
            return TextCondition(base.repeat(1, 1 + 2 * s, 1))
        variants = self.kv.reshape(2 * s, 1, -1)  # (2S, 1, D): variant j = stage j // 2, K if j even else V
        ids = input_ids.repeat(2 * s, 1)  # (2S*B, L), variant-major
        vectors = variants.repeat_interleave(b, dim=0)  # (2S*B, 1, D)
        enc = self.tokens.encode_ids(pipe, ids, vectors).hidden.view(2 * s, b, length, -1)
        with torch.no_grad():
            base = self.tokens.encode_ids(pipe, input_ids, None).hidden
        return TextCondition(torch.cat([base, *enc.unbind(0)], dim=1))

    def encode_prompts(self, pipe: Any, prompts: Any, cond: Condition | None) -> Any:
        from idforge.diffusion.text import tokenize

        ids, _ = tokenize(pipe, prompts)
        on = cond is not None and self.state.scale != 0 and bool(cond.tensors["on"].any())
        return self.pack_ids(pipe, ids, on)

    def training_loss(self, batch: TrainBatch, pipe: Any, *, generator: torch.Generator | None = None
                      ) -> dict[str, Tensor]:
        """{"loss", "diffusion", "attn"}; needs latents, input_ids and (for the attention loss) face_mask."""
        batch.require("latents", "input_ids")
        text = self.pack_ids(pipe, batch.input_ids, True)
        use_attn = self.config.attn_loss_weight > 0 and batch.face_mask is not None
        captured: list[Tensor] = []
        flags_before = dict(self.state.flags)
        if use_attn:
            self.state.flags["capture"] = captured
        try:
            with self.conditioning({"id_pos": self.tokens.positions(batch.input_ids) > 0}):
                out = diffusion_loss(self.denoise_fn(pipe, text, batch), batch.latents, self._scheduler,
                                     noise=batch.noise, timesteps=batch.timesteps, generator=generator)
        finally:
            self.state.flags.clear()
            self.state.flags.update(flags_before)
        loss = out.loss
        attn = torch.zeros((), device=loss.device)
        if use_attn and captured:
            h0, w0 = batch.latents.shape[-2:]
            parts = []
            for m in captured:
                factor = math.sqrt(h0 * w0 / m.shape[1])
                h, w = round(h0 / factor), round(w0 / factor)
                mask = F.interpolate(batch.face_mask.float().to(m.device), size=(h, w), mode="area")[:, 0]
                parts.append(face_attention_loss(m.view(-1, h, w), mask))
            attn = torch.stack(parts).mean()
            loss = loss + self.config.attn_loss_weight * attn
        return {"loss": loss, "diffusion": out.loss.detach(), "attn": attn.detach()}

    def artifact_extra(self) -> dict[str, Any]:
        return {"placeholders": self.tokens.words, "stages": self._stages}
