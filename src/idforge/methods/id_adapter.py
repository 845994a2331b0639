"""IDAdapter (Cui et al., 2024): mixed facial features, gated self-attention adapters, textual injection, face loss.

The structure follows the full text (section numbers of arXiv 2403.13535):

- MFF (``modules["mff"]``, eq. 3-5): the CLIP patch tokens f_v of the N references (class token excluded),
  concatenated, with the mean ArcFace vector f_a as one more token, go through a lightweight transformer of
  ``mff_blocks`` (2) self-attention blocks: E_r (B, N*(P-1) + 1, mff_dim).
- Visual injection (``modules["adapter"]``, eq. 7): between each frozen self-attention and cross-attention layer,
  ``y <- y + beta * tanh(gamma) * S([y; E_r])`` on the block's residual stream y (GLIGEN's gated self-attention:
  linear map of E_r, LayerNorm, attention sliced back to y's tokens, LayerNorm, feed-forward); gamma starts at 0.
  y is the block input plus the self-attention output, so the attn1 processor adds the adapter's output to its own.
- Textual injection (``modules["text_inj"]``, eq. 6): "<class noun> is sks" is appended to every caption and
  prompt, and the input embedding of the placeholder token becomes E_c = MLP(mean_i f_c(i)) of the mean CLIP class
  token (one MLP per text encoder; it starts as the placeholder's own embedding).
- The key and value projections of every cross-attention layer train too (``modules["text_kv"]``, trainable copies
  of the frozen ones: detaching restores the base model exactly).
- Face identity loss (eq. 8-9): ``face_loss_weight`` (0.1) * (1 - cos) between ArcFace of the decoded predicted x0
  (aligned with the target image's landmarks) and the references, for the samples where a face detector finds a
  face in x0 (``face_loss_gate: detect``; ``window`` keeps the older timestep window instead).
- Classifier-free guidance is trained (``idforge.methods.guidance``): samples drop identity, text or both.

Training feeds N different images of one identity per sample; inference replicates one image N times.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any, ClassVar, Literal

import torch
from pydantic import Field, model_validator
from torch import Tensor, nn

from idforge.diffusion import attention as A
from idforge.methods.base import BaseMethod, MethodConfig
from idforge.methods.face_loss import FaceIdentityLoss, decode_to_unit
from idforge.methods.guidance import GuidanceDropoutConfig, drop_text, training_drops, where_rows
from idforge.methods.layers import MLP, GatedSelfAttentionAdapter, KeyValue, SelfAttentionBlock, unit_rms
from idforge.methods.objective import diffusion_loss, predict_x0, training_scheduler
from idforge.methods.types import Condition, IdentityRefs, TrainBatch

log = logging.getLogger(__name__)

# (images (B, 3, H, W) in [0, 1]) -> (B,) bool: is there a face (the face loss's gate F(x0))
FaceDetector = Callable[[Tensor], Tensor]


class IDAdapterConfig(GuidanceDropoutConfig):
    """Sizes and switches of IDAdapter (defaults: the paper's structure; sizes it does not give are ours)."""

    data_dims: ClassVar[dict[str, tuple[str, int]]] = {"face_dim": ("face_embed", -1),
                                                        "clip_dim": ("clip_patch_tokens", -1)}

    num_refs: int = Field(default=4, ge=1, description="N reference images mixed per sample (paper: 4)")
    face_dim: int = Field(default=512, ge=1, description="face-ID embedding size (ArcFace 512)")
    clip_dim: int = Field(default=1024, ge=1, description="CLIP vision hidden size of the patch tokens")
    mff_dim: int = Field(default=768, ge=1)
    mff_heads: int = Field(default=8, ge=1)
    mff_blocks: int = Field(default=2, ge=1, description="attention blocks of the MFF transformer (paper: 2)")
    mff_ff_mult: int = Field(default=4, ge=1)
    adapter_blocks: list[Literal["down", "mid", "up"]] = Field(default_factory=lambda: ["down", "mid", "up"])
    adapter_beta: float = Field(default=1.0, description="the constant beta of eq. 7 (the paper gives no value)")
    textual_injection: bool = True
    placeholder: str = Field(default="sks", description="the word whose embedding E_c replaces (paper: sks)")
    class_nouns: list[str] = Field(default_factory=lambda: ["man", "woman", "person", "boy", "girl"])
    train_text_kv: bool = Field(default=True, description="train the cross-attention K/V projections (paper)")
    face_loss_weight: float = Field(default=0.1, ge=0.0)
    face_loss_gate: Literal["detect", "window"] = Field(
        default="detect", description="face loss where a face is detected in x0 (paper), or in a timestep window")
    face_loss_t_min: int = Field(default=0, ge=0, description="window gate only")
    face_loss_t_max: int = Field(default=400, ge=1, description="window gate only: face loss where t < this")
    face_detector: Literal["insightface", "opencv"] = Field(
        default="insightface", description="detector of the gate (paper: RetinaFace; insightface ships SCRFD)")
    face_model_dir: str | None = Field(default=None, description="insightface pack for the loss; None = embedded")

    @model_validator(mode="after")
    def _check(self) -> IDAdapterConfig:
        if self.mff_dim % self.mff_heads:
            raise ValueError(f"mff_dim {self.mff_dim} must be divisible by mff_heads {self.mff_heads}")
        if self.face_loss_t_min >= self.face_loss_t_max:
            raise ValueError("face_loss_t_min must be < face_loss_t_max")
        if not self.class_nouns:
            raise ValueError("class_nouns needs at least one noun (textual injection appends '<noun> is sks')")
        return self


class MixedFacialFeatures(nn.Module):
    """MFF: (face (B, N, Dface), patches (B, N, P, Dclip), class token first) -> E_r (B, N*(P-1) + 1, d).

    Parameters: patch_proj Dclip*d + d, face_proj Dface*d + d, ``blocks`` x SelfAttentionBlock(d), out LayerNorm 2d.
    """

    def __init__(self, cfg: IDAdapterConfig) -> None:
        super().__init__()
        d = cfg.mff_dim
        self.patch_proj = nn.Linear(cfg.clip_dim, d)
        self.face_proj = nn.Linear(cfg.face_dim, d)
        self.blocks = nn.ModuleList(SelfAttentionBlock(d, cfg.mff_heads, cfg.mff_ff_mult)
                                    for _ in range(cfg.mff_blocks))
        self.norm_out = nn.LayerNorm(d)

    def forward(self, face: Tensor, patches: Tensor) -> Tensor:
        if patches.shape[2] < 2:
            raise ValueError(f"MFF needs CLIP patch tokens after the class token; got {patches.shape[2]} token(s)")
        f_v = self.patch_proj(patches[:, :, 1:].float()).flatten(1, 2)  # (B, N*(P-1), d)
        f_a = self.face_proj(unit_rms(face.float().mean(dim=1, keepdim=True)))  # (B, 1, d): the mean ArcFace
        x = torch.cat([f_v, f_a], dim=1)
        for block in self.blocks:
            x = block(x)
        return self.norm_out(x)


class _BlockInput:
    """The residual stream entering one transformer block, captured by a forward pre-hook on the block (the
    attn1 processor only sees its normed input, but the adapter reads y = input + self-attention output)."""

    def __init__(self) -> None:
        self.value: Tensor | None = None

    def hook(self, _module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        self.value = args[0] if args else kwargs["hidden_states"]


class IDAdapterSelfAttnProcessor:
    """attn1 = the original processor's output + the gated adapter on y = block input + that output (eq. 7).

    The block adds its input back, so the residual stream becomes ``y + beta * tanh(gamma) * S([y; E_r])``. At
    ``scale == 0`` or without identity tokens it returns the original processor's output untouched.
    """

    def __init__(self, base: Any, adapter: GatedSelfAttentionAdapter, block_input: _BlockInput, state: Any) -> None:
        self.base = base
        self.adapter = adapter
        self.block_input = block_input
        self.state = state

    def __call__(self, attn: Any, hidden_states: Tensor, encoder_hidden_states: Tensor | None = None,
                 attention_mask: Tensor | None = None, temb: Tensor | None = None, *args: Any, **kwargs: Any
                 ) -> Tensor:
        out = self.base(attn, hidden_states, encoder_hidden_states, attention_mask, temb)
        tokens = self.state.context.get("tokens")
        residual = self.block_input.value
        if self.state.scale == 0 or tokens is None or residual is None or residual.shape != out.shape:
            return out
        y = (residual + out).float()
        delta = self.adapter(y, tokens.to(y.device).float()) * self.state.scale
        return out + delta.to(out.dtype)


class IDAdapterCrossProcessor:
    """attn2 with the trainable key/value projections (the frozen query and output projections stay)."""

    def __init__(self, base: Any, kv: KeyValue, state: Any) -> None:
        self.base = base
        self.kv = kv
        self.state = state

    def __call__(self, attn: Any, hidden_states: Tensor, encoder_hidden_states: Tensor | None = None,
                 attention_mask: Tensor | None = None, temb: Tensor | None = None, *args: Any, **kwargs: Any
                 ) -> Tensor:
        if self.state.scale == 0 or encoder_hidden_states is None:
            return self.base(attn, hidden_states, encoder_hidden_states, attention_mask, temb)
        ctx_len = encoder_hidden_states.shape[1]
        prep = A.prepare(attn, hidden_states, attention_mask, temb, context_len=ctx_len)
        q = attn.to_q(prep.hidden)
        ctx = A.context_of(attn, prep.hidden, encoder_hidden_states)
        w = self.kv.to_k.weight
        k = self.kv.to_k(ctx.to(w.dtype)).to(q.dtype)
        v = self.kv.to_v(ctx.to(w.dtype)).to(q.dtype)
        return A.finish(attn, A.sdpa(attn, q, k, v, prep.mask), prep)


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

    def __init__(self, config: IDAdapterConfig | None = None, face_loss: FaceIdentityLoss | None = None,
                 face_detector: FaceDetector | None = None) -> None:
        super().__init__(config)
        self.face_loss = face_loss or FaceIdentityLoss(model_dir=self.config.face_model_dir)
        self._face_detector = face_detector
        self._nouns: list[dict[str, list[int]]] = []  # per tokenizer: class noun -> its token ids
        self._suffix_tail: list[list[int]] = []  # per tokenizer: ids of "is sks"
        self._placeholder_ids: list[int] = []
        self._eos_ids: list[int] = []
        self._hooks: list[Any] = []
        self._block_inputs: dict[str, _BlockInput] = {}
        self._scheduler: Any = None

    # -- construction -------------------------------------------------------------------------------------------

    def _adapter_sites(self, pipe: Any) -> list[A.AttnSite]:
        return A.select_sites(pipe.unet, "self", self.config.adapter_blocks)

    @staticmethod
    def _encoders(pipe: Any) -> list[tuple[Any, Any]]:
        pairs = [(pipe.tokenizer, pipe.text_encoder), (getattr(pipe, "tokenizer_2", None),
                                                       getattr(pipe, "text_encoder_2", None))]
        return [(t, e) for t, e in pairs if e is not None]

    def _placeholder_pieces(self, tok: Any) -> list[int]:
        pieces = tok(self.config.placeholder, add_special_tokens=False).input_ids
        if len(pieces) != 1:
            raise ValueError(f"IDAdapter's placeholder {self.config.placeholder!r} is {len(pieces)} tokens for this "
                             "tokenizer; textual injection replaces one token: choose a single-token word")
        return pieces

    def build(self, pipe: Any) -> None:
        cfg = self.config
        unet = pipe.unet
        self.modules["mff"] = MixedFacialFeatures(cfg)
        self.modules["adapter"] = nn.ModuleDict({
            s.key: GatedSelfAttentionAdapter(s.hidden_size, cfg.mff_dim, s.heads, cfg.mff_ff_mult, cfg.adapter_beta)
            for s in self._adapter_sites(pipe)
        })
        if cfg.textual_injection:
            inj = nn.ModuleList()
            for tok, enc in self._encoders(pipe):
                emb = enc.get_input_embeddings()
                mlp = MLP(cfg.clip_dim, emb.embedding_dim, emb.embedding_dim, zero_out=True)
                with torch.no_grad():  # E_c starts as the placeholder's own embedding: identity-blind at step 0
                    mlp.fc2.bias.copy_(emb.weight[self._placeholder_pieces(tok)[0]].float())
                inj.append(mlp)
            self.modules["text_inj"] = inj
        if cfg.train_text_kv:
            self.modules["text_kv"] = nn.ModuleDict({
                s.key: KeyValue.like(A.attention_module(unet, s)) for s in A.select_sites(unet, "cross")})

    def make_processors(self, pipe: Any) -> dict[str, Any]:
        current = pipe.unet.attn_processors
        adapters = self.modules["adapter"]
        self._block_inputs = {s.key: _BlockInput() for s in self._adapter_sites(pipe)}
        kv = self.modules["text_kv"] if self.config.train_text_kv else {}
        return A.route(
            pipe.unet,
            self_attn=lambda s: (IDAdapterSelfAttnProcessor(current[s.name], adapters[s.key],
                                                            self._block_inputs[s.key], self.state)
                                 if s.key in adapters else None),
            cross_attn=lambda s: IDAdapterCrossProcessor(current[s.name], kv[s.key], self.state) if s.key in kv
            else None,
        )

    def on_attach(self, pipe: Any) -> None:
        self._scheduler = training_scheduler(pipe)
        for site in self._adapter_sites(pipe):
            block = pipe.unet.get_submodule(site.name.removesuffix(".attn1.processor"))
            self._hooks.append(block.register_forward_pre_hook(self._block_inputs[site.key].hook, with_kwargs=True))
        self._nouns, self._suffix_tail, self._placeholder_ids, self._eos_ids = [], [], [], []
        for tok, _enc in self._encoders(pipe):
            self._nouns.append({noun: tok(noun, add_special_tokens=False).input_ids
                                for noun in self.config.class_nouns})
            placeholder = self._placeholder_pieces(tok)
            self._placeholder_ids.append(placeholder[0])
            self._suffix_tail.append(tok("is", add_special_tokens=False).input_ids + placeholder)
            self._eos_ids.append(int(tok.eos_token_id))

    def detach(self, pipe: Any | None = None) -> None:
        for handle in self._hooks:
            handle.remove()
        self._hooks = []
        super().detach(pipe)

    @property
    def face_detector(self) -> FaceDetector:
        """The gate F(x0) of the face loss: the configured detector, loaded on first use."""
        if self._face_detector is None:
            self._face_detector = analyzer_detector(self.config.face_detector, self.config.face_model_dir)
        return self._face_detector

    @face_detector.setter
    def face_detector(self, detector: FaceDetector) -> None:
        self._face_detector = detector

    # -- identity -----------------------------------------------------------------------------------------------

    def vision_tokens(self, face_embeds: Tensor, clip_patch_tokens: Tensor) -> Tensor:
        """E_r (B, N*(P-1) + 1, mff_dim) from (B, N, Dface) and (B, N, P, Dclip)."""
        mff = self.modules["mff"]
        dev = next(mff.parameters()).device
        return mff(face_embeds.to(dev), clip_patch_tokens.to(dev))

    def _condition_tensors(self, face: Tensor, patches: Tensor) -> dict[str, Tensor]:
        """{"tokens": E_r, "class_token": mean CLIP class token (B, Dclip)}: what the UNet and the injection read."""
        tokens = self.vision_tokens(face, patches)
        return {"tokens": tokens, "class_token": patches[:, :, 0].float().mean(dim=1).to(tokens.device)}

    def _null_condition(self, face: Tensor, patches: Tensor) -> dict[str, Tensor]:
        """The unconditional identity: zeros of one sample's inputs through the modules (training and sampling)."""
        return self._condition_tensors(torch.zeros_like(face[:1]), torch.zeros_like(patches[:1]))

    def _replicate(self, x: Tensor) -> Tensor:
        """(n, ...) references -> (num_refs, ...) by cycling (one image is replicated N times, as in the paper)."""
        idx = torch.arange(self.config.num_refs) % x.shape[0]
        return x[idx]

    def identity_condition(self, refs: IdentityRefs, pipe: Any) -> Condition:
        """One identity -> {"tokens": (1, T, d), "class_token": (1, Dclip), "face": (1, N, Dface),
        "patches": (1, N, P, Dclip)}."""
        refs.require("face_embeds", "clip_patch_tokens")
        face = self._replicate(refs.face_embeds.float())[None]
        patches = self._replicate(refs.clip_patch_tokens.float())[None]
        with torch.no_grad():
            tensors = self._condition_tensors(face, patches)
        dev = tensors["tokens"].device
        return Condition(self.name, {**tensors, "face": face.to(dev), "patches": patches.to(dev)},
                         {"class_noun": refs.class_noun})

    def unconditional(self, cond: Condition) -> Condition:
        face, patches = cond.tensors["face"], cond.tensors["patches"]
        with torch.no_grad():
            tensors = self._null_condition(face, patches)
        return Condition(self.name, {**tensors, "face": torch.zeros_like(face[:1]),
                                     "patches": torch.zeros_like(patches[:1])}, dict(cond.meta))

    # -- textual injection --------------------------------------------------------------------------------------

    def with_placeholder(self, input_ids: Tensor, index: int, nouns: list[str] | None = None) -> Tensor:
        """Token ids with "<class noun> is <placeholder>" inserted before each row's end token.

        ``nouns`` gives each row's class noun (sampling: the identity's); None finds it in the row (training: the
        first class noun of the caption). Raises ValueError naming the row when the noun is missing or unknown.
        """
        table, tail, eos = self._nouns[index], self._suffix_tail[index], self._eos_ids[index]
        by_last = {pieces[-1]: pieces for pieces in table.values()}
        rows = []
        for r, row in enumerate(input_ids.tolist()):
            if nouns is not None:
                if nouns[r] not in table:
                    raise ValueError(f"class noun {nouns[r]!r} is not in id-adapter's class_nouns "
                                     f"{self.config.class_nouns}: add it to method_config.class_nouns")
                noun = table[nouns[r]]
            else:
                found = [t for t in row if t in by_last]
                if not found:
                    raise ValueError(f"caption {r} of the batch has no class noun from id-adapter's class_nouns "
                                     f"{self.config.class_nouns}: prepare inserts the identity's noun into its "
                                     "captions; add the identity's noun to method_config.class_nouns")
                noun = by_last[found[0]]
            end = row.index(eos) if eos in row else len(row) - 1
            suffix = noun + tail
            keep = min(end, len(row) - 1 - len(suffix))
            rows.append((row[:keep] + suffix + row[end:] + [eos] * len(row))[:len(row)])
        return torch.tensor(rows, dtype=input_ids.dtype, device=input_ids.device)

    def token_hook(self, class_token: Tensor):
        """A ``TokenHook`` replacing the placeholder's input embedding with E_c = MLP(class token) (eq. 6)."""
        inj = self.modules["text_inj"]

        def hook(embeds: Tensor, input_ids: Tensor, index: int) -> Tensor:
            b = embeds.shape[0]
            c = class_token.to(embeds.device).float()
            e_c = inj[index](c.expand(b, -1) if c.shape[0] == 1 else c)  # (B, D)
            # torch.where keeps the MLP in the graph even for rows without the placeholder (DDP needs every
            # parameter used in every step).
            mask = (input_ids == self._placeholder_ids[index])[..., None]
            return torch.where(mask, e_c[:, None].to(embeds.dtype), embeds)

        return hook

    # -- training -----------------------------------------------------------------------------------------------

    def _text(self, pipe: Any, batch: TrainBatch, class_token: Tensor):
        from idforge.diffusion.text import TextCondition, encode_ids

        if self.config.textual_injection:
            if batch.input_ids is None:
                raise ValueError("IDAdapter's textual injection needs input_ids in the batch (token ids of the "
                                 "captions); cached text_embeds cannot carry it")
            ids = self.with_placeholder(batch.input_ids, 0)
            ids_2 = None if batch.input_ids_2 is None else self.with_placeholder(batch.input_ids_2, 1)
            return encode_ids(pipe, ids, ids_2, self.token_hook(class_token))
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

    def _face_term(self, pipe: Any, batch: TrainBatch, out: Any, keep: Tensor) -> Tensor:
        """Sum over the gated samples of the face identity loss, / B (each sample weighs the same)."""
        cfg = self.config
        sel = keep.clone()
        if cfg.face_loss_gate == "window":
            sel &= (out.timesteps >= cfg.face_loss_t_min) & (out.timesteps < cfg.face_loss_t_max)
        zero = torch.zeros((), device=out.loss.device)
        if not bool(sel.any()):
            return zero
        x0 = predict_x0(self._scheduler, out.noisy_latents[sel], out.model_pred[sel], out.timesteps[sel])
        images = decode_to_unit(pipe.vae, x0)
        kps, ref = batch.target_kps[sel], self.reference_embeddings(batch)[sel]
        if cfg.face_loss_gate == "detect":  # F(x0) of eq. 9: only where the detector finds a face in x0
            found = self.face_detector(images.detach()).to(images.device).bool()
            if not bool(found.any()):
                return zero
            images, kps, ref = images[found], kps[found], ref[found]
        return self.face_loss(images, kps, ref).sum() / batch.batch_size

    def training_loss(self, batch: TrainBatch, pipe: Any, *, generator: torch.Generator | None = None
                      ) -> dict[str, Tensor]:
        """{"loss", "diffusion", "face", "drop_identity", "drop_text"}: diffusion MSE + face_loss_weight * face
        identity loss, with the guidance dropout drawn from ``generator``.

        Needs latents, face_embeds, clip_patch_tokens, input_ids (textual injection) and, for the face loss,
        target_kps.
        """
        from idforge.diffusion.text import unet_call

        batch.require("latents", "face_embeds", "clip_patch_tokens")
        cfg = self.config
        drops = training_drops(self, batch.batch_size, generator, batch.latents.device)
        cond = self._condition_tensors(batch.face_embeds, batch.clip_patch_tokens)
        if bool(drops.identity.any()):
            null = self._null_condition(batch.face_embeds, batch.clip_patch_tokens)
            cond = {k: where_rows(drops.identity, null[k], v) for k, v in cond.items()}
        text = drop_text(self, pipe, self._text(pipe, batch, cond["class_token"]), drops.text)
        sched = self._scheduler
        self.set_training_context(cond)  # kept for backward: checkpointed blocks recompute through it
        out = diffusion_loss(lambda x, t: unet_call(pipe, x, t, text, batch.add_time_ids), batch.latents, sched,
                             noise=batch.noise, timesteps=batch.timesteps, generator=generator)
        loss = out.loss
        face = torch.zeros((), device=loss.device)
        if cfg.face_loss_weight > 0 and batch.target_kps is not None:
            # A sample without its identity has nothing to be faithful to.
            face = self._face_term(pipe, batch, out, ~drops.identity.to(loss.device))
            loss = loss + cfg.face_loss_weight * face
        return {"loss": loss, "diffusion": out.loss.detach(), "face": face.detach(), **drops.fractions()}

    # -- sampling -----------------------------------------------------------------------------------------------

    def encode_prompts(self, pipe: Any, prompts: Any, cond: Condition | None) -> Any:
        """Prompts + "<class noun> is sks" with the identity's E_c; the negative prompt (``cond`` None) and
        ``scale == 0`` get the plain prompt, as the text-dropped samples did in training."""
        from idforge.diffusion.text import encode_ids, encode_prompts, tokenize

        if cond is None or not self.config.textual_injection or self.state.scale == 0:
            return encode_prompts(pipe, prompts)
        nouns = [str(cond.meta.get("class_noun", "person"))] * len(prompts)
        ids, ids_2 = tokenize(pipe, prompts)
        ids = self.with_placeholder(ids, 0, nouns)
        ids_2 = None if ids_2 is None else self.with_placeholder(ids_2, 1, nouns)
        return encode_ids(pipe, ids, ids_2, self.token_hook(cond.tensors["class_token"]))


def analyzer_detector(backend: str, model_dir: str | None = None) -> FaceDetector:
    """A FaceDetector from an ``idforge.faces`` analyzer: True where it finds at least one face."""
    from idforge.faces import load_analyzer

    analyzer = load_analyzer(backend, model_dir if backend == "insightface" else None, landmarks106=False)

    def detect(images: Tensor) -> Tensor:
        arr = (images.detach().float().clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
        return torch.tensor([len(analyzer.detect(a)) > 0 for a in arr], dtype=torch.bool)

    return detect
