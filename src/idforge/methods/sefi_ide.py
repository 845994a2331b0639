"""SeFi-IDE, "Beyond Inserting" (Li et al., 2024): per-stage K/V identity tokens and a face-wise attention loss.

Sources: the project page (github.com/Com-Vis/SeFi-IDE: pipeline figure, K/V-number and lambda ablations) and
ProSpect (Zhang et al. 2023), which the paper builds on; no SeFi-IDE code or full text is public.

- Semantic-fidelity tokens (``modules["tokens"].kv``, (S, 2, D), S = ``num_stages`` = 5, the page's ablation
  choice): the identity's pseudo-word V* is a different token per stage and for keys vs values. At stage i V* is
  encoded with P_i^K to form the KEYS and with P_i^V to form the VALUES of every text cross-attention (each through
  the frozen text encoder; all 2S variants in one batched call). The other prompt words are untouched.
- Stages are intervals of denoising timesteps (``stage_by="timestep"``, the default), as in ProSpect, whose stage
  index is ``int(t * stages / T)``: with S = 5 and T = 1000 the pair i serves t in [200 i, 200 (i + 1)), equal
  intervals of the training schedule (the paper does not state its split; equal bins are ProSpect's rule, and with
  50 sampling steps each pair drives about 10). Pair S-1 acts first when sampling (high noise: layout and pose),
  pair 0 last (fine detail), matching the page's Fig. 4. The processor reads the current timestep per batch row from
  the method's state, so rows at different timesteps use their own pairs. ``stage_by="layer"`` keeps the other
  reading: the cross-attention blocks split into S contiguous groups in forward order (``stage_of_sites``).
- Face-wise attention loss (``attn_target="class-word"``, the default, as the page's figure draws it): the same UNet
  query Q (on the target image) attends to the keys of V* (K_t) and to the keys of the reference prompt with the
  class word in V*'s place ("a photo of the face of person", K_r); V*'s map A_t is pulled toward the class word's
  map A_r (``class_word_attention_loss``), weight 0.003 (the page's lambda ablation). No face parser or mask is
  needed. ``attn_target="face-mask"`` is our earlier variant: the share of V*'s attention outside the curation face
  mask (``face_attention_loss``).

Ours, where the page is silent: A_r is a stop-gradient target (the class word's map is the anchor; letting the loss
move it would let Q drift toward V* instead); the distance is the squared difference of the head-averaged maps
summed over positions (averaged over rows and layers): the per-position mean would be ~1e-3 of the diffusion loss and
the page's finding that lambda >= 0.01 underfits could not hold; the loss reads the layers at 1/2 the latent
resolution and coarser (``attn_loss_min_downsample``; the page's maps look like 16^2-32^2 grids of a 64^2 latent);
the tokens are trained directly (the page's "Self-Attention" module that emits them is not described); the recipe is
textual inversion's (500 steps, lr 5e-3, batch 1) on one reference image, as the paper trains from one.

The per-stage contexts reach the processors through ``encoder_hidden_states`` itself: ``encode_prompts`` returns
``[base | K_1 | V_1 | ... | K_S | V_S]`` concatenated along the sequence (each L tokens; base = the class word in
V*'s slot); every processor of ours slices the K and V segments of its stage, so the sampler's batching and
guidance work unchanged.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, ClassVar, Literal

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

    num_stages: int = Field(default=5, ge=1, description="per-stage K/V token pairs (project page: 5)")
    stage_by: Literal["timestep", "layer"] = Field(
        default="timestep", description="what a stage is: an interval of timesteps (ProSpect) or a group of layers")
    placeholder: str = Field(default="<sefi>")
    init_word: str = Field(default="person", description="initialises the tokens; the class word of the attention "
                                                         "loss's reference prompt")
    attn_loss_weight: float = Field(default=0.003, ge=0, description="weight of the face-wise attention loss "
                                                                     "(project page lambda ablation: 3e-3)")
    attn_target: Literal["class-word", "face-mask"] = Field(
        default="class-word", description="what V*'s attention is pulled toward: the class word's map (paper) or "
                                          "the curation face mask")
    attn_loss_min_downsample: int = Field(default=2, ge=1, description="attention loss on layers at latent/N "
                                                                       "resolution and coarser")
    templates: list[str] = Field(default_factory=lambda: ["a photo of the face of {}"],
                                 description="training captions (the page's input prompt)")
    train: TrainRecipe = Field(default_factory=lambda: TrainRecipe(steps=500, batch_size=1, lr=5e-3, max_images=1))


def face_attention_loss(attn_map: Tensor, mask: Tensor) -> Tensor:
    """Face-mask variant: the share of the identity token's attention that falls outside the face.

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


def class_word_attention_loss(attn_map: Tensor, target: Tensor) -> Tensor:
    """Face-wise loss: squared distance of V*'s map to the class word's, summed over positions, mean over rows.

    attn_map, target: (B, N) attention probabilities of one token per spatial position (same query). ``target`` is
    not differentiated (it is the anchor V* is pulled toward). 0 when the maps agree.
    """
    if attn_map.shape != target.shape:
        raise ValueError(f"attention map {tuple(attn_map.shape)} and target {tuple(target.shape)} differ in shape")
    return (attn_map.float() - target.detach().float()).pow(2).sum(-1).mean()


def stage_of_timestep(t: Tensor, num_stages: int, num_train_timesteps: int) -> Tensor:
    """(B,) long stage index of each timestep: ``int(t * S / T)`` (ProSpect), clamped to [0, S-1]."""
    s = torch.div(t.float() * num_stages, num_train_timesteps, rounding_mode="floor").long()
    return s.clamp(0, num_stages - 1)


def stage_of_sites(sites: list[AttnSite], num_stages: int) -> dict[str, int]:
    """Layer reading: cross-attention processor name -> stage, stages contiguous in forward order (down, mid, up).

    Blocks with cross-attention (``down_blocks.i``, ``mid_block``, ``up_blocks.i``) are split into ``num_stages``
    contiguous groups of as equal a number of blocks as possible; the layers of one block share its stage. Raises
    ``ValueError`` when the UNet has fewer such blocks than stages.
    """
    order = {"down": 0, "mid": 1, "up": 2}
    groups: dict[tuple[int, int], list[str]] = {}
    for s in sites:
        groups.setdefault((order[s.block], s.block_index), []).append(s.name)
    keys = sorted(groups)
    if len(keys) < num_stages:
        raise ValueError(f"the UNet has {len(keys)} blocks with cross-attention, fewer than num_stages={num_stages}; "
                         "use stage_by=timestep or fewer stages")
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
    """Cross-attention whose keys/values come from one stage's K/V segments of the packed context.

    ``stage`` fixes the stage (layer reading); ``None`` picks it per row from ``state.context["t"]`` (B,) timesteps.
    With an ordinary (unpacked) context it behaves as ``AttnProcessor2_0``. When ``state.flags["capture"]`` is a
    list and the layer has at most ``state.flags["capture_max_tokens"]`` positions, it appends
    ``(A_t, A_r)``: (B, N) head-averaged attention of V*'s positions (``state.context["id_pos"]``) on the stage's
    keys, and of the same positions on the base segment's keys (the class word in V*'s place), same query.
    """

    def __init__(self, stage: int | None, num_stages: int, num_train_timesteps: int, state: Any) -> None:
        self.stage = stage
        self.num_stages = num_stages
        self.num_train_timesteps = num_train_timesteps
        self.state = state

    def _stage_rows(self, b: int, device: Any) -> Tensor:
        if self.stage is not None:
            return torch.full((b,), self.stage, dtype=torch.long, device=device)
        t = self.state.context.get("t")
        if t is None:
            raise ValueError("SeFi-IDE timestep stages need the current timestep: call the UNet through the "
                             "method's denoise / training_loss (or set stage_by=layer)")
        t = t.reshape(-1).to(device)
        t = t.expand(b) if t.numel() == 1 else t
        if t.numel() != b:
            raise ValueError(f"SeFi-IDE got {t.numel()} timesteps for a UNet batch of {b}")
        return stage_of_timestep(t, self.num_stages, self.num_train_timesteps)

    def __call__(self, attn: Any, hidden_states: Tensor, encoder_hidden_states: Tensor | None = None,
                 attention_mask: Tensor | None = None, temb: Tensor | None = None, *args: Any, **kwargs: Any
                 ) -> Tensor:
        ctx = encoder_hidden_states
        if ctx is None:
            raise ValueError("SeFi-IDE processors are installed on cross-attention layers only")
        segments = 1 + 2 * self.num_stages
        packed = self.state.flags.get("sefi_len")
        base = None
        if packed and ctx.shape[1] == packed * segments:
            b, length = ctx.shape[0], packed
            parts = ctx.view(b, segments, length, ctx.shape[-1])
            idx, rows = self._stage_rows(b, ctx.device), torch.arange(b, device=ctx.device)
            k_ctx, v_ctx, base = parts[rows, 1 + 2 * idx], parts[rows, 2 + 2 * idx], parts[:, 0]
        else:
            length = ctx.shape[1]
            k_ctx = v_ctx = ctx
        prep = prepare(attn, hidden_states, attention_mask, temb, context_len=length)
        if attn.norm_cross:
            k_ctx = attn.norm_encoder_hidden_states(k_ctx)
            v_ctx = attn.norm_encoder_hidden_states(v_ctx)
            base = None if base is None else attn.norm_encoder_hidden_states(base)
        q, k, v = attn.to_q(prep.hidden), attn.to_k(k_ctx), attn.to_v(v_ctx)
        capture = self.state.flags.get("capture")
        if capture is None or prep.hidden.shape[1] > self.state.flags.get("capture_max_tokens", 0):
            from idforge.diffusion.attention import sdpa

            return finish(attn, sdpa(attn, q, k, v, prep.mask), prep)
        qh = heads(attn, q)
        if attn.norm_q is not None:
            qh = attn.norm_q(qh)
        pos = self.state.context["id_pos"].to(q.device)[:, None, :].to(q.dtype)  # (B, 1, L)

        def probs_of(keys: Tensor) -> Tensor:
            kh = heads(attn, keys)
            if attn.norm_k is not None:
                kh = attn.norm_k(kh)
            logits = qh @ kh.transpose(-1, -2) * (qh.shape[-1] ** -0.5)
            if prep.mask is not None:
                logits = logits + prep.mask
            return logits.softmax(-1)  # (B, H, N, L)

        probs = probs_of(k)
        a_t = (probs.mean(1) * pos).sum(-1)  # (B, N)
        a_r = None
        if base is not None:
            with torch.no_grad():  # the target: the class word's map under the same query
                a_r = (probs_of(attn.to_k(base)).mean(1) * pos).sum(-1)
        capture.append((a_t, a_r))
        return finish(attn, merge_heads(attn, probs @ heads(attn, v)).to(q.dtype), prep)


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
        dim = pipe.text_encoder.get_input_embeddings().embedding_dim
        tokens = StageTokens(self.config.num_stages, dim)
        with torch.no_grad():
            tokens.kv.copy_(token_embedding(pipe, self.config.init_word).expand_as(tokens.kv))
        self.modules["tokens"] = tokens

    def make_processors(self, pipe: Any) -> dict[str, Any]:
        from idforge.diffusion.attention import select_sites

        sites = select_sites(pipe.unet, "cross")
        s, steps = self.config.num_stages, int(pipe.scheduler.config.num_train_timesteps)
        if self.config.stage_by == "layer":
            self._stages = stage_of_sites(sites, s)
            return {name: SeFiCrossAttnProcessor(stage, s, steps, self.state) for name, stage in self._stages.items()}
        self._stages = {}
        return {site.name: SeFiCrossAttnProcessor(None, s, steps, self.state) for site in sites}

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
        """Token ids (B, L) -> TextCondition with hidden (B, (1 + 2S) L, D): base, then K/V per stage.

        base is the prompt with the class word (``init_word``) in V*'s slot: the attention loss's reference prompt.
        """
        from idforge.diffusion.text import TextCondition

        s = self.config.num_stages
        b, length = input_ids.shape
        with torch.no_grad():
            base = self.tokens.encode_ids(pipe, input_ids, None).hidden
        if not with_identity:
            return TextCondition(base.repeat(1, 1 + 2 * s, 1))
        variants = self.kv.reshape(2 * s, 1, -1)  # (2S, 1, D): variant j = stage j // 2, K if j even else V
        ids = input_ids.repeat(2 * s, 1)  # (2S*B, L), variant-major
        vectors = variants.repeat_interleave(b, dim=0)  # (2S*B, 1, D)
        enc = self.tokens.encode_ids(pipe, ids, vectors).hidden.view(2 * s, b, length, -1)
        return TextCondition(torch.cat([base, *enc.unbind(0)], dim=1))

    def encode_prompts(self, pipe: Any, prompts: Any, cond: Condition | None) -> Any:
        from idforge.diffusion.text import tokenize

        ids, _ = tokenize(pipe, prompts)
        on = cond is not None and self.state.scale != 0 and bool(cond.tensors["on"].any())
        return self.pack_ids(pipe, ids, on)

    # -- the timestep reaches the processors through the state -------------------------------------------------

    def denoise(self, pipe: Any, latents: Tensor, t: Tensor, text: Any, cond: Condition) -> Tensor:
        from idforge.diffusion.text import unet_call

        with self.conditioning({**cond.tensors, "t": torch.as_tensor(t).reshape(-1)}):
            return unet_call(pipe, latents, t, text)

    def denoise_fn(self, pipe: Any, text: Any, batch: TrainBatch) -> Callable[[Tensor, Tensor], Tensor]:
        base = super().denoise_fn(pipe, text, batch)

        def fn(x: Tensor, t: Tensor) -> Tensor:
            with self.conditioning({**self.state.context, "t": t.reshape(-1)}):
                return base(x, t)

        return fn

    # -- training ----------------------------------------------------------------------------------------------

    def _attention_term(self, captured: list[tuple[Tensor, Tensor | None]], batch: TrainBatch) -> Tensor:
        if self.config.attn_target == "class-word":
            return torch.stack([class_word_attention_loss(a_t, a_r) for a_t, a_r in captured]).mean()
        batch.require("face_mask")
        h0, w0 = batch.latents.shape[-2:]
        parts = []
        for a_t, _ in captured:
            factor = (h0 * w0 / a_t.shape[1]) ** 0.5
            h, w = round(h0 / factor), round(w0 / factor)
            mask = F.interpolate(batch.face_mask.float().to(a_t.device), size=(h, w), mode="area")[:, 0]
            parts.append(face_attention_loss(a_t.view(-1, h, w), mask))
        return torch.stack(parts).mean()

    def training_loss(self, batch: TrainBatch, pipe: Any, *, generator: torch.Generator | None = None
                      ) -> dict[str, Tensor]:
        """{"loss", "diffusion", "attn"}; needs latents, input_ids (and face_mask for the face-mask variant)."""
        batch.require("latents", "input_ids")
        text = self.pack_ids(pipe, batch.input_ids, True)
        use_attn = self.config.attn_loss_weight > 0
        captured: list[tuple[Tensor, Tensor | None]] = []
        flags_before = dict(self.state.flags)
        if use_attn:
            h0, w0 = batch.latents.shape[-2:]
            self.state.flags["capture"] = captured
            self.state.flags["capture_max_tokens"] = (h0 * w0) // self.config.attn_loss_min_downsample ** 2
        try:
            with self.conditioning({"id_pos": self.tokens.positions(batch.input_ids) > 0}):
                out = diffusion_loss(self.denoise_fn(pipe, text, batch), batch.latents, self._scheduler,
                                     noise=batch.noise, timesteps=batch.timesteps, generator=generator)
        finally:
            self.state.flags.clear()
            self.state.flags.update(flags_before)
        loss = out.loss
        attn = torch.zeros((), device=loss.device)
        if use_attn:
            if not captured:
                raise ValueError(f"no cross-attention layer at 1/{self.config.attn_loss_min_downsample} of the "
                                 "latent resolution or coarser: lower attn_loss_min_downsample")
            attn = self._attention_term(captured, batch)
            loss = loss + self.config.attn_loss_weight * attn
        return {"loss": loss, "diffusion": out.loss.detach(), "attn": attn.detach()}

    def artifact_extra(self) -> dict[str, Any]:
        return {"placeholders": self.tokens.words, "stage_by": self.config.stage_by, "stages": self._stages}
