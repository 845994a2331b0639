"""Infinite-ID (Wu et al., 2024): ID-semantics decoupling.

Training ("identity-enhanced"): the face mapper and the CLIP mapper turn the ID image's ArcFace embedding and
CLIP patch tokens into c_id = Concat(M_clip(E_clip), M_face(E_face)) (eq. 4), tokens of the UNet's cross-attention
width; every cross-attention layer reads c_id through its own trainable K'_id/V'_id projections, and the text
cross-attention is switched off (the text prompt is excluded; eq. 3). Trained: ``face_mapper``, ``clip_mapper``,
``image_attn``.

Inference, each switchable in the config (the paper's ablations):
- ``mixed_attention``: a text-only stream (the frozen model with the prompt and no identity) runs in the same UNet
  batch; in every self-attention the identity stream attends to Concat(K_id, K_t) / Concat(V_id, V_t) (eq. 5);
- ``cross_attention_merging``: Attn(Q, K'_id, V'_id) + Attn(Q, K'_t, V'_t) (eq. 6);
- ``adain_mean``: K_id, V_id (mixed attention) and K'_id, V'_id (cross-attention) become
  x - mean(x) + mean(y) against the text stream's / text's keys and values (eqs. 7, 8).
With all three off, inference is the training forward: plain self-attention, image cross-attention only.
``set_scale(s)`` multiplies the image cross-attention term; ``s == 0`` is the base model exactly.
"""

from __future__ import annotations

from typing import Any, ClassVar, Literal

import torch
from pydantic import Field
from torch import Tensor, nn

from idforge.diffusion import attention as A
from idforge.methods.base import BaseMethod, MethodConfig
from idforge.methods.guidance import GuidanceDropoutConfig, drop_text, training_drops, where_rows
from idforge.methods.layers import MLP, KeyValue, unit_rms
from idforge.methods.objective import diffusion_loss, training_scheduler
from idforge.methods.types import Condition, IdentityRefs, InjectionState, TrainBatch


class InfiniteIDConfig(GuidanceDropoutConfig):
    """Sizes and switches of Infinite-ID (defaults: SDXL + ArcFace-512 + OpenCLIP ViT-bigG hidden states)."""

    data_dims: ClassVar[dict[str, tuple[str, int]]] = {"face_dim": ("face_embed", -1),
                                                        "clip_dim": ("clip_patch_tokens", -1)}

    face_dim: int = Field(default=512, ge=1, description="face recognition embedding size")
    clip_dim: int = Field(default=1664, ge=1, description="CLIP vision hidden size of the local embeddings")
    num_face_tokens: int = Field(default=1, ge=1, description="tokens the face mapper makes from the global embedding")
    mapper_hidden: int | None = Field(default=None, description="hidden width of both mappers; None = UNet context dim")
    init_from_text_kv: bool = Field(default=True, description="start K'_id/V'_id from the text K/V weights")
    mixed_attention: bool = True
    cross_attention_merging: bool = True
    # Off by default: the paper brings it in for style merging (Fig. 3b, Fig. 8: without it identity fidelity is
    # higher and only stylised prompts lose their style) and leaves it out of the raw-photo ablations of Table 1.
    adain_mean: bool = Field(default=False, description="AdaIN-mean of the identity K/V (eqs. 7-8): on for "
                             "stylised prompts, off for photos (the paper's ablation text)")
    # Ablation "w/o identity-enhanced training": train with the text cross-attention on (text-image pairs).
    text_in_training: bool = False


class Mapper(nn.Module):
    """MLP(Din -> H -> T*D) then LayerNorm(D) per token: (B, ..., Din) -> (B, ..., T, D).

    Parameters: Din*H + H + H*T*D + T*D + 2D.
    """

    def __init__(self, dim_in: int, dim_hidden: int, dim_out: int, tokens: int = 1) -> None:
        super().__init__()
        self.tokens, self.dim_out = tokens, dim_out
        self.mlp = MLP(dim_in, dim_hidden, dim_out * tokens)
        self.norm = nn.LayerNorm(dim_out)

    def forward(self, x: Tensor) -> Tensor:
        y = self.mlp(x.float())
        return self.norm(y.view(*y.shape[:-1], self.tokens, self.dim_out))


def _rows(x: Tensor | None, streams: int) -> tuple[Tensor | None, Tensor | None]:
    """Split a stream-stacked batch into (identity rows, text-stream rows)."""
    if x is None or streams == 1:
        return x, None
    parts = x.chunk(streams)
    return parts[0], torch.cat(parts[1:])


class InfiniteIDCrossProcessor:
    """attn2: image cross-attention on c_id (training: instead of text; inference: + text when merging)."""

    def __init__(self, base: Any, image_attn: KeyValue, state: InjectionState, config: InfiniteIDConfig) -> None:
        self.base = base
        self.image_attn = image_attn
        self.state, self.config = state, config  # shared references: set_scale and the switches reach it live

    def __call__(self, attn: Any, hidden_states: Tensor, encoder_hidden_states: Tensor | None = None,
                 attention_mask: Tensor | None = None, temb: Tensor | None = None, *args: Any, **kwargs: Any
                 ) -> Tensor:
        state = self.state
        c_id = state.context.get("c_id")
        if state.scale == 0 or c_id is None:
            return self.base(attn, hidden_states, encoder_hidden_states, attention_mask, temb)
        streams = state.flags.get("streams", 1) if state.mode == "infer" else 1
        h_id, h_txt = _rows(hidden_states, streams)
        e_id, e_txt = _rows(encoder_hidden_states, streams)
        c, _ = _rows(c_id, streams)
        out = self._identity(attn, h_id, e_id, c, temb)
        if h_txt is None:
            return out
        # The text-only stream is the frozen model with the prompt: its own processor, untouched.
        return torch.cat([out, self.base(attn, h_txt, e_txt, None, temb)])

    def _identity(self, attn: Any, h: Tensor, text: Tensor | None, c_id: Tensor, temb: Tensor | None) -> Tensor:
        cfg, state = self.config, self.state
        infer = state.mode == "infer"
        use_text = cfg.cross_attention_merging if infer else cfg.text_in_training
        adain = infer and cfg.adain_mean
        prep = A.prepare(attn, h, None, temb)
        q = attn.to_q(prep.hidden)
        c_id = c_id.to(device=q.device, dtype=self.image_attn.to_k.weight.dtype)
        if c_id.shape[0] != q.shape[0]:
            c_id = c_id.expand(q.shape[0], *c_id.shape[1:])
        k_id = self.image_attn.to_k(c_id).to(q.dtype)
        v_id = self.image_attn.to_v(c_id).to(q.dtype)
        if use_text or adain:
            if text is None:
                raise ValueError("Infinite-ID cross-attention merging / AdaIN-mean need the text embeddings")
            ctx = A.context_of(attn, prep.hidden, text)
            k_t, v_t = attn.to_k(ctx), attn.to_v(ctx)
            if adain:
                k_id, v_id = A.adain_mean(k_id, k_t), A.adain_mean(v_id, v_t)
        out = A.sdpa(attn, q, k_id, v_id) * state.scale
        if use_text:
            out = out + A.sdpa(attn, q, k_t, v_t)
        return A.finish(attn, out, prep)


class InfiniteIDSelfProcessor:
    """attn1 at inference with mixed attention: identity rows attend to Concat(K_id, K_t), Concat(V_id, V_t)."""

    def __init__(self, base: Any, state: InjectionState, config: InfiniteIDConfig) -> None:
        self.base = base
        self.state, self.config = state, config

    def __call__(self, attn: Any, hidden_states: Tensor, encoder_hidden_states: Tensor | None = None,
                 attention_mask: Tensor | None = None, temb: Tensor | None = None, *args: Any, **kwargs: Any
                 ) -> Tensor:
        state, cfg = self.state, self.config
        streams = state.flags.get("streams", 1)
        if (state.mode != "infer" or streams < 2 or state.scale == 0 or not cfg.mixed_attention
                or "c_id" not in state.context):
            return self.base(attn, hidden_states, encoder_hidden_states, attention_mask, temb)
        h_id, h_txt = _rows(hidden_states, streams)
        assert h_txt is not None
        out_txt = self.base(attn, h_txt, None, None, temb)
        prep_id = A.prepare(attn, h_id, None, temb)
        prep_t = A.prepare(attn, h_txt[: h_id.shape[0]], None, temb)  # the text stream paired with each row
        q = attn.to_q(prep_id.hidden)
        k_id, v_id = attn.to_k(prep_id.hidden), attn.to_v(prep_id.hidden)
        k_t, v_t = attn.to_k(prep_t.hidden), attn.to_v(prep_t.hidden)
        if cfg.adain_mean:
            k_id, v_id = A.adain_mean(k_id, k_t), A.adain_mean(v_id, v_t)
        out = A.sdpa(attn, q, torch.cat([k_id, k_t], dim=1), torch.cat([v_id, v_t], dim=1))
        return torch.cat([A.finish(attn, out, prep_id), out_txt])


class InfiniteID(BaseMethod):
    name: ClassVar[str] = "infinite-id"
    regime: ClassVar[Literal["population", "per-identity"]] = "population"
    Config: ClassVar[type[MethodConfig]] = InfiniteIDConfig
    config: InfiniteIDConfig

    def __init__(self, config: InfiniteIDConfig | None = None) -> None:
        super().__init__(config)
        self._scheduler: Any = None
        self._empty_text: Any = None

    def build(self, pipe: Any) -> None:
        cfg = self.config
        unet = pipe.unet
        cross = A.select_sites(unet, "cross")
        if not cross:
            raise ValueError("Infinite-ID needs a UNet with cross-attention layers (attn2)")
        ctx = cross[0].context_dim
        hidden = cfg.mapper_hidden or ctx
        self.modules["face_mapper"] = Mapper(cfg.face_dim, hidden, ctx, cfg.num_face_tokens)
        self.modules["clip_mapper"] = Mapper(cfg.clip_dim, hidden, ctx, 1)
        layers = nn.ModuleDict()
        for site in cross:
            attn = A.attention_module(unet, site)
            # IP-Adapter's trick: start from the text K/V, so c_id is read like text from step 0.
            layers[site.key] = (KeyValue.like(attn) if cfg.init_from_text_kv
                                else KeyValue(site.context_dim, attn.to_k.out_features))
        self.modules["image_attn"] = layers

    def make_processors(self, pipe: Any) -> dict[str, Any]:
        current = pipe.unet.attn_processors
        layers = self.modules["image_attn"]
        return A.route(
            pipe.unet,
            self_attn=lambda s: InfiniteIDSelfProcessor(current[s.name], self.state, self.config),
            cross_attn=lambda s: InfiniteIDCrossProcessor(current[s.name], layers[s.key], self.state, self.config),
        )

    def on_attach(self, pipe: Any) -> None:
        self._scheduler = training_scheduler(pipe)
        self._empty_text = None

    # -- identity -----------------------------------------------------------------------------------------------

    def identity_tokens(self, face_embeds: Tensor, clip_patch_tokens: Tensor) -> Tensor:
        """c_id (B, P + num_face_tokens, D) from (B, N, Dface) and (B, N, P, Dclip); N references averaged."""
        dev = self.device
        clip_tok = self.modules["clip_mapper"](clip_patch_tokens.to(dev)).squeeze(-2)  # (B, N, P, D)
        face_tok = self.modules["face_mapper"](unit_rms(face_embeds.to(dev)))  # (B, N, Tf, D)
        return torch.cat([clip_tok, face_tok], dim=2).mean(dim=1)

    def identity_condition(self, refs: IdentityRefs, pipe: Any) -> Condition:
        """One identity -> {"c_id": (1, P + Tf, D), "face": (1, N, Dface), "patches": (1, N, P, Dclip)}."""
        refs.require("face_embeds", "clip_patch_tokens")
        face = refs.face_embeds.float()[None]
        patches = refs.clip_patch_tokens.float()[None]
        with torch.no_grad():
            c_id = self.identity_tokens(face, patches)
        return Condition(self.name, {"c_id": c_id, "face": face.to(c_id.device), "patches": patches.to(c_id.device)},
                         {"class_noun": refs.class_noun})

    def _null_tokens(self, face: Tensor, patches: Tensor) -> Tensor:
        """The unconditional c_id: one zero reference through the mappers (training's dropped identity and the
        sampler's unconditional branch alike)."""
        return self.identity_tokens(torch.zeros_like(face[:1, :1]), torch.zeros_like(patches[:1, :1]))

    def unconditional(self, cond: Condition) -> Condition:
        face, patches = cond.tensors["face"], cond.tensors["patches"]
        with torch.no_grad():
            c_id = self._null_tokens(face, patches)
        # face/patches keep the condition's shapes (the sampler stacks both branches); c_id is what the UNet reads
        return Condition(self.name, {"c_id": c_id, "face": torch.zeros_like(face[:1]),
                                     "patches": torch.zeros_like(patches[:1])}, dict(cond.meta))

    def sampling_streams(self) -> int:
        return 2 if self.config.mixed_attention and self.state.scale != 0 else 1

    # -- training -----------------------------------------------------------------------------------------------

    def _training_text(self, pipe: Any, batch: TrainBatch, drops: Tensor):
        """The text the UNet call gets in training: the caption only for the text-in-training ablation; otherwise
        the sampler's empty negative prompt for every sample (it reaches no cross-attention; SDXL's pooled/time
        conditioning still needs one), so training without text is the text-dropped branch everywhere."""
        from idforge.diffusion.text import TextCondition, encode_ids, encode_prompts

        b = batch.batch_size
        if self.config.text_in_training:
            if batch.text_embeds is not None:
                text = TextCondition(batch.text_embeds, batch.pooled_text_embeds)
            else:
                batch.require("input_ids")
                with torch.no_grad():
                    text = encode_ids(pipe, batch.input_ids, batch.input_ids_2)
            return drop_text(self, pipe, text, drops)
        if self._empty_text is None:
            with torch.no_grad():
                like = encode_prompts(pipe, [""])
            self._empty_text = drop_text(self, pipe, like, torch.ones(1, dtype=torch.bool))
        e = self._empty_text
        return TextCondition(e.hidden.expand(b, -1, -1), None if e.pooled is None else e.pooled.expand(b, -1))

    def training_loss(self, batch: TrainBatch, pipe: Any, *, generator: torch.Generator | None = None
                      ) -> dict[str, Tensor]:
        """{"loss", "diffusion", "drop_identity", "drop_text"}: eq. 3, the diffusion loss with c_id (not text) as
        the condition, with the guidance dropout drawn from ``generator``.

        Needs latents (the target photo), face_embeds and clip_patch_tokens (of a different photo of the same
        identity, the ID image).
        """
        from idforge.diffusion.text import unet_call

        batch.require("latents", "face_embeds", "clip_patch_tokens")
        drops = training_drops(self, batch.batch_size, generator, batch.latents.device)
        c_id = self.identity_tokens(batch.face_embeds, batch.clip_patch_tokens)
        if bool(drops.identity.any()):
            c_id = where_rows(drops.identity, self._null_tokens(batch.face_embeds, batch.clip_patch_tokens), c_id)
        text = self._training_text(pipe, batch, drops.text)
        self.set_training_context({"c_id": c_id})  # kept for backward: checkpointed blocks recompute through it
        out = diffusion_loss(lambda x, t: unet_call(pipe, x, t, text, batch.add_time_ids), batch.latents,
                             self._scheduler, noise=batch.noise, timesteps=batch.timesteps, generator=generator)
        return {"loss": out.loss, "diffusion": out.loss.detach(), **drops.fractions()}


__all__ = ["InfiniteID", "InfiniteIDConfig"]
