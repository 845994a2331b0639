"""LPIPS perceptual distance, from weights a registry package ships.

Plain LPIPS (``lpips``) needs torchvision's ImageNet backbones, which no machine of ours can download and whose wheel
does not import with our CPU torch. ``stlpips-pytorch`` ships its *full* weights (backbone + linear heads) for the
shift-tolerant variant (Ghildyal & Liu, ECCV 2022), but its modules import torchvision too, so the network is rebuilt
here in plain torch with the same module names and loaded with a strict key check. Its numbers differ from plain
LPIPS: the metric is therefore labelled ``lpips_shift_tolerant`` wherever it is reported.

stlpips-pytorch is BSD-2-Clause (Ghildyal & Liu); its blur-pool code derives from Adobe's antialiased-cnns
(CC BY-NC-SA 4.0), which this rebuild does not copy (a [1, 2, 1] binomial filter, reflect padding).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Literal

from idforge.errors import ModelNotFoundError

if TYPE_CHECKING:  # pragma: no cover
    import torch

log = logging.getLogger(__name__)

LpipsBackend = Literal["auto", "lpips", "stlpips"]


@dataclass(frozen=True)
class LpipsModel:
    """A loaded perceptual metric: ``label`` is the column/metric name its numbers are reported under."""

    net: "torch.nn.Module"
    label: str  # "lpips" or "lpips_shift_tolerant"

    def __call__(self, a: "torch.Tensor", b: "torch.Tensor") -> "torch.Tensor":
        """Distance per pair: ``a``, ``b`` (B,3,H,W) float in [0,1] (broadcast over B allowed) -> (B,) float32."""
        import torch

        with torch.inference_mode():
            d = self.net(a * 2 - 1, b * 2 - 1)  # both nets take [-1, 1]
        return d.reshape(-1).float()


def _build_shift_tolerant_alexnet() -> "torch.nn.Module":
    import numpy as np
    import torch
    from torch import nn
    from torch.nn import functional as F

    class BlurPool(nn.Module):
        """Anti-aliased downsampling (binomial [1,2,1]^2 filter, reflect pad 2, stride 2), as stlpips' ``Downsample``
        with ``pad_more=True``. ``filt`` is a buffer so the shipped state dict (which stores it) loads strictly."""

        def __init__(self, channels: int) -> None:
            super().__init__()
            a = np.array([1.0, 2.0, 1.0])
            filt = torch.tensor(a[:, None] * a[None, :], dtype=torch.float32)
            self.register_buffer("filt", (filt / filt.sum())[None, None].repeat(channels, 1, 1, 1))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return F.conv2d(F.pad(x, (2, 2, 2, 2), mode="reflect"), self.filt, stride=2, groups=x.shape[1])

    def seq(start: int, layers: list[nn.Module]) -> nn.Sequential:
        # stlpips numbers the layers of each slice by their index in one flat feature list; keep that numbering.
        s = nn.Sequential()
        for i, layer in enumerate(layers):
            s.add_module(str(start + i), layer)
        return s

    class ShiftTolerantAlexNet(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.slice1 = seq(0, [nn.Conv2d(3, 64, 11, stride=1, padding=2), BlurPool(64), nn.ReLU()])
            self.slice2 = seq(3, [nn.MaxPool2d(3, stride=1), BlurPool(64), nn.Conv2d(64, 192, 5, padding=2), nn.ReLU()])
            self.slice3 = seq(
                7, [nn.MaxPool2d(3, stride=1), BlurPool(192), nn.Conv2d(192, 384, 3, padding=1), nn.ReLU()]
            )
            self.slice4 = seq(11, [nn.Conv2d(384, 256, 3, padding=1), nn.ReLU()])
            self.slice5 = seq(13, [nn.Conv2d(256, 256, 3, padding=1), nn.ReLU()])

        def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
            outs = []
            for s in (self.slice1, self.slice2, self.slice3, self.slice4, self.slice5):
                x = s(x)
                outs.append(x)
            return outs

    class Lin(nn.Module):
        def __init__(self, ch: int) -> None:
            super().__init__()
            # index 1: stlpips puts a Dropout at index 0 (a no-op in eval), keep the key name "model.1.weight".
            self.model = nn.Sequential(nn.Identity(), nn.Conv2d(ch, 1, 1, bias=False))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.model(x)

    class StLpips(nn.Module):
        chns = (64, 192, 384, 256, 256)

        def __init__(self) -> None:
            super().__init__()
            self.register_buffer("shift", torch.tensor([-0.030, -0.088, -0.188])[None, :, None, None])
            self.register_buffer("scale", torch.tensor([0.458, 0.448, 0.450])[None, :, None, None])
            self.net = ShiftTolerantAlexNet()
            self.lins = nn.ModuleList([Lin(c) for c in self.chns])

        def forward(self, in0: torch.Tensor, in1: torch.Tensor) -> torch.Tensor:
            in0, in1 = torch.broadcast_tensors(in0, in1)
            n = in0.shape[0]
            # one pass over both halves: the backbone dominates the cost
            feats = self.net(torch.cat([in0, in1]).sub(self.shift).div(self.scale))
            total = torch.zeros(n, 1, 1, 1, dtype=in0.dtype, device=in0.device)
            for lin, f in zip(self.lins, feats, strict=True):
                f = f / (f.pow(2).sum(dim=1, keepdim=True).sqrt() + 1e-10)
                total = total + lin((f[:n] - f[n:]) ** 2).mean(dim=(2, 3), keepdim=True)
            return total

    return StLpips()


def _stlpips_weights() -> Path:
    import importlib.util

    spec = importlib.util.find_spec("stlpips_pytorch")
    if spec is None or not spec.submodule_search_locations:
        raise ModelNotFoundError(
            "LPIPS weights: package stlpips-pytorch is not installed; install it with "
            "`pip install -c constraints.txt stlpips-pytorch` (it ships the shift-tolerant LPIPS weights)"
        )
    path = Path(list(spec.submodule_search_locations)[0]) / "weights" / "vST0.0" / "alex_shift_tolerant.pth"
    if not path.is_file():
        raise ModelNotFoundError(f"LPIPS weights: {path} is missing from the stlpips-pytorch install; reinstall it")
    return path


def _load_stlpips(device: str) -> LpipsModel:
    import torch

    net = _build_shift_tolerant_alexnet()
    sd = torch.load(_stlpips_weights(), map_location="cpu", weights_only=True)
    # The shipped file names the scaling buffers "scaling_layer.*" and the heads "lin{k}.*".
    sd = {
        k.replace("scaling_layer.", "").replace("lin", "lins.", 1) if k.startswith(("scaling_layer.", "lin")) else k: v
        for k, v in sd.items()
    }
    net.load_state_dict(sd, strict=True)
    return LpipsModel(net.eval().to(device), "lpips_shift_tolerant")


def _try_load_plain_lpips(device: str) -> LpipsModel | None:
    """Plain LPIPS only when the ``lpips`` package and its backbone weights are already on disk (no download)."""
    try:
        import lpips  # type: ignore[import-not-found]
        import torch.hub
    except Exception:  # noqa: BLE001 - missing package or a torchvision that does not import
        return None
    ckpt = Path(torch.hub.get_dir()) / "checkpoints"
    if not any(ckpt.glob("alexnet-*.pth")):
        return None
    net = lpips.LPIPS(net="alex", verbose=False)
    return LpipsModel(net.eval().to(device), "lpips")


def load_lpips(backend: LpipsBackend = "auto", device: str = "cpu") -> LpipsModel:
    """Load the perceptual metric.

    ``auto``: plain LPIPS when available offline, else shift-tolerant LPIPS from stlpips-pytorch's shipped weights.
    ``lpips`` fails with :class:`ModelNotFoundError` when it cannot load offline; ``stlpips`` always uses the
    shipped weights.
    """
    if backend in ("auto", "lpips"):
        model = _try_load_plain_lpips(device)
        if model is not None:
            return model
        if backend == "lpips":
            raise ModelNotFoundError(
                "LPIPS backend 'lpips': the lpips package or its torchvision AlexNet weights are not available "
                "offline; "
                "use --set evaluate.lpips_backend=stlpips (shift-tolerant LPIPS, weights ship with stlpips-pytorch)"
            )
        log.info("plain LPIPS not available offline: using shift-tolerant LPIPS (stlpips-pytorch weights)")
    return _load_stlpips(device)
