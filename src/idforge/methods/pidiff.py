"""PIDiff (2025): personalised identity through StyleGAN's W+ space and Style Cross-Attention (SCA).

- Visual Guidance Module: e4e's released FFHQ encoder (``idforge.methods.e4e``, frozen; ``encoder_path`` names
  ``e4e_ffhq_encode.pt``, without it PIDiff refuses to run) maps the aligned face to w+ (18, 512). Its input is
  ``wplus_pixels``: the FFHQ-aligned crop at 256 px in [-1, 1] with the background replaced by WHITE (our person
  matte; white as W+ Adapter's reference pipeline fills it, ``x (1 - m) + m`` in [-1, 1]), never the 112 ArcFace
  crop. The trainable mapping network F turns w+ into 4 visual tokens of the text width: one linear per group of
  w+ rows [0:4], [4:8], [8:12], [12:18] (coarse to fine) and a shared LayerNorm (W+ Adapter's mapper; PIDiff
  gives F's output 4 x 768, §2.2.2, not its layers).
- SCA after every text cross-attention (attn2): ``f = f_text + lambda * f_SCA`` with
  ``f_SCA = Out(softmax(Q K^T / sqrt(d)) V)``, ``Q = f_text W_q'``, ``K = F(w+) W_k'``, ``V = F(w+) W_v'``.
  W_q', W_k', W_v' start as copies of the text cross-attention's (§2.2.4) and train; ``Out`` is that layer's own
  frozen ``to_out`` (§2.2.4 trains only W_q', W_k', W_v' and F). On SD1.5: 16 layers, 31.56 M + F 7.08 M = 38.64 M
  trainable (Table 8: 38.5 M). lambda is 1 in training and ``scale`` (0.4, §3.4.8) at inference; 0 = base model.
- The pseudo-word S* stands for the identity in prompts (§2.2.1: it replaces "person", whose prior the paper
  avoids). Its embedding does not train (§2.2.4), so S* is a rare existing token (``pseudo_word``, DreamBooth's
  "sks"): ours, the paper does not name the token.
- Training recipe: AdamW lr 1e-4, weight decay 0.01, batch 4, 600 steps (§3.1); per-sample dropout of the visual
  condition (p 0.5: SCA off for that sample) and of the text (p 0.3: the empty prompt), Gaussian noise on w+ (the
  amount is not stated: 0.05 is ours). Sampling: DDIM, 50 steps (§3.1; the preset sets them).
- Style mixing: ``mix_wplus(a, b, coarse)`` takes the coarse layers (default 0-6) from one w+ and the fine ones from
  another (``identity_condition(refs, style_refs=...)``).

Conditions carry ``{"wplus": (1, 18, 512), "keep": (1,)}``; the unconditional branch (zeros) has keep 0 = no SCA,
the same "no visual prompt" the visual dropout trains.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, ClassVar

import torch
from pydantic import Field
from torch import Tensor, nn

from idforge.diffusion.attention import attention_module, route, sdpa, select_sites
from idforge.errors import ConfigError
from idforge.methods.base import MethodConfig
from idforge.methods.e4e import IMAGE_SIZE, N_STYLES, STYLE_DIM
from idforge.methods.objective import diffusion_loss
from idforge.methods.personalized import DEFAULT_TEMPLATES, PersonalizedConfig, PersonalizedMethod, TrainRecipe
from idforge.methods.registry import register_method
from idforge.methods.types import Condition, IdentityRefs, TrainBatch

# F's row groups of w+ (coarse -> fine), one visual token each (W+ Adapter's mapper layout).
WPLUS_GROUPS = ((0, 4), (4, 8), (8, 12), (12, 18))

NO_ENCODER = ("pidiff needs e4e's released FFHQ encoder: download e4e_ffhq_encode.pt "
              "(github.com/omertov/encoder4editing) and set --set finetune.method_config.encoder_path=/path/to/"
              "e4e_ffhq_encode.pt (a random encoder is not PIDiff)")


class PIDiffConfig(PersonalizedConfig):
    scale: float = Field(default=0.4, description="inference lambda of SCA (paper 0.4); training uses 1")
    encoder_path: str | None = Field(default=None, description="e4e_ffhq_encode.pt, as released; required")
    encoder_image_size: int = Field(default=IMAGE_SIZE, ge=16,
                                    description="e4e input side (256 as e4e; smaller only for fast tests)")
    pseudo_word: str = Field(default="sks", min_length=1, description="S*: the word for the identity in prompts")
    visual_dropout: float = Field(default=0.5, ge=0, le=1)
    text_dropout: float = Field(default=0.3, ge=0, le=1)
    wplus_noise: float = Field(default=0.05, ge=0, description="std of Gaussian noise added to w+ in training")
    coarse_layers: int = Field(default=7, ge=0, le=N_STYLES, description="style mixing: layers [0, k) are coarse")
    templates: list[str] = Field(default_factory=lambda: ["an image of {}", *DEFAULT_TEMPLATES],
                                 description="training captions (§2.2.1: 'an image of S*', 'a cropped photo of S*')")
    train: TrainRecipe = Field(default_factory=lambda: TrainRecipe(steps=600, batch_size=4, lr=1e-4,
                                                                   weight_decay=0.01))


class WPlusMapper(nn.Module):
    """F: w+ (B, 18, 512) -> 4 visual tokens (B, 4, D): one Linear per row group, then a shared LayerNorm.

    Parameters (D = 768): 3 x (2048 D + D) + (3072 D + D) + 2 D = 7,082,496.
    """

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.proj = nn.ModuleList(nn.Linear((b - a) * STYLE_DIM, dim) for a, b in WPLUS_GROUPS)
        self.norm = nn.LayerNorm(dim)

    def forward(self, wplus: Tensor) -> Tensor:
        w = wplus.float()
        tokens = [lin(w[:, a:b].flatten(1)) for lin, (a, b) in zip(self.proj, WPLUS_GROUPS, strict=True)]
        return self.norm(torch.stack(tokens, dim=1))


class IdentityWPlus(nn.Module):
    """The trained identity's mean w+ (``wplus`` (1, 18, 512) buffer), so the artifact generates without photos."""

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("wplus", torch.zeros(1, N_STYLES, STYLE_DIM))


class StyleCrossAttention(nn.Module):
    """SCA's trainable projections of one layer, initialised from its text cross-attention's to_q/k/v."""

    def __init__(self, attn: nn.Module) -> None:
        super().__init__()

        def clone(lin: nn.Linear) -> nn.Linear:
            new = nn.Linear(lin.in_features, lin.out_features, bias=lin.bias is not None,
                            device=lin.weight.device)
            new.load_state_dict({k: v.detach().float().clone() for k, v in lin.state_dict().items()},
                                assign=lin.weight.is_meta)
            return new

        self.to_q = clone(attn.to_q)
        self.to_k = clone(attn.to_k)
        self.to_v = clone(attn.to_v)


class SCAProcessor:
    """Text cross-attention (the original processor) followed by Style Cross-Attention over ``context["visual"]``.

    SCA's output projection is the layer's own frozen ``to_out`` (not a trained copy).
    """

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
        f_sca = attn.to_out[0](out.to(attn.to_out[0].weight.dtype)).float()
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

    def __init__(self, config: PIDiffConfig | None = None) -> None:
        super().__init__(config)
        self._encoder: nn.Module | None = None
        self._empty_text: Any = None
        self._wplus_cache: dict[bytes, Tensor] = {}

    # -- construction -------------------------------------------------------------------------------------------

    def check_encoder(self) -> Path:
        """The configured e4e checkpoint; ``ConfigError`` saying where to put it when none is configured/there."""
        path = self.config.encoder_path
        if not path:
            raise ConfigError(NO_ENCODER)
        if not Path(path).is_file():
            raise ConfigError(f"pidiff encoder_path {path} does not exist: " + NO_ENCODER.split(": ", 1)[1])
        return Path(path)

    @property
    def encoder(self) -> nn.Module:
        """The frozen e4e encoder (loaded on first use, onto the UNet's device; not part of the checkpoint)."""
        if self._encoder is None:
            from idforge.methods.e4e import load_e4e

            self._encoder = load_e4e(self.check_encoder(), device=self.device,
                                     image_size=self.config.encoder_image_size)
        return self._encoder

    def identity_phrase(self, class_noun: str = "person") -> str:
        """S* replaces the class noun (§2.2.1: "an image of S*")."""
        return self.config.pseudo_word

    def build(self, pipe: Any) -> None:
        unet = pipe.unet
        sites = select_sites(unet, "cross")
        dims = {s.context_dim for s in sites}
        if len(dims) != 1:
            raise ValueError(f"PIDiff needs one cross-attention width, this UNet has {sorted(dims)}")
        dim = dims.pop()
        device = unet.device
        with torch.device(device):
            self.modules["mapping"] = WPlusMapper(dim)
            self.modules["sca"] = nn.ModuleDict({s.key: StyleCrossAttention(attention_module(unet, s))
                                                 for s in sites})
            self.modules["identity"] = IdentityWPlus()

    def make_processors(self, pipe: Any) -> dict[str, Any]:
        current = pipe.unet.attn_processors
        sca = self.modules["sca"]
        return route(pipe.unet, cross_attn=lambda s: SCAProcessor(current[s.name], sca[s.key], self.state))

    def attach(self, pipe: Any) -> None:
        self.check_encoder()  # refuse to train or generate without e4e's weights (a random encoder is not PIDiff)
        super().attach(pipe)

    def on_attach(self, pipe: Any) -> None:
        super().on_attach(pipe)
        self._empty_text = None
        if self._encoder is not None:
            self._encoder.to(pipe.unet.device)

    def prepare_identity(self, refs: IdentityRefs, pipe: Any) -> None:
        """Remember the identity's mean w+ (from ``refs.wplus_pixels``) for generation from the artifact."""
        refs.require("wplus_pixels")
        self.modules["identity"].wplus.copy_(self.identity_condition(refs, pipe).tensors["wplus"])

    # -- identity -----------------------------------------------------------------------------------------------

    def wplus(self, images: Tensor) -> Tensor:
        """(N, 3, H, W) in [-1, 1], background-removed FFHQ-aligned faces -> (N, 18, 512) w+ (frozen e4e).

        The encoder is frozen and in eval mode, so w+ is a pure function of the pixels: results are cached by
        content hash (an identity's few training crops are encoded once, not at every step).
        """
        import hashlib

        enc = self.encoder
        x = images.float()
        keys = [hashlib.blake2b(row.detach().cpu().numpy().tobytes(), digest_size=16).digest() for row in x]
        missing = [i for i, k in enumerate(keys) if k not in self._wplus_cache]
        if missing:
            with torch.no_grad():
                new = enc(x[missing]).to(self.device)
            if len(self._wplus_cache) + len(missing) > 1024:
                self._wplus_cache.clear()
            for i, w in zip(missing, new, strict=True):
                self._wplus_cache[keys[i]] = w
        return torch.stack([self._wplus_cache[k] for k in keys]).to(self.device)

    def identity_condition(self, refs: IdentityRefs | None, pipe: Any, style_refs: IdentityRefs | None = None
                           ) -> Condition:
        """{"wplus": (1, 18, 512) mean w+ of ``refs.wplus_pixels``, "keep": (1,)}.

        Without ``refs.wplus_pixels`` (e.g. references that were not matted) the trained identity's stored w+ is
        used (see ``sample_condition``): the 112 ArcFace crops are never fed to e4e.

        ``style_refs``: style mixing, coarse layers from ``style_refs`` and fine layers from ``refs``.
        """
        if refs is None or refs.wplus_pixels is None:
            # No matted photos given: the trained identity's own w+ (saved in the artifact by prepare_identity).
            w = self.sample_condition(pipe).tensors["wplus"]
        else:
            w = self.wplus(refs.wplus_pixels).mean(0, keepdim=True)
        if style_refs is not None:
            style_refs.require("wplus_pixels")
            w = mix_wplus(self.wplus(style_refs.wplus_pixels).mean(0, keepdim=True), w, self.config.coarse_layers)
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
        """{"loss", "diffusion"}; needs latents, input_ids (or text_embeds) and wplus_pixels (e4e's input)."""
        from idforge.diffusion.text import TextCondition, encode_prompts

        batch.require("latents", "wplus_pixels")
        cfg = self.config
        b = batch.batch_size
        dev = batch.latents.device
        gen_dev = generator.device if generator is not None else "cpu"

        def rand(*shape: int) -> Tensor:
            return torch.rand(shape, generator=generator, device=gen_dev).to(dev)

        w = self.wplus(batch.wplus_pixels)
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
