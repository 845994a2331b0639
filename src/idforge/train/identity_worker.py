"""A long-lived per-identity worker: load the base model once, fine-tune identity after identity on it.

Loading a diffusion base costs seconds to minutes (SD1.5: ~4 GB read and moved to the GPU) while a per-identity
run is a few hundred steps, so at 10^4-10^5 identities one load per identity dominates the fan-out. A
``BaseWorker`` loads the frozen base once (``per_identity.load_base``) and snapshots what a per-identity method may
change on it, then after every identity -- done or failed -- puts it back bit for bit:

- the UNet's attention processors (id-ea, sefi-ide and pidiff install their own; ``detach`` normally restores
  them, but not after a run that failed half-way);
- injected adapter layers (dreambooth-lora adds PEFT LoRA layers to the UNet and only disables them on detach):
  removed with diffusers' ``recurse_remove_peft_layers``, which puts the original ``nn.Linear`` objects back;
- the tokenizers (textual inversion, id-ea, sefi-ide add placeholder words): replaced by deep copies of the
  snapshot (a tokenizer cannot remove an added token);
- every parameter and buffer of the UNet, text encoder(s) and VAE: copied back from a CPU snapshot taken right
  after loading, and the modules' ``training``/``requires_grad`` flags re-applied. The base is frozen, so this is
  a safety net against a method that writes into it in place; it costs one host-to-device copy of the weights per
  identity (bench/scale.py fanout measures it), far below a reload.

Each identity's random draws start from ``cfg.seed`` (``per_identity._run``), so with the base restored an
identity's artifact is the same on a worker that trained others before it as on a fresh one (tested bit for bit).
"""

from __future__ import annotations

import copy
import logging
import os
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from idforge.train.finetune_config import FinetuneConfig
from idforge.train.per_identity import FinetuneResult, LoadedBase, finetune_identity, load_base

if TYPE_CHECKING:
    import torch

    from idforge.config import TrackingConfig

log = logging.getLogger(__name__)

MODULES = ("unet", "text_encoder", "text_encoder_2", "vae")
TOKENIZERS = ("tokenizer", "tokenizer_2")
# torch.nn.Module's hook tables (a forgotten ``register_forward_hook`` of a method changes every later output)
HOOK_DICTS = ("_forward_hooks", "_forward_hooks_with_kwargs", "_forward_hooks_always_called", "_forward_pre_hooks",
              "_forward_pre_hooks_with_kwargs")


def _hook_ids(module: Any) -> dict[str, set[int]]:
    return {h: set(getattr(module, h, {})) for h in HOOK_DICTS}


class BaseRestoreError(RuntimeError):
    """The base could not be put back to its snapshot: the worker holding it must be discarded."""


@dataclass
class BaseSnapshot:
    """What ``restore_base`` puts back: tensors on CPU, flags, processors and tokenizer copies."""

    tensors: dict[str, dict[str, torch.Tensor]]  # module name -> state_dict (CPU clones)
    training: dict[str, dict[str, bool]]  # module name -> submodule name -> training flag
    requires_grad: dict[str, dict[str, bool]]  # module name -> parameter name -> requires_grad
    processors: dict[str, Any]  # the UNet's attention processors by name
    tokenizers: dict[str, Any]  # tokenizer attribute -> deep copy
    hooks: dict[str, dict[str, set[int]]]  # module name -> submodule name -> hook dict -> hook ids (the base's own)


def _modules(pipe: Any) -> dict[str, Any]:
    return {n: m for n in MODULES if (m := getattr(pipe, n, None)) is not None}


def snapshot_base(pipe: Any) -> BaseSnapshot:
    """Everything of ``pipe`` a per-identity method may change, copied (tensors to CPU)."""
    import torch

    tensors, training, grads, hooks = {}, {}, {}, {}
    with torch.no_grad():
        for name, module in _modules(pipe).items():
            tensors[name] = {k: v.detach().to("cpu", copy=True) for k, v in module.state_dict().items()}
            training[name] = {k: m.training for k, m in module.named_modules()}
            grads[name] = {k: p.requires_grad for k, p in module.named_parameters()}
            hooks[name] = {k: _hook_ids(m) for k, m in module.named_modules()}
    return BaseSnapshot(tensors, training, grads, dict(pipe.unet.attn_processors),
                        {n: copy.deepcopy(t) for n in TOKENIZERS if (t := getattr(pipe, n, None)) is not None},
                        hooks)


def restore_base(pipe: Any, snap: BaseSnapshot) -> None:
    """Put ``pipe`` back to ``snap``: processors, adapter layers, tokenizers, tensors and flags.

    Raises ``BaseRestoreError`` when a module no longer has the snapshot's tensors after the adapter layers are
    removed (something changed the architecture in a way this worker does not know how to undo): the worker must
    then be discarded, not reused.
    """
    import torch
    from diffusers.utils import recurse_remove_peft_layers

    modules = _modules(pipe)
    for module in modules.values():
        if getattr(module, "peft_config", None) or any(type(m).__module__.startswith("peft.")
                                                       for m in module.modules()):
            recurse_remove_peft_layers(module)
            if hasattr(module, "peft_config"):
                del module.peft_config
            if hasattr(module, "_hf_peft_config_loaded"):
                module._hf_peft_config_loaded = False
    # set_attn_processor pops from the dict it is given: hand it a copy, keep the snapshot's
    pipe.unet.set_attn_processor(dict(snap.processors))
    for name, tok in snap.tokenizers.items():
        setattr(pipe, name, copy.deepcopy(tok))
    with torch.no_grad():
        for name, module in modules.items():
            state = module.state_dict()
            if state.keys() != snap.tensors[name].keys():
                extra = sorted(set(state) ^ set(snap.tensors[name]))[:5]
                raise BaseRestoreError(f"{name} of the base changed shape (tensors {extra}); discard this worker")
            for key, value in state.items():
                value.copy_(snap.tensors[name][key])
            for p_name, param in module.named_parameters():
                param.requires_grad_(snap.requires_grad[name][p_name])
            for sub_name, sub in module.named_modules():
                sub.training = snap.training[name].get(sub_name, sub.training)
                keep = snap.hooks[name].get(sub_name, {})
                for table in HOOK_DICTS:
                    hooks = getattr(sub, table, None)
                    for hook_id in [k for k in (hooks or {}) if k not in keep.get(table, set())]:
                        del hooks[hook_id]


class BaseWorker:
    """A base loaded once, fine-tuning identities one after another (``finetune``), restored after each.

    ``load_s`` is the base load; each result's ``timings["restore"]`` the restore that followed it.
    """

    def __init__(self, base_model: str | os.PathLike[str], cfg: FinetuneConfig | None = None,
                 base: LoadedBase | None = None) -> None:
        self.cfg = cfg or FinetuneConfig()
        if self.cfg.num_threads:
            import torch

            torch.set_num_threads(self.cfg.num_threads)
        t0 = time.perf_counter()
        self.base = base or load_base(base_model, self.cfg)
        self.snapshot = snapshot_base(self.base.pipe)
        self.load_s = time.perf_counter() - t0
        self.identities_done = 0

    @property
    def pipe(self) -> Any:
        return self.base.pipe

    def restore(self) -> float:
        """Put the base back to its snapshot; returns the seconds it took. Raises ``BaseRestoreError``."""
        t0 = time.perf_counter()
        try:
            restore_base(self.base.pipe, self.snapshot)
        except BaseRestoreError:
            raise
        except Exception as exc:  # anything that stops the restore leaves a base nobody may train on
            raise BaseRestoreError(f"restoring the base failed: {type(exc).__name__}: {exc}") from exc
        return time.perf_counter() - t0

    def finetune(self, method: str, identity: str, dataset_dir: str | os.PathLike[str],
                 output_dir: str | os.PathLike[str], parent_run_id: str | None = None,
                 tracking: TrackingConfig | None = None) -> FinetuneResult:
        """``finetune_identity`` on this worker's base, then restore it (also when the identity fails: the
        exception propagates after the restore). A failed restore raises ``BaseRestoreError``."""
        try:
            result = finetune_identity(method, identity, dataset_dir, self.base.base_model, output_dir, self.cfg,
                                       parent_run_id=parent_run_id, tracking=tracking, base=self.base)
        finally:
            restore_s = self.restore()
            self.identities_done += 1
        result.timings["restore"] = restore_s
        return result
