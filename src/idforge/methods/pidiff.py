"""PIDiff (2025): personalised identity through StyleGAN's W+ space and Style Cross-Attention (SCA).

- Visual Guidance Module: a frozen e4e-style W+ encoder (``idforge.methods.wplus_encoder``; external checkpoint via
  ``encoder_path``, random init without) maps an aligned face to w+ (18, 512); the trainable mapping network
  ``modules["mapping"]`` F: (18, 512) -> (T=4, cross_attention_dim) turns it into visual tokens.
- SCA after every text cross-attention (attn2): ``f = f_text + lambda * f_SCA`` with
  ``f_SCA = Out(softmax(Q K^T / sqrt(d)) V)``, ``Q = f_text W_q'``, ``K = F(w+) W_k'``, ``V = F(w+) W_v'``.
  W_q', W_k', W_v' (and the output projection) start as copies of the text cross-attention's. Only SCA and F train.
  lambda is 1 in training and ``scale`` (default 0.4) at inference; lambda = 0 is the base model exactly.
- Training recipe: AdamW lr 1e-4, weight decay 0.01, batch 4, 600 steps; per-sample dropout of the visual condition
  (p 0.5: SCA off for that sample) and of the text (p 0.3: the empty prompt), Gaussian noise on w+.
- Style mixing: ``mix_wplus(a, b, coarse)`` takes the coarse layers (default 0-6) from one w+ and the fine ones from
  another (``identity_condition(refs, style_refs=...)``).

Conditions carry ``{"wplus": (1, 18, 512), "keep": (1,)}``; the unconditional branch (zeros) has keep 0 = no SCA,
the same "no visual prompt" the visual dropout trains.
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch
from pydantic import Field
from torch import Tensor, nn

from idforge.diffusion.attention import attention_module, route, sdpa, select_sites
from idforge.methods.base import MethodConfig
from idforge.methods.objective import diffusion_loss
from idforge.methods.personalized import PersonalizedConfig, PersonalizedMethod, TrainRecipe
from idforge.methods.registry import register_method
from idforge.methods.types import Condition, IdentityRefs, TrainBatch
from idforge.methods.wplus_encoder import N_STYLES, STYLE_DIM


class PIDiffConfig(PersonalizedConfig):
    scale: float = Field(default=0.4, description="inference lambda of SCA (paper 0.4); training uses 1")
    num_tokens: int = Field(default=4, ge=1, description="visual tokens F outputs (paper: 4)")
    mapping_hidden: int = Field(default=1024, ge=1)
    encoder_path: str | None = Field(default=None, description="W+ encoder checkpoint; None = random init")
    encoder_image_size: int = Field(default=256, ge=64)
    encoder_width: int = Field(default=64, ge=4, description="W+ encoder backbone base channels")
    visual_dropout: float = Field(default=0.5, ge=0, le=1)
    text_dropout: float = Field(default=0.3, ge=0, le=1)
    wplus_noise: float = Field(default=0.05, ge=0, description="std of Gaussian noise added to w+ in training")
    coarse_layers: int = Field(default=7, ge=0, le=N_STYLES, description="style mixing: layers [0, k) are coarse")
    train: TrainRecipe = Field(default_factory=lambda: TrainRecipe(steps=600, batch_size=4, lr=1e-4,
                                                                   weight_decay=0.01))


class MappingNetwork(nn.Module):
    """F: w+ (B, 18, 512) -> visual tokens (B, T, D): LayerNorm, MLP over the flattened w+, per-token LayerNorm."""

    def __init__(self, dim: int, num_tokens: int, hidden: int) -> None:
        super().__init__()
        self.num_tokens, self.dim = num_tokens, dim
        self.norm_in = nn.LayerNorm(STYLE_DIM)
        self.fc1 = nn.Linear(N_STYLES * STYLE_DIM, hidden)
        self.fc2 = nn.Linear(hidden, num_tokens * dim)
        self.norm_out = nn.LayerNorm(dim)

    def forward(self, wplus: Tensor) -> Tensor:
        x = self.norm_in(wplus.float()).flatten(1)
        x = self.fc2(nn.functional.gelu(self.fc1(x)))
        return self.norm_out(x.view(-1, self.num_tokens, self.dim))


class IdentityWPlus(nn.Module):
    """The trained identity's mean w+ (``wplus`` (1, 18, 512) buffer), so the artifact generates without photos."""

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("wplus", torch.zeros(1, N_STYLES, STYLE_DIM))


class StyleCrossAttention(nn.Module):
    """SCA projections of one layer, initialised from its text cross-attention (to_q/k/v and to_out[0])."""

    def __init__(self, attn: nn.Module) -> None:
        super().__init__()

        def clone(lin: nn.Linear) -> nn.Linear:
            new = nn.Linear(lin.in_features, lin.out_features, bias=lin.bias is not None)
            new.load_state_dict({k: v.detach().float().clone() for k, v in lin.state_dict().items()})
            return new

        self.to_q = clone(attn.to_q)
        self.to_k = clone(attn.to_k)
        self.to_v = clone(attn.to_v)
        self.to_out = clone(attn.to_out[0])


class SCAProcessor:
    """Text cross-attention (the original processor) followed by Style Cross-Attention over ``context["visual"]``."""

    def __init__(self, base: Any, sca: StyleCrossAttention, state: Any) -> None:
        self.base = base
        self.sca = sca
        self.state = state

    def __call__(self, attn: Any, hidden_states: Tensor, encoder_hidden_states: Tensor | None = None,
                 attention_mask: Tensor | None = None, temb: Tensor | None = None, *args: Any, **kwargs: Any
                 ) -> Tensor:
        f_text = self.base(attn, hidden_states, encoder_hidden_states, attention_mask, temb)
        lam = 1.0 if self.state.mode == "train" else self.state.scale
        visual = self.state.context.get("visual")
        if lam == 0 or visual is None:
            return f_text
        keep = self.state.context["keep"]
        x = f_text
        ndim4 = x.ndim == 4
        if ndim4:
            b, c, h, w = x.shape
            x = x.view(b, c, h * w).transpose(1, 2)
        b = x.shape[0]
        vis = visual.to(device=x.device, dtype=torch.float32)
        vis = vis.expand(b, *vis.shape[1:]) if vis.shape[0] == 1 else vis
        q = self.sca.to_q(x.float())
        out = sdpa(attn, q, self.sca.to_k(vis), self.sca.to_v(vis))
        f_sca = self.sca.to_out(out)
        k = keep.to(device=x.device, dtype=torch.float32).view(-1, 1, 1)
        k = k.expand(b, 1, 1) if k.shape[0] == 1 else k
        res = x.float() + lam * k * f_sca
        if ndim4:
            res = res.transpose(1, 2).reshape(b, c, h, w)
        return res.to(f_text.dtype)


def mix_wplus(coarse_from: Tensor, fine_from: Tensor, coarse_layers: int) -> Tensor:
    """Style mixing: layers [0, coarse_layers) of ``coarse_from``, the rest of ``fine_from`` (both (B, 18, 512))."""
    if coarse_from.shape != fine_from.shape:
        raise ValueError(f"w+ shapes differ: {tuple(coarse_from.shape)} vs {tuple(fine_from.shape)}")
    out = fine_from.clone()
    out[:, :coarse_layers] = coarse_from[:, :coarse_layers]
    return out


@register_method
class PIDiff(PersonalizedMethod):
    name: ClassVar[str] = "pidiff"
    Config: ClassVar[type[MethodConfig]] = PIDiffConfig
    config: PIDiffConfig

    def __init__(self, config: PIDiffConfig | None = None, encoder: nn.Module | None = None) -> None:
        super().__init__(config)
        self._encoder = encoder
        self._empty_text: Any = None
        self._wplus_cache: dict[bytes, Tensor] = {}

    # -- construction -------------------------------------------------------------------------------------------

    @property
    def encoder(self) -> nn.Module:
        """The frozen W+ encoder (loaded on first use; not part of the checkpoint)."""
        if self._encoder is None:
            from idforge.methods.wplus_encoder import load_wplus_encoder

            cfg = self.config
            self._encoder = load_wplus_encoder(cfg.encoder_path, cfg.encoder_image_size, cfg.encoder_width)
        self._encoder.requires_grad_(False).eval()
        return self._encoder

    def build(self, pipe: Any) -> None:
        unet = pipe.unet
        sites = select_sites(unet, "cross")
        dims = {s.context_dim for s in sites}
        if len(dims) != 1:
            raise ValueError(f"PIDiff needs one cross-attention width, this UNet has {sorted(dims)}")
        self.modules["mapping"] = MappingNetwork(dims.pop(), self.config.num_tokens, self.config.mapping_hidden)
        self.modules["sca"] = nn.ModuleDict({s.key: StyleCrossAttention(attention_module(unet, s)) for s in sites})
        self.modules["identity"] = IdentityWPlus()

    def make_processors(self, pipe: Any) -> dict[str, Any]:
        current = pipe.unet.attn_processors
        sca = self.modules["sca"]
        return route(pipe.unet, cross_attn=lambda s: SCAProcessor(current[s.name], sca[s.key], self.state))

    def on_attach(self, pipe: Any) -> None:
        super().on_attach(pipe)
        self._empty_text = None
        self.encoder.to(pipe.unet.device)

    def prepare_identity(self, refs: IdentityRefs, pipe: Any) -> None:
        """Remember the identity's mean w+ (from ``refs.face_crops``) for generation from the artifact."""
        self.modules["identity"].wplus.copy_(self.identity_condition(refs, pipe).tensors["wplus"])

    # -- identity -----------------------------------------------------------------------------------------------

    def wplus(self, images: Tensor) -> Tensor:
        """(N, 3, H, W) aligned faces in [0, 1] -> (N, 18, 512) w+ (frozen encoder, no grad).

        The encoder is frozen and in eval mode, so w+ is a pure function of the pixels: results are cached by
        content hash (an identity's few training crops are encoded once, not at every step).
        """
        import hashlib

        enc = self.encoder
        dev = next(enc.parameters()).device
        x = images.float()
        keys = [hashlib.blake2b(row.detach().cpu().numpy().tobytes(), digest_size=16).digest() for row in x]
        missing = [i for i, k in enumerate(keys) if k not in self._wplus_cache]
        if missing:
            with torch.no_grad():
                new = enc(x[missing].to(dev)).to(self.device)
            if len(self._wplus_cache) + len(missing) > 1024:
                self._wplus_cache.clear()
            for i, w in zip(missing, new, strict=True):
                self._wplus_cache[keys[i]] = w
        return torch.stack([self._wplus_cache[k] for k in keys]).to(self.device)

    def identity_condition(self, refs: IdentityRefs | None, pipe: Any, style_refs: IdentityRefs | None = None
                           ) -> Condition:
        """{"wplus": (1, 18, 512) mean w+ of the reference crops, "keep": (1,)}.

        Without ``refs.face_crops`` the trained identity's stored w+ is used (see ``sample_condition``).

        ``style_refs``: style mixing, coarse layers from ``style_refs`` and fine layers from ``refs``.
        """
        if refs is None or refs.face_crops is None:
            # No photos given: the trained identity's own w+ (saved in the artifact by prepare_identity).
            w = self.sample_condition(pipe).tensors["wplus"]
        else:
            w = self.wplus(refs.face_crops).mean(0, keepdim=True)
        if style_refs is not None:
            style_refs.require("face_crops")
            w = mix_wplus(self.wplus(style_refs.face_crops).mean(0, keepdim=True), w, self.config.coarse_layers)
        return Condition(self.name, {"wplus": w, "keep": torch.ones(1, device=w.device)})

    def style_mix(self, coarse: Condition, fine: Condition) -> Condition:
        """A condition with ``coarse``'s coarse w+ layers and ``fine``'s fine layers."""
        w = mix_wplus(coarse.tensors["wplus"], fine.tensors["wplus"], self.config.coarse_layers)
        return Condition(self.name, {"wplus": w, "keep": fine.tensors["keep"].clone()})

    def sample_condition(self, pipe: Any) -> Condition:
        """The trained identity's condition (its mean w+ saved by ``prepare_identity``)."""
        w = self.modules["identity"].wplus.detach().clone()
        if not bool(w.abs().sum() > 0):
            raise ValueError("no identity w+ stored: call prepare_identity(refs, pipe) or pass refs")
        return Condition(self.name, {"wplus": w, "keep": torch.ones(1, device=w.device)})

    def denoise(self, pipe: Any, latents: Tensor, t: Tensor, text: Any, cond: Condition) -> Tensor:
        from idforge.diffusion.text import unet_call

        visual = self.modules["mapping"](cond.tensors["wplus"].to(self.device))
        with self.conditioning({"visual": visual, "keep": cond.tensors["keep"]}):
            return unet_call(pipe, latents, t, text)

    # -- training -----------------------------------------------------------------------------------------------

    def training_loss(self, batch: TrainBatch, pipe: Any, *, generator: torch.Generator | None = None
                      ) -> dict[str, Tensor]:
        """{"loss", "diffusion"}; needs latents, input_ids (or text_embeds) and ref_pixels (aligned crops)."""
        from idforge.diffusion.text import TextCondition, encode_prompts

        batch.require("latents", "ref_pixels")
        cfg = self.config
        b = batch.batch_size
        dev = batch.latents.device
        gen_dev = generator.device if generator is not None else "cpu"

        def rand(*shape: int) -> Tensor:
            return torch.rand(shape, generator=generator, device=gen_dev).to(dev)

        w = self.wplus(batch.ref_pixels)
        if cfg.wplus_noise > 0:
            w = w + cfg.wplus_noise * torch.randn(w.shape, generator=generator, device=gen_dev).to(w.device)
        keep = (rand(b) >= cfg.visual_dropout).float()
        text = self.encode_batch_text(pipe, batch)
        if cfg.text_dropout > 0:
            if self._empty_text is None:
                with torch.no_grad():
                    self._empty_text = encode_prompts(pipe, [""])
            drop = (rand(b) < cfg.text_dropout).view(b, 1, 1)
            empty = self._empty_text.hidden.to(text.hidden.device, text.hidden.dtype).expand_as(text.hidden)
            pooled = text.pooled
            if pooled is not None:
                ep = self._empty_text.pooled.to(pooled.device, pooled.dtype).expand_as(pooled)
                pooled = torch.where(drop.view(b, 1), ep, pooled)
            text = TextCondition(torch.where(drop, empty, text.hidden), pooled)
        visual = self.modules["mapping"](w)
        with self.conditioning({"visual": visual, "keep": keep}):
            out = diffusion_loss(self.denoise_fn(pipe, text, batch), batch.latents, self._scheduler,
                                 noise=batch.noise, timesteps=batch.timesteps, generator=generator)
        return {"loss": out.loss, "diffusion": out.loss.detach()}
