"""IDAdapter (Cui et al., 2024): mixed facial features, self-attention adapters, textual injection, face loss.

Mixed facial features from N references, adapters on self-attention, textual injection into the class-noun token,
and a face identity loss:

- MFF (``modules["mff"]``): a small transformer of ``mff_blocks`` (2 in the paper) attention blocks. Learned
  queries (plus the mean projected face-ID feature) attend to the face-ID features and CLIP patch features of all
  N references at once, giving ``num_tokens`` vision tokens E_r (B, T, mff_dim).
- Visual injection (``modules["adapter"]``): one gated self-attention adapter per UNet self-attention layer (attn1),
  installed as an attention processor: ``out = self_attn(h) + scale * tanh(g) * Attn([h; W E_r])[:N]``, gate g = 0
  at init.
- Textual injection (``modules["text_inj"]``): the input embedding e of every class-noun token ("man", "woman",
  ...) becomes ``e + scale * MLP([e; mean(E_r)])`` before the (frozen) text encoder runs; zero-initialised.
- Face identity loss: for samples whose timestep is in ``[face_loss_t_min, face_loss_t_max)`` the predicted x0 is
  decoded, the face aligned with the target image's landmarks and embedded with the differentiable ArcFace;
  ``face_loss_weight * mean(1 - cos)`` joins the diffusion loss.

Training feeds N different images of one identity per sample; inference replicates one image N times.
"""

from __future__ import annotations

import logging
from typing import Any, ClassVar, Literal

import torch
from pydantic import Field, model_validator
from torch import Tensor, nn

from idforge.diffusion.attention import AttnSite, route
from idforge.methods.base import BaseMethod, MethodConfig
from idforge.methods.face_loss import FaceIdentityLoss, decode_to_unit
from idforge.methods.layers import MLP, CrossBlock, GatedSelfAttentionAdapter, unit_rms
from idforge.methods.objective import diffusion_loss, predict_x0, training_scheduler
from idforge.methods.types import Condition, IdentityRefs, TrainBatch

log = logging.getLogger(__name__)


class IDAdapterConfig(MethodConfig):
    """Sizes and switches of IDAdapter (defaults: SD1.5 + ArcFace-512 + CLIP ViT-L/14 patch tokens)."""

    data_dims: ClassVar[dict[str, tuple[str, int]]] = {"face_dim": ("face_embed", -1),
                                                        "clip_dim": ("clip_patch_tokens", -1)}

    num_refs: int = Field(default=4, ge=1, description="N reference images mixed per sample")
    face_dim: int = Field(default=512, ge=1, description="face-ID embedding size (ArcFace 512)")
    clip_dim: int = Field(default=1024, ge=1, description="CLIP vision hidden size of the patch tokens")
    mff_dim: int = Field(default=768, ge=1)
    mff_heads: int = Field(default=8, ge=1)
    mff_blocks: int = Field(default=2, ge=1, description="attention blocks of the MFF transformer (paper: 2)")
    mff_ff_mult: int = Field(default=4, ge=1)
    num_tokens: int = Field(default=16, ge=1, description="vision tokens E_r the MFF produces")
    adapter_blocks: list[Literal["down", "mid", "up"]] = Field(default_factory=lambda: ["down", "mid", "up"])
    textual_injection: bool = True
    class_nouns: list[str] = Field(default_factory=lambda: ["man", "woman", "person", "boy", "girl"])
    face_loss_weight: float = Field(default=0.1, ge=0.0)
    face_loss_t_min: int = Field(default=0, ge=0)
    face_loss_t_max: int = Field(default=400, ge=1, description="face loss only where t < this (x0 is readable)")
    face_model_dir: str | None = Field(default=None, description="insightface pack for the loss; None = embedded")

    @model_validator(mode="after")
    def _check(self) -> IDAdapterConfig:
        if self.mff_dim % self.mff_heads:
            raise ValueError(f"mff_dim {self.mff_dim} must be divisible by mff_heads {self.mff_heads}")
        if self.face_loss_t_min >= self.face_loss_t_max:
            raise ValueError("face_loss_t_min must be < face_loss_t_max")
        return self


class MixedFacialFeatures(nn.Module):
    """MFF: (face (B, N, Dface), patches (B, N, P, Dclip)) -> E_r (B, T, d).

    Parameters: face_proj Dface*d + d, patch_proj Dclip*d + d, queries T*d, ``blocks`` x CrossBlock(d), out
    LayerNorm 2d + Linear d^2 + d.
    """

    def __init__(self, cfg: IDAdapterConfig) -> None:
        super().__init__()
        d = cfg.mff_dim
        self.face_proj = nn.Linear(cfg.face_dim, d)
        self.patch_proj = nn.Linear(cfg.clip_dim, d)
        self.queries = nn.Parameter(torch.randn(cfg.num_tokens, d) * d**-0.5)
        self.blocks = nn.ModuleList(CrossBlock(d, cfg.mff_heads, cfg.mff_ff_mult) for _ in range(cfg.mff_blocks))
        self.norm_out = nn.LayerNorm(d)
        self.out = nn.Linear(d, d)

    def forward(self, face: Tensor, patches: Tensor) -> Tensor:
        b = face.shape[0]
        f = self.face_proj(unit_rms(face))  # (B, N, d)
        p = self.patch_proj(patches.float()).flatten(1, 2)  # (B, N*P, d)
        memory = torch.cat([f, p], dim=1)
        x = self.queries.unsqueeze(0).expand(b, -1, -1) + f.mean(dim=1, keepdim=True)
        for block in self.blocks:
            x = block(x, memory)
        return self.out(self.norm_out(x))


class IDAdapterSelfAttnProcessor:
    """Self-attention (attn1) = the original processor's output + the gated adapter reading E_r.

    At ``scale == 0`` or without identity tokens it returns the original processor's output untouched.
    """

    def __init__(self, base: Any, adapter: GatedSelfAttentionAdapter, state: Any) -> None:
        self.base = base
        self.adapter = adapter
        self.state = state

    def __call__(self, attn: Any, hidden_states: Tensor, encoder_hidden_states: Tensor | None = None,
                 attention_mask: Tensor | None = None, temb: Tensor | None = None, *args: Any, **kwargs: Any
                 ) -> Tensor:
        out = self.base(attn, hidden_states, encoder_hidden_states, attention_mask, temb)
        tokens = self.state.context.get("tokens")
        if self.state.scale == 0 or tokens is None:
            return out
        h = hidden_states
        if h.ndim == 4:
            b, c, hh, ww = h.shape
            h = h.view(b, c, hh * ww).transpose(1, 2)
        delta = self.adapter(h.float(), tokens.to(h.device).float()) * self.state.scale
        if out.ndim == 4:
            delta = delta.transpose(1, 2).reshape(out.shape)
        return out + delta.to(out.dtype)


class IDAdapter(BaseMethod):
    name: ClassVar[str] = "id-adapter"
    regime: ClassVar[Literal["population", "per-identity"]] = "population"
    Config: ClassVar[type[MethodConfig]] = IDAdapterConfig
    config: IDAdapterConfig
    ref_includes_target: ClassVar[bool] = True  # the data sampling may pick the target among its N references

    @property
    def refs_per_item(self) -> int:  # type: ignore[override]
        """N references mixed per sample: the data sampling draws ``num_refs`` of them."""
        return self.config.num_refs

    def __init__(self, config: IDAdapterConfig | None = None, face_loss: FaceIdentityLoss | None = None) -> None:
        super().__init__(config)
        self.face_loss = face_loss or FaceIdentityLoss(model_dir=self.config.face_model_dir)
        self._class_ids: list[Tensor] = []
        self._scheduler: Any = None

    # -- construction -------------------------------------------------------------------------------------------

    def _adapter_sites(self, pipe: Any) -> list[AttnSite]:
        from idforge.diffusion.attention import select_sites

        return select_sites(pipe.unet, "self", self.config.adapter_blocks)

    @staticmethod
    def _token_dims(pipe: Any) -> list[int]:
        encoders = [pipe.text_encoder, getattr(pipe, "text_encoder_2", None)]
        return [int(e.get_input_embeddings().embedding_dim) for e in encoders if e is not None]

    def build(self, pipe: Any) -> None:
        cfg = self.config
        self.modules["mff"] = MixedFacialFeatures(cfg)
        self.modules["adapter"] = nn.ModuleDict({
            s.key: GatedSelfAttentionAdapter(s.hidden_size, cfg.mff_dim, s.heads) for s in self._adapter_sites(pipe)
        })
        if cfg.textual_injection:
            self.modules["text_inj"] = nn.ModuleList(
                MLP(d + cfg.mff_dim, d, d, zero_out=True) for d in self._token_dims(pipe))

    def make_processors(self, pipe: Any) -> dict[str, Any]:
        current = pipe.unet.attn_processors
        adapters = self.modules["adapter"]
        return route(pipe.unet, self_attn=lambda s: (
            IDAdapterSelfAttnProcessor(current[s.name], adapters[s.key], self.state) if s.key in adapters else None))

    def on_attach(self, pipe: Any) -> None:
        self._scheduler = training_scheduler(pipe)
        self._class_ids = []
        tokenizers = [pipe.tokenizer, getattr(pipe, "tokenizer_2", None)]
        for tok in tokenizers:
            if tok is None:
                continue
            ids = []
            for noun in self.config.class_nouns:
                pieces = tok(noun, add_special_tokens=False).input_ids
                if len(pieces) != 1:
                    log.warning("class noun %r is %d tokens for this tokenizer; injecting into its last token",
                                noun, len(pieces))
                ids.append(pieces[-1])
            self._class_ids.append(torch.tensor(sorted(set(ids)), dtype=torch.long))

    # -- identity -----------------------------------------------------------------------------------------------

    def vision_tokens(self, face_embeds: Tensor, clip_patch_tokens: Tensor) -> Tensor:
        """E_r (B, T, mff_dim) from (B, N, Dface) and (B, N, P, Dclip)."""
        mff = self.modules["mff"]
        dev = next(mff.parameters()).device
        return mff(face_embeds.to(dev), clip_patch_tokens.to(dev))

    def token_hook(self, tokens: Tensor):
        """A ``TokenHook`` adding the identity to class-noun token embeddings (one MLP per text encoder)."""
        pooled = tokens.mean(dim=1)  # (B, d)
        inj = self.modules["text_inj"]
        scale = self.state.scale

        def hook(embeds: Tensor, input_ids: Tensor, index: int) -> Tensor:
            if scale == 0:
                return embeds
            mask = torch.isin(input_ids, self._class_ids[index].to(input_ids.device))
            if not bool(mask.any()):
                return embeds
            b, length, _ = embeds.shape
            p = pooled.to(embeds.device).float()
            p = p.expand(b, -1) if p.shape[0] == 1 else p
            delta = inj[index](torch.cat([embeds.float(), p[:, None].expand(b, length, -1)], dim=-1))
            return embeds + (scale * mask[..., None] * delta).to(embeds.dtype)

        return hook

    def _replicate(self, x: Tensor) -> Tensor:
        """(n, ...) references -> (num_refs, ...) by cycling (one image is replicated N times, as in the paper)."""
        idx = torch.arange(self.config.num_refs) % x.shape[0]
        return x[idx]

    def identity_condition(self, refs: IdentityRefs, pipe: Any) -> Condition:
        """One identity -> {"tokens": (1, T, d), "face": (1, N, Dface), "patches": (1, N, P, Dclip)}."""
        refs.require("face_embeds", "clip_patch_tokens")
        face = self._replicate(refs.face_embeds.float())[None]
        patches = self._replicate(refs.clip_patch_tokens.float())[None]
        with torch.no_grad():
            tokens = self.vision_tokens(face, patches)
        return Condition(self.name, {"tokens": tokens, "face": face.to(tokens.device),
                                     "patches": patches.to(tokens.device)}, {"class_noun": refs.class_noun})

    def unconditional(self, cond: Condition) -> Condition:
        face = torch.zeros_like(cond.tensors["face"])
        patches = torch.zeros_like(cond.tensors["patches"])
        with torch.no_grad():
            tokens = self.vision_tokens(face, patches)
        return Condition(self.name, {"tokens": tokens, "face": face, "patches": patches}, dict(cond.meta))

    # -- training -----------------------------------------------------------------------------------------------

    def _text(self, pipe: Any, batch: TrainBatch, tokens: Tensor):
        from idforge.diffusion.text import TextCondition, encode_ids

        if self.config.textual_injection:
            if batch.input_ids is None:
                raise ValueError("IDAdapter's textual injection needs input_ids in the batch (token ids of the "
                                 "captions); cached text_embeds cannot carry it")
            return encode_ids(pipe, batch.input_ids, batch.input_ids_2, self.token_hook(tokens))
        if batch.text_embeds is not None:
            return TextCondition(batch.text_embeds, batch.pooled_text_embeds)
        batch.require("input_ids")
        with torch.no_grad():
            return encode_ids(pipe, batch.input_ids, batch.input_ids_2)

    def reference_embeddings(self, batch: TrainBatch) -> Tensor:
        """(B, D) embeddings the face loss compares with: ArcFace of ``ref_pixels`` if given, else mean
        ``face_embeds`` (they must come from the same ArcFace model)."""
        if batch.ref_pixels is not None:
            with torch.no_grad():
                return self.face_loss.embed(batch.ref_pixels)
        return batch.face_embeds.float().mean(dim=1)

    def training_loss(self, batch: TrainBatch, pipe: Any, *, generator: torch.Generator | None = None
                      ) -> dict[str, Tensor]:
        """{"loss", "diffusion", "face"}: diffusion MSE + face_loss_weight * face identity loss.

        Needs latents, face_embeds, clip_patch_tokens, input_ids (textual injection) and, for the face loss,
        target_kps.
        """
        from idforge.diffusion.text import unet_call

        batch.require("latents", "face_embeds", "clip_patch_tokens")
        cfg = self.config
        tokens = self.vision_tokens(batch.face_embeds, batch.clip_patch_tokens)
        text = self._text(pipe, batch, tokens)
        sched = self._scheduler
        self.set_training_context({"tokens": tokens})  # kept for backward: checkpointed blocks recompute through it
        out = diffusion_loss(lambda x, t: unet_call(pipe, x, t, text, batch.add_time_ids), batch.latents, sched,
                             noise=batch.noise, timesteps=batch.timesteps, generator=generator)
        loss = out.loss
        face = torch.zeros((), device=loss.device)
        if cfg.face_loss_weight > 0 and batch.target_kps is not None:
            sel = (out.timesteps >= cfg.face_loss_t_min) & (out.timesteps < cfg.face_loss_t_max)
            if bool(sel.any()):
                x0 = predict_x0(sched, out.noisy_latents[sel], out.model_pred[sel], out.timesteps[sel])
                images = decode_to_unit(pipe.vae, x0)
                ref = self.reference_embeddings(batch)[sel]
                # Sum over the selected samples / B: each sample weighs the same whether or not it was selected.
                face = self.face_loss(images, batch.target_kps[sel], ref).sum() / batch.batch_size
                loss = loss + cfg.face_loss_weight * face
        return {"loss": loss, "diffusion": out.loss.detach(), "face": face.detach()}

    # -- sampling -----------------------------------------------------------------------------------------------

    def encode_prompts(self, pipe: Any, prompts: Any, cond: Condition | None) -> Any:
        from idforge.diffusion.text import encode_prompts

        if cond is None or not self.config.textual_injection:
            return encode_prompts(pipe, prompts)
        return encode_prompts(pipe, prompts, self.token_hook(cond.tensors["tokens"]))
