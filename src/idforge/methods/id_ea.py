"""ID-EA (Jin et al., 2025): textual inversion whose pseudo-tokens are initialised and guided by the identity.

- Textual ID anchor: the mean input embedding of a list of well-known names (``configs/id_ea_anchor_names.txt``,
  one name per line): a point of the text embedding space where "a person's name" lives.
- ID-Enhancer (``self.enhancer``, trained, not saved): the ArcFace embedding f (512) of the identity fused with the
  anchor a into ``num_tokens`` identity-enhanced embeddings ``e_k = a + W_k f`` (in the token-embedding space, D).
  They initialise the pseudo-token vectors v_k (cross-initialisation guided by the face instead of a fixed word).
- ID-Adapter (``modules["adapter"]``): on every text cross-attention layer a decoupled key/value branch reads the
  identity-enhanced embedding, ``out = Attn(q, K_text, V_text) + scale * tanh(g) * Attn(q, W_k e, W_v e)``, with
  W_k/W_v initialised from the layer's own to_k/to_v and the gate g = 0 (an untrained adapter changes nothing).
  The text condition's keys/values are thereby adapted by the identity so the pseudo-words find the face region.
- Loss: diffusion MSE + ``reg_weight`` * mean squared L2 norm of v (the paper's embedding regularisation, 8e-4).

Paper defaults (``train_arcross_adapter_kv.py`` command): 2 pseudo-tokens, 320 steps, batch 8, lr 0.0015 scaled by
the batch (``--scale_lr``), reg 8e-4, SD2.1-base. The artifact is ``learned_embeds.safetensors`` holding the learned
vectors (``embeds.``), the adapter (``adapter.``) and the identity-enhanced tokens it reads (``id_tokens.``); load it
and prompt with e.g. ``"{} wearing an oversized sweater"`` (``{}`` = the pseudo-words).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, ClassVar

import torch
from pydantic import Field
from torch import Tensor, nn

from idforge.diffusion.attention import context_of, finish, prepare, route, sdpa
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
from idforge.methods.textual_inversion import TokenVectors, placeholder_words
from idforge.methods.types import Condition, IdentityRefs, TrainBatch

log = logging.getLogger(__name__)


def default_anchor_file() -> Path:
    """``configs/id_ea_anchor_names.txt`` of the source checkout (the repository root holds ``configs/``)."""
    return Path(__file__).resolve().parents[3] / "configs" / "id_ea_anchor_names.txt"


def read_anchor_names(path: str | Path | None = None) -> list[str]:
    """Names from a text file (one per line, '#' comments and blank lines ignored).

    Raises:
        ValueError: the file is missing or holds no names (the message names the file and the config key).
    """
    p = Path(path) if path is not None else default_anchor_file()
    if not p.is_file():
        raise ValueError(f"ID-EA anchor names file {p} does not exist; set id_ea anchor_names_file to a text file "
                         "with one well-known name per line")
    names = [ln.strip() for ln in p.read_text().splitlines() if ln.strip() and not ln.strip().startswith("#")]
    if not names:
        raise ValueError(f"ID-EA anchor names file {p} holds no names")
    return names


class IDEAConfig(PersonalizedConfig):
    num_tokens: int = Field(default=2, ge=1, description="pseudo-tokens (paper: --n_persudo_tokens 2)")
    placeholder: str = Field(default="<idea>")
    face_dim: int = Field(default=512, ge=1, description="ArcFace embedding size")
    anchor_names_file: str | None = Field(default=None, description="None = configs/id_ea_anchor_names.txt")
    enhancer_init_std: float = Field(default=0.01, ge=0, description="init std of the face->token projection")
    reg_weight: float = Field(default=8e-4, ge=0, description="embedding L2 regularisation (paper 8e-4)")
    sample_prompt: str = "{} wearing an oversized sweater"
    train: TrainRecipe = Field(default_factory=lambda: TrainRecipe(steps=320, batch_size=8, lr=0.0015, scale_lr=True))


class IDEnhancer(nn.Module):
    """face (B, face_dim) -> identity-enhanced embeddings (B, n, D) = anchor + W face (per token)."""

    def __init__(self, face_dim: int, dim: int, n: int, anchor: Tensor, init_std: float) -> None:
        super().__init__()
        self.n, self.dim = n, dim
        self.proj = nn.Linear(face_dim, n * dim)
        nn.init.normal_(self.proj.weight, std=init_std)
        nn.init.zeros_(self.proj.bias)
        self.register_buffer("anchor", anchor.detach().clone().float())

    def forward(self, face: Tensor) -> Tensor:
        delta = self.proj(face.float()).view(face.shape[0], self.n, self.dim)
        return self.anchor + delta


class KVAdapter(nn.Module):
    """Decoupled key/value projections of the identity tokens for one cross-attention layer, and its gate."""

    def __init__(self, attn: nn.Module) -> None:
        super().__init__()
        self.to_k = nn.Linear(attn.to_k.in_features, attn.to_k.out_features, bias=False)
        self.to_v = nn.Linear(attn.to_v.in_features, attn.to_v.out_features, bias=False)
        with torch.no_grad():
            self.to_k.weight.copy_(attn.to_k.weight.float())
            self.to_v.weight.copy_(attn.to_v.weight.float())
        self.gate = nn.Parameter(torch.zeros(1))


class IDTokens(nn.Module):
    """The identity-enhanced tokens the adapter reads at inference: ``tokens`` (n, D), a persistent buffer."""

    def __init__(self, n: int, dim: int) -> None:
        super().__init__()
        self.register_buffer("tokens", torch.zeros(n, dim))


class IDEACrossAttnProcessor:
    """Text cross-attention plus the gated ID-Adapter branch over ``state.context["id"]`` (B, n, D).

    Without identity tokens or at scale 0 it computes exactly ``AttnProcessor2_0``'s output.
    """

    def __init__(self, adapter: KVAdapter, state: Any) -> None:
        self.adapter = adapter
        self.state = state

    def __call__(self, attn: Any, hidden_states: Tensor, encoder_hidden_states: Tensor | None = None,
                 attention_mask: Tensor | None = None, temb: Tensor | None = None, *args: Any, **kwargs: Any
                 ) -> Tensor:
        ctx_len = None if encoder_hidden_states is None else encoder_hidden_states.shape[1]
        prep = prepare(attn, hidden_states, attention_mask, temb, context_len=ctx_len)
        ctx = context_of(attn, prep.hidden, encoder_hidden_states)
        q = attn.to_q(prep.hidden)
        out = sdpa(attn, q, attn.to_k(ctx), attn.to_v(ctx), prep.mask)
        tokens = self.state.context.get("id")
        if tokens is not None and self.state.scale != 0:
            b = q.shape[0]
            tok = tokens.to(device=q.device, dtype=torch.float32)
            tok = tok.expand(b, *tok.shape[1:]) if tok.shape[0] == 1 else tok
            k = self.adapter.to_k(tok).to(q.dtype)
            v = self.adapter.to_v(tok).to(q.dtype)
            extra = sdpa(attn, q, k, v)
            out = out + (self.state.scale * torch.tanh(self.adapter.gate)).to(q.dtype) * extra
        return finish(attn, out, prep)


@register_method
class IDEA(PersonalizedMethod):
    name: ClassVar[str] = "id-ea"
    Config: ClassVar[type[MethodConfig]] = IDEAConfig
    artifact_file: ClassVar[str] = "learned_embeds.safetensors"
    config: IDEAConfig

    def __init__(self, config: IDEAConfig | None = None) -> None:
        super().__init__(config)
        self.tokens = PlaceholderTokens(placeholder_words(self.config.placeholder, self.config.num_tokens))
        self.enhancer: IDEnhancer | None = None
        self._identity_face: Tensor | None = None  # (1, face_dim) mean face of the identity, set by prepare_identity

    def identity_phrase(self, class_noun: str = "person") -> str:
        return self.tokens.phrase

    # -- construction -------------------------------------------------------------------------------------------

    def build(self, pipe: Any) -> None:
        from idforge.diffusion.attention import attention_module, select_sites

        cfg = self.config
        dim = pipe.text_encoder.get_input_embeddings().embedding_dim
        anchor = token_embedding(pipe, read_anchor_names(cfg.anchor_names_file))
        self.enhancer = IDEnhancer(cfg.face_dim, dim, cfg.num_tokens, anchor, cfg.enhancer_init_std)
        embeds = TokenVectors(cfg.num_tokens, dim)
        with torch.no_grad():
            embeds.vectors.copy_(anchor.expand(cfg.num_tokens, dim))
        self.modules["embeds"] = embeds
        self.modules["id_tokens"] = IDTokens(cfg.num_tokens, dim)
        self.modules["adapter"] = nn.ModuleDict({
            s.key: KVAdapter(attention_module(pipe.unet, s)) for s in select_sites(pipe.unet, "cross")})

    def make_processors(self, pipe: Any) -> dict[str, Any]:
        adapters = self.modules["adapter"]
        return route(pipe.unet, cross_attn=lambda s: IDEACrossAttnProcessor(adapters[s.key], self.state))

    def on_attach(self, pipe: Any) -> None:
        super().on_attach(pipe)
        self.tokens.install(pipe)
        if self.enhancer is not None:
            self.enhancer.to(device=pipe.unet.device, dtype=torch.float32)

    def trainable_parameters(self) -> list[nn.Parameter]:
        """Pseudo-token vectors, adapter, and the ID-Enhancer (which the artifact does not keep)."""
        params = super().trainable_parameters()
        if self.enhancer is not None:
            params += [p for p in self.enhancer.parameters() if p.requires_grad]
        return params

    @property
    def vectors(self) -> Tensor:
        return self.modules["embeds"].vectors

    # -- identity -----------------------------------------------------------------------------------------------

    def prepare_identity(self, refs: IdentityRefs, pipe: Any) -> None:
        """Initialise the pseudo-tokens from the identity-enhanced embedding of the references' mean face."""
        refs.require("face_embeds")
        if self.enhancer is None:
            raise ValueError("attach the method to a pipeline before prepare_identity")
        face = torch.nn.functional.normalize(refs.face_embeds.float().mean(0, keepdim=True), dim=-1)
        self._identity_face = face.to(self.device)
        with torch.no_grad():
            e = self.enhancer(self._identity_face)[0]
            self.vectors.copy_(e)
            self.modules["id_tokens"].tokens.copy_(e)

    def identity_condition(self, refs: IdentityRefs | None, pipe: Any) -> Condition:
        """{"id": (1, n, D)}: the identity-enhanced tokens of the trained identity (saved in the artifact).

        ``refs`` are not needed: the identity is the one ``prepare_identity``/training fixed.
        """
        return Condition(self.name, {"id": self.modules["id_tokens"].tokens[None].detach()})

    def encode_prompts(self, pipe: Any, prompts: Any, cond: Condition | None) -> Any:
        on = cond is not None and self.state.scale != 0 and bool(cond.tensors["id"].abs().sum() > 0)
        return self.tokens.encode(pipe, prompts, self.vectors if on else None)

    # -- training -----------------------------------------------------------------------------------------------

    def training_loss(self, batch: TrainBatch, pipe: Any, *, generator: torch.Generator | None = None
                      ) -> dict[str, Tensor]:
        """{"loss", "diffusion", "reg"}; needs latents, input_ids (with the pseudo-words) and face_embeds."""
        batch.require("latents", "input_ids", "face_embeds")
        assert self.enhancer is not None
        face = torch.nn.functional.normalize(batch.face_embeds.float().mean(1), dim=-1).to(self.device)
        e = self.enhancer(face)  # (B, n, D)
        with torch.no_grad():
            # What inference reads: the enhanced embedding of the identity's mean face (of this batch without one).
            ident = self.enhancer(self._identity_face)[0] if self._identity_face is not None else e.mean(0)
            self.modules["id_tokens"].tokens.copy_(ident)
        text = self.tokens.encode_ids(pipe, batch.input_ids, self.vectors)
        with self.conditioning({"id": e}):
            out = diffusion_loss(self.denoise_fn(pipe, text, batch), batch.latents, self._scheduler,
                                 noise=batch.noise, timesteps=batch.timesteps, generator=generator)
        reg = self.vectors.float().pow(2).sum(-1).mean()
        loss = out.loss + self.config.reg_weight * reg
        return {"loss": loss, "diffusion": out.loss.detach(), "reg": reg.detach()}

    def artifact_extra(self) -> dict[str, Any]:
        return {"placeholders": self.tokens.words, "prompt_template": self.config.sample_prompt}
