"""Attention-processor plumbing shared by every identity method.

Routing: a UNet's processors are keyed by module path (``down_blocks.1.attentions.0.transformer_blocks.0.attn2
.processor``). ``attn1`` is self-attention, ``attn2`` cross-attention; the hidden size follows the block
(``down_blocks.i`` -> ``block_out_channels[i]``, ``mid_block`` -> the last, ``up_blocks.i`` -> reversed order), the
same rule diffusers' own IP-Adapter loader uses. Works for SD1.5-shaped and SDXL-shaped UNets (SDXL has several
transformer blocks per attention and blocks without attention; only names that exist are routed).

The helpers at the bottom replay ``AttnProcessor2_0``'s pre/post steps so a custom processor only writes the part
that differs (how keys/values are built), and produces bit-identical output when it adds nothing.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Literal

import torch.nn.functional as F
from torch import Tensor, nn

_NAME = re.compile(
    r"^(?P<block>down_blocks|mid_block|up_blocks)(?:\.(?P<index>\d+))?\..*\.(?P<attn>attn\d)\.processor$")


@dataclass(frozen=True)
class AttnSite:
    """One attention layer of a UNet.

    name:          processor key (``...attn1.processor``), as in ``unet.attn_processors``.
    kind:          "self" (attn1) or "cross" (attn2).
    block:         "down" | "mid" | "up"; block_index: i of ``down_blocks.i`` / ``up_blocks.i`` (0 for mid).
    hidden_size:   channels of the spatial tokens at this layer (query dim).
    context_dim:   dim of ``encoder_hidden_states`` for cross-attention (the text hidden size), None for self.
    heads:         number of attention heads of the layer.
    """

    name: str
    kind: Literal["self", "cross"]
    block: Literal["down", "mid", "up"]
    block_index: int
    hidden_size: int
    context_dim: int | None
    heads: int

    @property
    def key(self) -> str:
        """A ``nn.ModuleDict``-safe key for per-layer weights (dots are not allowed there)."""
        return module_key(self.name)


def module_key(processor_name: str) -> str:
    """``down_blocks.0.attentions.0.transformer_blocks.0.attn1.processor`` -> ``down_blocks_0_..._attn1``."""
    return processor_name.removesuffix(".processor").replace(".", "_")


def _cross_dim_for(config: Any, block: str, index: int) -> int:
    dim = config.cross_attention_dim
    if isinstance(dim, int):
        return dim
    dims = list(dim)  # per down block; up blocks mirror them, mid takes the last
    if block == "down":
        return dims[index]
    if block == "up":
        return list(reversed(dims))[index]
    return dims[-1]


def hidden_size_for(processor_name: str, config: Any) -> int:
    """Hidden size of the attention layer ``processor_name`` from the UNet config's block_out_channels."""
    m = _NAME.match(processor_name)
    if m is None:
        raise ValueError(f"not a UNet attention processor name: {processor_name!r}")
    channels = list(config.block_out_channels)
    if m["block"] == "mid_block":
        return channels[-1]
    index = int(m["index"])
    return channels[index] if m["block"] == "down_blocks" else list(reversed(channels))[index]


def attention_sites(unet: nn.Module) -> list[AttnSite]:
    """Every attention layer of ``unet``, in ``unet.attn_processors`` order.

    Raises:
        ValueError: a processor name that is not ``{down_blocks.i|mid_block|up_blocks.i}...attn{1|2}.processor``
            (a UNet layout we do not know how to route).
    """
    sites = []
    for name in unet.attn_processors:
        m = _NAME.match(name)
        if m is None:
            raise ValueError(f"cannot route attention processor {name!r}: unknown UNet layout")
        block = {"down_blocks": "down", "mid_block": "mid", "up_blocks": "up"}[m["block"]]
        index = int(m["index"] or 0)
        kind = "self" if m["attn"] == "attn1" else "cross"
        attn = unet.get_submodule(name.removesuffix(".processor"))
        sites.append(AttnSite(
            name=name,
            kind=kind,
            block=block,
            block_index=index,
            hidden_size=hidden_size_for(name, unet.config),
            context_dim=_cross_dim_for(unet.config, block, index) if kind == "cross" else None,
            heads=int(attn.heads),
        ))
    return sites


def select_sites(unet: nn.Module, kind: Literal["self", "cross"] | None = None,
                 blocks: Iterable[str] = ("down", "mid", "up")) -> list[AttnSite]:
    """The sites of one kind (or all) within the given block groups."""
    blocks = set(blocks)
    return [s for s in attention_sites(unet) if (kind is None or s.kind == kind) and s.block in blocks]


def attention_module(unet: nn.Module, site: AttnSite | str) -> nn.Module:
    name = site.name if isinstance(site, AttnSite) else site
    return unet.get_submodule(name.removesuffix(".processor"))


# ----------------------------------------------------------------------------------------------------------------
# building blocks for processors (mirroring diffusers' AttnProcessor2_0 step by step)


@dataclass
class Prepared:
    """Spatial tokens ready for attention and what is needed to undo the reshapes."""

    hidden: Tensor  # (B, N, C) after spatial_norm/group_norm
    residual: Tensor
    input_ndim: int
    shape: tuple[int, ...]  # original (B, C, H, W) when input_ndim == 4
    mask: Tensor | None


def prepare(attn: Any, hidden_states: Tensor, attention_mask: Tensor | None = None, temb: Tensor | None = None,
            context_len: int | None = None) -> Prepared:
    """The pre-attention steps of ``AttnProcessor2_0``: spatial norm, (B,C,H,W)->(B,N,C), mask, group norm."""
    residual = hidden_states
    if attn.spatial_norm is not None:
        hidden_states = attn.spatial_norm(hidden_states, temb)
    ndim = hidden_states.ndim
    shape = tuple(hidden_states.shape)
    if ndim == 4:
        b, c, h, w = shape
        hidden_states = hidden_states.view(b, c, h * w).transpose(1, 2)
    b = hidden_states.shape[0]
    if attention_mask is not None:
        seq = context_len if context_len is not None else hidden_states.shape[1]
        attention_mask = attn.prepare_attention_mask(attention_mask, seq, b)
        attention_mask = attention_mask.view(b, attn.heads, -1, attention_mask.shape[-1])
    if attn.group_norm is not None:
        hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)
    return Prepared(hidden_states, residual, ndim, shape, attention_mask)


def context_of(attn: Any, hidden: Tensor, encoder_hidden_states: Tensor | None) -> Tensor:
    """What keys/values are computed from: the tokens themselves (self) or the (normed) context (cross)."""
    if encoder_hidden_states is None:
        return hidden
    if attn.norm_cross:
        return attn.norm_encoder_hidden_states(encoder_hidden_states)
    return encoder_hidden_states


def heads(attn: Any, x: Tensor) -> Tensor:
    """(B, N, H*d) -> (B, H, N, d)."""
    b = x.shape[0]
    return x.view(b, -1, attn.heads, x.shape[-1] // attn.heads).transpose(1, 2)


def merge_heads(attn: Any, x: Tensor) -> Tensor:
    """(B, H, N, d) -> (B, N, H*d)."""
    b, h, n, d = x.shape
    return x.transpose(1, 2).reshape(b, n, h * d)


def sdpa(attn: Any, q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None = None) -> Tensor:
    """Multi-head scaled dot-product attention on (B, N, C) projections, with the layer's q/k norms.

    Returns (B, Nq, C) in q's dtype.
    """
    q, k, v = heads(attn, q), heads(attn, k), heads(attn, v)
    if attn.norm_q is not None:
        q = attn.norm_q(q)
    if attn.norm_k is not None:
        k = attn.norm_k(k)
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=0.0, is_causal=False)
    return merge_heads(attn, out).to(q.dtype)


def finish(attn: Any, out: Tensor, prep: Prepared) -> Tensor:
    """The post-attention steps of ``AttnProcessor2_0``: out projection, dropout, reshape, residual, rescale."""
    out = attn.to_out[0](out)
    out = attn.to_out[1](out)
    if prep.input_ndim == 4:
        b, c, h, w = prep.shape
        out = out.transpose(-1, -2).reshape(b, c, h, w)
    if attn.residual_connection:
        out = out + prep.residual
    return out / attn.rescale_output_factor


def adain_mean(x: Tensor, y: Tensor) -> Tensor:
    """AdaIN-mean (Infinite-ID eq. 8): ``x - mean(x) + mean(y)``, means over tokens (dim -2), per channel."""
    return x - x.mean(dim=-2, keepdim=True) + y.mean(dim=-2, keepdim=True)


def install(unet: nn.Module, processors: Mapping[str, Any]) -> dict[str, Any]:
    """Install ``processors`` over the current ones (others kept); returns the processors that were replaced.

    ``set_attn_processor`` pops entries from the dict it is given, so it gets a copy.
    """
    current = dict(unet.attn_processors)
    unknown = sorted(set(processors) - set(current))
    if unknown:
        raise ValueError(f"processor names not in this UNet: {unknown[:3]}")
    unet.set_attn_processor({**current, **processors})
    return {k: current[k] for k in processors}


ProcessorFactory = Callable[[AttnSite], Any]


def route(unet: nn.Module, self_attn: ProcessorFactory | None = None, cross_attn: ProcessorFactory | None = None,
          ) -> dict[str, Any]:
    """Build processors per site: ``self_attn(site)`` for attn1 layers, ``cross_attn(site)`` for attn2 layers.

    A factory may return None to leave that layer alone. Returns ``{processor_name: processor}``.
    """
    out: dict[str, Any] = {}
    for site in attention_sites(unet):
        factory = self_attn if site.kind == "self" else cross_attn
        if factory is None:
            continue
        proc = factory(site)
        if proc is not None:
            out[site.name] = proc
    return out


__all__ = [
    "AttnSite",
    "Prepared",
    "adain_mean",
    "attention_module",
    "attention_sites",
    "context_of",
    "finish",
    "heads",
    "hidden_size_for",
    "install",
    "merge_heads",
    "module_key",
    "prepare",
    "route",
    "sdpa",
    "select_sites",
]
