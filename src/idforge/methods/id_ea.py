"""ID-EA (Jin, Kim, Lee; SMC 2025): textual inversion guided by the identity, as its authors released it.

What the release (``github.com/Whslee/ID-EA``, ``train.py`` at 9481a95) does, and so what we do:

- Two pseudo-words ``<idea-0> <idea-1>`` (``modules["embeds"]``, (2, D)) are the only thing inference uses.
- Cross-Initialisation (release ``utils.py``, ``celeb_names_cross_init``): over a list of well-known names
  (the release's 691-line ``wiki_names_v2.txt``, packaged as ``idforge/resources/id_ea_anchor_names.txt``) average
  the input embeddings of each name's 1st and of its 2nd token; run ``BOS m1 m2 EOS PAD...`` through the frozen text
  encoder and take the OUTPUT states at positions 1-2 as the tokens' initial INPUT embeddings (``cross_init``).
- ID-Adapter (``IDAdapter``): acts once, on the text-encoder output, before the UNet: the 77 text tokens plus the
  2 fused identity tokens (``fc1``: 2D -> D) go through one multi-head self-attention (8 heads) and the first 77
  come out gated, ``y + 0.4 * tanh(gamma) * S`` with scalar gamma = 0 at the start (GLIGEN-style: an untrained
  adapter changes nothing). Every cross-attention layer sees the same adapted context; no per-layer branch.
- Loss: the diffusion MSE plus 8e-4 x the mean Mahalanobis distance of the tokens to their initial embeddings,
  with the covariance of those initial embeddings plus 2e-5 I, pseudo-inverted (``mahalanobis``).
- Recipe: one AdamW group at 0.0015 x batch 8 (``--scale_lr``), eps 1e-7, weight decay 1e-2, constant lr, 320
  steps; one image of the identity, flipped with p = 0.5; captions from the release's ImageNet templates filled
  with ``"face of <v0> <v1> person"`` (``idforge/resources/id_ea_prompt_templates.txt``).
- Inference: only the two learned embeddings in the stock SD2.1-base pipeline (DPM-Solver, 50 steps, CFG 7.5). The
  artifact therefore holds only ``embeds.`` (``state_dict``), though ``modules`` holds everything that trains
  (``embeds``, ``adapter``, ``enhancer``); ``adapter_at_inference=True`` also saves the adapter and the identity's
  fused tokens (``id_tokens.``) and applies the adapter to the conditional prompts when sampling.

Where we differ from the release, and why:

- ID-Enhancer (``IDEnhancer``): the release builds it (ArcFace 512 -> Linear(512, D) copied into 2 queries, keys and
  values the 2 cross-init embeddings through their own Linear(D, D) each, ``MultiheadAttention(D, 8)``, then
  Linear(D, 2D)) but never gives it to the optimiser, so it is a fixed random projection that changes on every run.
  The paper describes a trained Enhancer fusing the ArcFace feature with the name anchor by cross-attention, so ours
  is the same architecture and trains in the same AdamW group. It is not saved (inference does not use it).
- Face input: the release reads the face from a hard-coded path (``input_images/00006/00006.jpg``, whatever the
  training folder) through timm's ``vit_tiny_patch8_112.arcface_ms1mv3``; ours is the identity's own curated
  ArcFace embedding (L2-normalised 512-d, as the release's is), averaged over the training images.
- The release marks the UNet's ``to_k``/``to_v`` trainable but never optimises them: they stay frozen here too.
- The release's CLIP encoder accepts ``inputs_embeds``; we write the vectors at the placeholder positions with a
  token hook on the stock encoder (``PlaceholderTokens``), which computes the same output.
"""

from __future__ import annotations

import logging
from importlib import resources
from pathlib import Path
from typing import Any, ClassVar

import torch
from pydantic import Field
from torch import Tensor, nn

from idforge.methods.base import MethodConfig, check_state_keys
from idforge.methods.objective import diffusion_loss
from idforge.methods.personalized import PersonalizedConfig, PersonalizedMethod, PlaceholderTokens, TrainRecipe
from idforge.methods.registry import register_method
from idforge.methods.textual_inversion import TokenVectors, placeholder_words
from idforge.methods.types import IdentityRefs, TrainBatch

log = logging.getLogger(__name__)

ANCHOR_NAMES = "id_ea_anchor_names.txt"
PROMPT_TEMPLATES = "id_ea_prompt_templates.txt"


def _resource_lines(name: str) -> list[str]:
    """Non-comment, non-blank lines of a packaged resource file (``idforge/resources/<name>``)."""
    text = resources.files("idforge").joinpath("resources", name).read_text(encoding="utf-8")
    return [ln.strip() for ln in text.splitlines() if ln.strip() and not ln.strip().startswith("#")]


def read_anchor_names(path: str | Path | None = None) -> list[str]:
    """Names from a text file (one per line, '#' comments and blank lines ignored); None = the released list.

    Raises:
        ValueError: the file is missing or holds no names (the message names the file and the config key).
    """
    if path is None:
        return _resource_lines(ANCHOR_NAMES)
    p = Path(path)
    if not p.is_file():
        raise ValueError(f"ID-EA anchor names file {p} does not exist; set id_ea anchor_names_file to a text file "
                         "with one well-known name per line (or leave it unset for the released list)")
    names = [ln.strip() for ln in p.read_text().splitlines() if ln.strip() and not ln.strip().startswith("#")]
    if not names:
        raise ValueError(f"ID-EA anchor names file {p} holds no names")
    return names


def release_templates() -> list[str]:
    """The release's 81 training captions, ``{}`` = the pseudo-words (``"a photo of a face of {} person"``...)."""
    return _resource_lines(PROMPT_TEMPLATES)


class IDEAConfig(PersonalizedConfig):
    num_tokens: int = Field(default=2, ge=1, description="pseudo-tokens (release: --n_persudo_tokens 2)")
    placeholder: str = Field(default="<idea>")
    face_dim: int = Field(default=512, ge=1, description="ArcFace embedding size")
    anchor_names_file: str | None = Field(default=None, description="None = the release's name list (packaged)")
    heads: int = Field(default=8, ge=1, description="heads of the Enhancer's and the Adapter's attention (release 8)")
    adapter_beta: float = Field(default=0.4, description="beta of y + beta*tanh(gamma)*S (release train.py l.320)")
    adapter_at_inference: bool = Field(default=False, description="apply the ID-Adapter when sampling (release: no)")
    reg_weight: float = Field(default=8e-4, ge=0, description="weight of the Mahalanobis regulariser (release 8e-4)")
    reg_ridge: float = Field(default=2e-5, gt=0, description="added to the covariance's diagonal (release 2e-5)")
    templates: list[str] = Field(default_factory=release_templates,
                                 description="training captions ('{}' = the pseudo-words); the release's by default")
    sample_prompt: str = "{} wearing an oversized sweater"
    train: TrainRecipe = Field(default_factory=lambda: TrainRecipe(
        steps=320, batch_size=8, lr=0.0015, scale_lr=True, weight_decay=1e-2, eps=1e-7, flip_prob=0.5, max_images=1))


class IDEnhancer(nn.Module):
    """face (B, face_dim) + anchor (n, D) -> fused identity tokens (B, n, 2D), by cross-attention.

    The face, expanded to D, is the query of each of the n tokens; keys and values are the n anchor embeddings.
    """

    def __init__(self, face_dim: int, dim: int, heads: int) -> None:
        super().__init__()
        self.expand = nn.Linear(face_dim, dim)
        self.to_q = nn.Linear(dim, dim)
        self.to_kv = nn.Linear(dim, dim)
        self.attn = nn.MultiheadAttention(dim, heads, batch_first=True)
        self.out = nn.Linear(dim, 2 * dim)

    def forward(self, face: Tensor, anchor: Tensor) -> Tensor:
        b, n = face.shape[0], anchor.shape[0]
        q = self.to_q(self.expand(face.float()))[:, None].expand(b, n, -1)
        kv = self.to_kv(anchor.float())[None].expand(b, n, -1)
        fused, _ = self.attn(q, kv, kv, need_weights=False)
        return self.out(fused)


class IDAdapter(nn.Module):
    """text (B, L, D) + fused (B, n, 2D) -> (B, L, D) = text + beta * tanh(gate) * SelfAttn([text, fc1(fused)])[:L]."""

    def __init__(self, dim: int, heads: int, beta: float) -> None:
        super().__init__()
        self.fc1 = nn.Linear(2 * dim, dim)
        self.attn = nn.MultiheadAttention(dim, heads, batch_first=True)
        self.gate = nn.Parameter(torch.zeros(()))
        self.beta = beta

    def forward(self, text: Tensor, fused: Tensor) -> Tensor:
        y = text.float()
        x = torch.cat([y, self.fc1(fused.float())], dim=1)
        s, _ = self.attn(x, x, x, need_weights=False)
        return (y + self.beta * torch.tanh(self.gate) * s[:, :y.shape[1]]).to(text.dtype)


class IDTokens(nn.Module):
    """The fused identity tokens the adapter reads at inference: ``tokens`` (n, 2D), a persistent buffer."""

    def __init__(self, n: int, dim: int) -> None:
        super().__init__()
        self.register_buffer("tokens", torch.zeros(n, 2 * dim))


def cross_init(pipe: Any, tokens: PlaceholderTokens, names: list[str]) -> Tensor:
    """(n, D) Cross-Initialisation of n pseudo-tokens from well-known names (n = ``len(tokens.words)``).

    Column i is the mean input embedding of the (i+1)-th token of every name that has one; ``BOS c_0 .. c_{n-1} EOS
    PAD...`` goes through the text encoder and its output states at positions 1..n are returned. Raises
    ``ValueError`` when no name has n tokens.
    """
    tok, te = pipe.tokenizer, pipe.text_encoder
    table = te.get_input_embeddings().weight.detach().float()
    n = len(tokens.words)
    columns: list[list[Tensor]] = [[] for _ in range(n)]
    for name in names:
        for i, t in enumerate(tok(name, add_special_tokens=False).input_ids[:n]):
            columns[i].append(table[t])
    if any(not c for c in columns):
        raise ValueError(f"no anchor name has {n} tokens: Cross-Initialisation of {n} pseudo-tokens needs names "
                         "of at least that many tokens")
    means = torch.stack([torch.stack(c).mean(0) for c in columns])  # (n, D)
    tokens.install(pipe)
    if any(p.is_meta for p in te.parameters()):  # a shape-only pipeline (meta device): there is no output to take
        return torch.empty(n, means.shape[1], device="meta")
    length = int(tok.model_max_length)
    ids = [tok.bos_token_id, *tokens.ids.tolist(), tok.eos_token_id]
    ids += [tok.pad_token_id] * (length - len(ids))
    with torch.no_grad():
        hidden = tokens.encode_ids(pipe, torch.tensor([ids]), means).hidden
    return hidden[0, 1:1 + n].float()


def mahalanobis_precision(init: Tensor, ridge: float) -> Tensor:
    """(D, D) pseudo-inverse of ``cov(init) + ridge * I``, the covariance over the n initial embeddings (n, D)."""
    cov = torch.cov(init.double().T)
    eye = torch.eye(cov.shape[0], dtype=cov.dtype, device=cov.device)
    return torch.linalg.pinv(cov + ridge * eye).float()


def mahalanobis(x: Tensor, init: Tensor, precision: Tensor) -> Tensor:
    """Mean over the n tokens of sqrt((x - init) P (x - init)^T); x, init (n, D), P (D, D). 0 (no gradient) at x = init.

    The quadratic form is clamped at 1e-12 before the square root so the gradient stays finite at the start.
    """
    d = x.float() - init.float()
    quad = ((d @ precision) * d).sum(-1)
    return quad.clamp_min(1e-12).sqrt().mean()


@register_method
class IDEA(PersonalizedMethod):
    name: ClassVar[str] = "id-ea"
    Config: ClassVar[type[MethodConfig]] = IDEAConfig
    artifact_file: ClassVar[str] = "learned_embeds.safetensors"
    config: IDEAConfig

    def __init__(self, config: IDEAConfig | None = None) -> None:
        super().__init__(config)
        self.tokens = PlaceholderTokens(placeholder_words(self.config.placeholder, self.config.num_tokens))
        self._init: Tensor | None = None  # (n, D) cross-init embeddings: the regulariser's centre, the anchor
        self._precision: Tensor | None = None  # (D, D), computed at the first training step
        self._identity_face: Tensor | None = None  # (1, face_dim), set by prepare_identity

    def identity_phrase(self, class_noun: str = "person") -> str:
        return self.tokens.phrase

    # -- construction -------------------------------------------------------------------------------------------

    def build(self, pipe: Any) -> None:
        cfg = self.config
        dim = pipe.text_encoder.get_input_embeddings().embedding_dim
        if dim % cfg.heads:
            raise ValueError(f"id-ea heads={cfg.heads} does not divide the text hidden size {dim}")
        self._init = cross_init(pipe, self.tokens, read_anchor_names(cfg.anchor_names_file))
        embeds = TokenVectors(cfg.num_tokens, dim).to(self._init.device)
        with torch.no_grad():
            embeds.vectors.copy_(self._init)
        self.modules["embeds"] = embeds
        self.modules["adapter"] = IDAdapter(dim, cfg.heads, cfg.adapter_beta)
        self.modules["enhancer"] = IDEnhancer(cfg.face_dim, dim, cfg.heads)
        if cfg.adapter_at_inference:
            self.modules["id_tokens"] = IDTokens(cfg.num_tokens, dim)

    def make_processors(self, pipe: Any) -> dict[str, Any]:
        return {}  # the adapter acts on the text-encoder output; the UNet's attention is untouched

    def on_attach(self, pipe: Any) -> None:
        super().on_attach(pipe)
        self.tokens.install(pipe)
        if self._init is not None:
            self._init = self._init.to(pipe.unet.device)

    # -- what the artifact keeps: what inference reads, not everything that trains --------------------------------

    def _saved_prefixes(self) -> tuple[str, ...]:
        return ("embeds", "adapter", "id_tokens") if self.config.adapter_at_inference else ("embeds",)

    def state_dict(self) -> dict[str, Tensor]:
        """The weights inference reads: ``embeds.`` (plus ``adapter.``, ``id_tokens.`` with adapter_at_inference)."""
        keep = self._saved_prefixes()
        return {k: v for k, v in self.modules.state_dict().items() if k.split(".", 1)[0] in keep}

    def load_state_dict(self, sd: Any) -> None:
        """Strictly load what ``state_dict`` saves; the training-only modules keep their initialisation."""
        if self._built_for is None:
            self._pending_state = dict(sd)
            return
        check_state_keys(self.state_dict(), sd, source=f"method {self.name!r}")
        self.modules.load_state_dict(dict(sd), strict=False)

    @property
    def vectors(self) -> Tensor:
        return self.modules["embeds"].vectors

    @property
    def adapter(self) -> IDAdapter:
        return self.modules["adapter"]

    @property
    def enhancer(self) -> IDEnhancer:
        return self.modules["enhancer"]

    # -- identity -----------------------------------------------------------------------------------------------

    def prepare_identity(self, refs: IdentityRefs, pipe: Any) -> None:
        """Remember the identity's face (mean of the references' L2-normalised embeddings, renormalised)."""
        refs.require("face_embeds")
        face = torch.nn.functional.normalize(refs.face_embeds.float().mean(0, keepdim=True), dim=-1)
        self._identity_face = face.to(self.vectors.device)

    def encode_prompts(self, pipe: Any, prompts: Any, cond: Any) -> Any:
        from idforge.diffusion.text import TextCondition

        on = cond is not None and self.state.scale != 0 and bool(cond.tensors["on"].any())
        text = self.tokens.encode(pipe, prompts, self.vectors if on else None)
        if on and self.config.adapter_at_inference:
            fused = self.modules["id_tokens"].tokens[None].expand(text.hidden.shape[0], -1, -1)
            with torch.no_grad():
                text = TextCondition(self.adapter(text.hidden, fused))
        return text

    # -- training -----------------------------------------------------------------------------------------------

    def training_loss(self, batch: TrainBatch, pipe: Any, *, generator: torch.Generator | None = None
                      ) -> dict[str, Tensor]:
        """{"loss", "diffusion", "reg"}; needs latents, input_ids (with the pseudo-words) and face_embeds."""
        from idforge.diffusion.text import TextCondition

        batch.require("latents", "input_ids", "face_embeds")
        assert self._init is not None, "attach the method to a pipeline first"
        if self._precision is None:
            self._precision = mahalanobis_precision(self._init, self.config.reg_ridge).to(self._init.device)
        face = torch.nn.functional.normalize(batch.face_embeds.float().mean(1), dim=-1).to(self._init.device)
        fused = self.enhancer(face, self._init)  # (B, n, 2D)
        text = self.tokens.encode_ids(pipe, batch.input_ids, self.vectors)
        text = TextCondition(self.adapter(text.hidden, fused))
        out = diffusion_loss(self.denoise_fn(pipe, text, batch), batch.latents, self._scheduler,
                             noise=batch.noise, timesteps=batch.timesteps, generator=generator)
        reg = mahalanobis(self.vectors, self._init, self._precision)
        loss = out.loss + self.config.reg_weight * reg
        if self.config.adapter_at_inference:
            with torch.no_grad():  # what sampling reads: the fused tokens of the identity's face
                ident = face.mean(0, keepdim=True) if self._identity_face is None else self._identity_face
                self.modules["id_tokens"].tokens.copy_(self.enhancer(ident, self._init)[0])
        return {"loss": loss, "diffusion": out.loss.detach(), "reg": reg.detach()}

    def artifact_extra(self) -> dict[str, Any]:
        return {"placeholders": self.tokens.words, "prompt_template": self.config.sample_prompt}
