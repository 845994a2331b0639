"""Prompt encoding and UNet calls that work for SD1.5/SD2-shaped and SDXL-shaped pipelines alike.

The methods need three things the stock pipelines do not expose separately: encoding token ids they already have
(training batches carry ids), editing the token embeddings before the text encoder runs (textual injection),
and calling the UNet with SDXL's added conditions built from the latent size.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

# (token_embeds (B, L, D), input_ids (B, L), encoder_index 0|1) -> token_embeds with the same shape
TokenHook = Callable[[Tensor, Tensor, int], Tensor]


@dataclass
class TextCondition:
    """Encoded prompts. hidden: (B, L, Dtext) ``encoder_hidden_states``; pooled: (B, Dpool) for SDXL, else None."""

    hidden: Tensor
    pooled: Tensor | None = None

    @staticmethod
    def cat(parts: Sequence[TextCondition]) -> TextCondition:
        pooled = None if parts[0].pooled is None else torch.cat([p.pooled for p in parts])  # type: ignore[misc]
        return TextCondition(torch.cat([p.hidden for p in parts]), pooled)


def is_sdxl(pipe: Any) -> bool:
    """True when the pipeline has SDXL's second text encoder and text/time added conditions."""
    return getattr(pipe, "text_encoder_2", None) is not None


def tokenize(pipe: Any, prompts: Sequence[str]) -> tuple[Tensor, Tensor | None]:
    """Token ids padded to each tokenizer's max length: ((B, L), (B, L) or None for single-encoder models)."""

    def ids(tok: Any) -> Tensor:
        return tok(list(prompts), padding="max_length", max_length=tok.model_max_length, truncation=True,
                   return_tensors="pt").input_ids

    ids_1 = ids(pipe.tokenizer)
    ids_2 = ids(pipe.tokenizer_2) if getattr(pipe, "tokenizer_2", None) is not None else None
    return ids_1, ids_2


@contextlib.contextmanager
def _token_hook(encoder: Any, hook: TokenHook | None, input_ids: Tensor, index: int) -> Iterator[None]:
    """Temporarily route the encoder's token-embedding output through ``hook`` (a forward hook, removed after)."""
    if hook is None:
        yield
        return
    emb = encoder.get_input_embeddings()
    handle = emb.register_forward_hook(lambda _m, _inp, out: hook(out, input_ids.to(out.device), index))
    try:
        yield
    finally:
        handle.remove()


def encode_ids(pipe: Any, input_ids: Tensor, input_ids_2: Tensor | None = None,
               token_hook: TokenHook | None = None) -> TextCondition:
    """Encode token ids the way the pipeline's own ``encode_prompt`` does (no clip-skip).

    SD1.5/SD2: the text encoder's last hidden state. SDXL: penultimate hidden states of both encoders concatenated,
    plus text_encoder_2's projected pooled output. ``token_hook`` may edit the token embeddings (differentiably).
    """
    te = pipe.text_encoder
    device = te.device
    if not is_sdxl(pipe):
        with _token_hook(te, token_hook, input_ids, 0):
            hidden = te(input_ids.to(device))[0]
        return TextCondition(hidden)
    if input_ids_2 is None:
        raise ValueError("an SDXL pipeline needs input_ids_2 (ids of its second tokenizer)")
    te2 = pipe.text_encoder_2
    with _token_hook(te, token_hook, input_ids, 0):
        h1 = te(input_ids.to(device), output_hidden_states=True).hidden_states[-2]
    with _token_hook(te2, token_hook, input_ids_2, 1):
        out2 = te2(input_ids_2.to(te2.device), output_hidden_states=True)
    pooled = out2[0]
    h2 = out2.hidden_states[-2]
    return TextCondition(torch.cat([h1, h2.to(h1.device)], dim=-1), pooled.to(h1.device))


def encode_prompts(pipe: Any, prompts: Sequence[str], token_hook: TokenHook | None = None) -> TextCondition:
    ids_1, ids_2 = tokenize(pipe, prompts)
    return encode_ids(pipe, ids_1, ids_2, token_hook)


def sdxl_time_ids(batch: int, height: int, width: int, device: Any = "cpu", dtype: torch.dtype = torch.float32
                  ) -> Tensor:
    """(B, 6) SDXL micro-conditioning: original size, crop top-left (0, 0), target size, all in pixels."""
    row = torch.tensor([height, width, 0, 0, height, width], dtype=dtype, device=device)
    return row.expand(batch, 6).clone()


def unet_call(pipe: Any, latents: Tensor, timesteps: Tensor, text: TextCondition, time_ids: Tensor | None = None,
              ) -> Tensor:
    """The UNet's prediction, with SDXL's added conditions when the UNet expects them.

    latents (B, C, h, w); timesteps (B,) or scalar; returns (B, C, h, w) in the UNet's dtype.
    """
    unet = pipe.unet
    kwargs: dict[str, Any] = {}
    if getattr(unet.config, "addition_embed_type", None) == "text_time":
        if text.pooled is None:
            raise ValueError("this UNet needs pooled text embeddings (SDXL): encode with the SDXL pipeline's encoders")
        b = latents.shape[0]
        if time_ids is None:
            scale = getattr(pipe, "vae_scale_factor", 8)
            time_ids = sdxl_time_ids(b, latents.shape[-2] * scale, latents.shape[-1] * scale, latents.device)
        kwargs["added_cond_kwargs"] = {"text_embeds": text.pooled.to(latents.dtype),
                                       "time_ids": time_ids.to(latents.device, latents.dtype)}
    hidden = text.hidden.to(device=latents.device, dtype=latents.dtype)
    return unet(latents, timesteps, encoder_hidden_states=hidden, **kwargs).sample
