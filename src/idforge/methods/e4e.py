"""e4e's Encoder4Editing (Tov et al., "Designing an Encoder for StyleGAN Image Manipulation", SIGGRAPH 2021), the
W+ encoder of PIDiff's Visual Guidance Module, written for idforge with the released checkpoint's layout.

Architecture (FFHQ, ``Encoder4Editing(50, 'ir_se')``, StyleGAN 1024 -> 18 styles):
- ``input_layer``: Conv3x3 3->64 (no bias), BN, PReLU.
- ``body``: IR-SE50, 24 units in 4 stages (3, 4, 14, 3 units; 64, 128, 256, 512 channels), the first unit of each
  stage with stride 2. A unit is ``res_layer`` = [BN(in), Conv3x3 in->d, PReLU(d), Conv3x3 d->d (stride s), BN(d),
  SE(d, /16)] plus ``shortcut_layer`` (MaxPool(1, s) when in == d, else Conv1x1 (stride s) + BN).
- taps: c1 after unit 6 (128 ch, 64x64 at 256 px), c2 after unit 20 (256 ch, 32x32), c3 after unit 23 (512, 16x16).
- ``styles``: 18 GradualStyleBlocks: log2(spatial) strided Conv3x3 + LeakyReLU(0.01) down to 1x1, then an
  EqualLinear (weight N(0, 1) scaled by 1/sqrt(in) at run time). Styles 0-2 read c3 (16x16), 3-6 read
  p2 = up(c3) + latlayer1(c2) (32x32), 7-17 read p1 = up(p2) + latlayer2(c1) (64x64); bilinear, align_corners.
- progressive deltas: w0 = styles[0](c3) is copied to all 18 rows and row i adds styles[i] (the released model's
  stage is the last one, every delta on).

The output of ``Encoder4Editing`` is an offset; ``E4E`` adds the checkpoint's ``latent_avg`` [18, 512]
(``start_from_latent_avg``), giving the w+ code e4e's inference and PIDiff's reference pipeline use.

Checkpoint: ``load_e4e(path)`` reads the released ``e4e_ffhq_encode.pt`` as it is (``{'state_dict', 'latent_avg',
'opts'}``): ``encoder.*`` and ``latent_avg`` are kept, ``decoder.*`` (the StyleGAN2 generator) is ignored, anything
else is an error naming the keys. State dict keys and shapes of ``Encoder4Editing`` are exactly the checkpoint's
``encoder.*`` entries without the prefix: 621 tensors, 267,136,704 parameters plus 24,372 BN statistics.
Input: an FFHQ-aligned face, 256x256, RGB in [-1, 1] (e4e's transform: Resize 256, ToTensor, Normalize(0.5, 0.5)).
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

N_STYLES = 18  # 2 * log2(1024) - 2: the FFHQ StyleGAN2's style count
STYLE_DIM = 512
IMAGE_SIZE = 256  # e4e's input resolution
COARSE_END, MIDDLE_END = 3, 7  # e4e's coarse_ind and middle_ind
# IR-SE50: (input channels, depth, units) per stage; the first unit of each stage has stride 2.
IR_SE50_STAGES = ((64, 64, 3), (64, 128, 4), (128, 256, 14), (256, 512, 3))
TAPS = {6: "c1", 20: "c2", 23: "c3"}  # body unit index -> the feature map kept after it

__all__ = ["E4E", "Encoder4Editing", "N_STYLES", "STYLE_DIM", "IMAGE_SIZE", "e4e_input", "load_e4e",
           "read_e4e_checkpoint"]


class SEModule(nn.Module):
    """Squeeze-and-excitation: ``x * sigmoid(fc2(relu(fc1(avgpool(x)))))`` with bias-free 1x1 convs."""

    def __init__(self, channels: int, reduction: int = 16) -> None:
        super().__init__()
        self.fc1 = nn.Conv2d(channels, channels // reduction, 1, bias=False)
        self.fc2 = nn.Conv2d(channels // reduction, channels, 1, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        s = F.adaptive_avg_pool2d(x, 1)
        return x * torch.sigmoid(self.fc2(F.relu(self.fc1(s))))


class BottleneckIRSE(nn.Module):
    """One IR-SE unit: ``shortcut_layer(x) + res_layer(x)``."""

    def __init__(self, cin: int, depth: int, stride: int) -> None:
        super().__init__()
        if cin == depth:
            self.shortcut_layer: nn.Module = nn.MaxPool2d(1, stride)
        else:
            self.shortcut_layer = nn.Sequential(nn.Conv2d(cin, depth, 1, stride, bias=False), nn.BatchNorm2d(depth))
        self.res_layer = nn.Sequential(
            nn.BatchNorm2d(cin), nn.Conv2d(cin, depth, 3, 1, 1, bias=False), nn.PReLU(depth),
            nn.Conv2d(depth, depth, 3, stride, 1, bias=False), nn.BatchNorm2d(depth), SEModule(depth, 16))

    def forward(self, x: Tensor) -> Tensor:
        return self.shortcut_layer(x) + self.res_layer(x)


class EqualLinear(nn.Module):
    """StyleGAN2's equalised linear layer (no activation, lr_mul 1): ``x @ (W / sqrt(in)).T + b``."""

    def __init__(self, dim_in: int, dim_out: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(dim_out, dim_in))
        self.bias = nn.Parameter(torch.zeros(dim_out))
        self.scale = 1.0 / math.sqrt(dim_in)

    def forward(self, x: Tensor) -> Tensor:
        return F.linear(x, self.weight * self.scale, self.bias)


class GradualStyleBlock(nn.Module):
    """(B, 512, s, s) -> (B, 512): log2(s) stride-2 Conv3x3 + LeakyReLU down to 1x1, then ``EqualLinear``.

    ``style_dim`` is the linear's output (e4e: = cout = 512; a narrower test encoder keeps 512 here).
    """

    def __init__(self, cin: int, cout: int, spatial: int, style_dim: int | None = None) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        for i in range(int(math.log2(spatial))):
            layers += [nn.Conv2d(cin if i == 0 else cout, cout, 3, 2, 1), nn.LeakyReLU()]
        self.convs = nn.Sequential(*layers)
        self.linear = EqualLinear(cout, style_dim or cout)
        self.cout = cout

    def forward(self, x: Tensor) -> Tensor:
        return self.linear(self.convs(x).reshape(-1, self.cout))


def _upsample_add(x: Tensor, y: Tensor) -> Tensor:
    return F.interpolate(x, size=y.shape[-2:], mode="bilinear", align_corners=True) + y


class Encoder4Editing(nn.Module):
    """(B, 3, 256, 256) in [-1, 1] -> (B, 18, 512) W+ offsets (add ``latent_avg`` for the code; see ``E4E``).

    ``width`` is the backbone's base channel count: 64 is e4e (stages 64/128/256/512, style heads 512 wide, exactly
    the release's keys and shapes). A smaller width scales every channel count by width/64 and keeps the key names
    and the 18 x 512 output: a cheap test encoder, not e4e.
    """

    def __init__(self, width: int = 64) -> None:
        super().__init__()
        if width < 16 or width % 16:
            raise ValueError(f"e4e width {width} must be a multiple of 16 (SE reduction 16 at the first stage)")
        r = width / 64
        stages = [(int(cin * r), int(depth * r), n) for cin, depth, n in IR_SE50_STAGES]
        head = stages[-1][1]
        self.input_layer = nn.Sequential(nn.Conv2d(3, width, 3, 1, 1, bias=False), nn.BatchNorm2d(width),
                                         nn.PReLU(width))
        units = []
        for cin, depth, n in stages:
            units.append(BottleneckIRSE(cin, depth, 2))
            units += [BottleneckIRSE(depth, depth, 1) for _ in range(n - 1)]
        self.body = nn.Sequential(*units)
        self.styles = nn.ModuleList(
            GradualStyleBlock(head, head, 16 if i < COARSE_END else 32 if i < MIDDLE_END else 64, STYLE_DIM)
            for i in range(N_STYLES))
        self.latlayer1 = nn.Conv2d(stages[2][1], head, 1)
        self.latlayer2 = nn.Conv2d(stages[1][1], head, 1)

    def forward(self, x: Tensor) -> Tensor:
        x = self.input_layer(x)
        taps: dict[str, Tensor] = {}
        for i, unit in enumerate(self.body):
            x = unit(x)
            if i in TAPS:
                taps[TAPS[i]] = x
        c1, c2, c3 = taps["c1"], taps["c2"], taps["c3"]
        w0 = self.styles[0](c3)
        p2 = _upsample_add(c3, self.latlayer1(c2))
        p1 = _upsample_add(p2, self.latlayer2(c1))
        rows = [w0]
        for i in range(1, N_STYLES):
            features = c3 if i < COARSE_END else p2 if i < MIDDLE_END else p1
            rows.append(w0 + self.styles[i](features))
        return torch.stack(rows, dim=1)


class E4E(nn.Module):
    """The frozen W+ encoder PIDiff uses: ``Encoder4Editing(x) + latent_avg``.

    State dict = the released checkpoint's kept part: ``encoder.*`` and ``latent_avg`` ([18, 512] buffer).
    ``forward`` takes (B, 3, H, W) in [-1, 1]; other sizes are resized to ``image_size`` (e4e's
    ``Resize((256, 256))``; a smaller side only makes fast tests cheaper, the taps then shrink with it).
    """

    def __init__(self, image_size: int = IMAGE_SIZE, width: int = 64) -> None:
        super().__init__()
        self.image_size = image_size
        self.encoder = Encoder4Editing(width)
        self.register_buffer("latent_avg", torch.zeros(N_STYLES, STYLE_DIM))

    def forward(self, images: Tensor) -> Tensor:
        x = images.float().to(self.latent_avg.device)
        size = (self.image_size, self.image_size)
        if x.shape[-2:] != size:
            x = F.interpolate(x, size=size, mode="bilinear", align_corners=False, antialias=True)
        return self.encoder(x) + self.latent_avg.to(x.dtype)


def e4e_input(rgb: Tensor, matte: Tensor, size: int = IMAGE_SIZE) -> Tensor:
    """e4e's input from an FFHQ-aligned crop and its person matte: (N, 3, size, size) float in [-1, 1].

    ``rgb``: (N, 3, H, W) float in [0, 1]; ``matte``: (N, 1, H, W) float in [0, 1] (1 = person). The background is
    filled WHITE, as W+ Adapter's reference pipeline does before e4e (``x (1 - m) + m`` in [-1, 1] with m the
    background); then resized to ``size`` (e4e's ``Resize((256, 256))``) and mapped to [-1, 1] (``Normalize(0.5,
    0.5)``).
    """
    if rgb.ndim != 4 or rgb.shape[1] != 3 or matte.shape != (rgb.shape[0], 1, *rgb.shape[-2:]):
        raise ValueError(f"e4e_input needs rgb (N, 3, H, W) and matte (N, 1, H, W), got {tuple(rgb.shape)} and "
                         f"{tuple(matte.shape)}")
    a = matte.float().clamp(0, 1)
    x = rgb.float() * a + (1 - a)
    if x.shape[-2:] != (size, size):
        x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False, antialias=True)
    return x.clamp(0, 1) * 2 - 1


def read_e4e_checkpoint(path: str | os.PathLike[str]) -> dict[str, Tensor]:
    """The kept part of a released e4e checkpoint: ``{"encoder.<key>": tensor, ..., "latent_avg": [18, 512]}``.

    Loaded with ``torch.load(weights_only=True)``: ``opts`` is a plain dict of str/int/float/bool/None (``vars`` of
    e4e's argparse options), which the weights-only unpickler accepts without an allow-list.

    Raises:
        FileNotFoundError: ``path`` does not exist (the message says where the file comes from).
        ValueError: not the released layout, or keys other than ``encoder.*``/``decoder.*`` in its state dict.
    """
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"e4e checkpoint {p} does not exist: download e4e_ffhq_encode.pt (the FFHQ encoder "
                                "of github.com/omertov/encoder4editing) and set pidiff's encoder_path to it")
    try:
        ckpt = torch.load(str(p), map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any unpickling failure means the same thing to the user
        raise ValueError(f"e4e checkpoint {p} cannot be read with torch.load(weights_only=True): "
                         f"{str(exc).splitlines()[0]}") from None
    if not isinstance(ckpt, dict) or not isinstance(ckpt.get("state_dict"), dict):
        raise ValueError(f"e4e checkpoint {p} is not the released layout: expected a dict with 'state_dict', "
                         f"'latent_avg' and 'opts', got {sorted(ckpt) if isinstance(ckpt, dict) else type(ckpt)}")
    extra = sorted(set(ckpt) - {"state_dict", "latent_avg", "opts"})
    if extra:
        raise ValueError(f"e4e checkpoint {p}: unexpected top-level keys {extra} (expected state_dict, latent_avg, "
                         "opts)")
    sd = ckpt["state_dict"]
    stray = sorted(k for k in sd if not k.startswith(("encoder.", "decoder.")))
    if stray:
        raise ValueError(f"e4e checkpoint {p}: unexpected keys {stray[:8]} in state_dict (only encoder.* and "
                         "decoder.* belong there)")
    if "latent_avg" not in ckpt:
        raise ValueError(f"e4e checkpoint {p} has no latent_avg (trained without start_from_latent_avg): the "
                         "encoder's output would be an offset, not a w+ code")
    kept = {k: v for k, v in sd.items() if k.startswith("encoder.")}
    avg = ckpt["latent_avg"]
    # The release stores latent_avg repeated to the style count; a bare [512] mean is repeated the same way.
    kept["latent_avg"] = avg.expand(N_STYLES, STYLE_DIM) if tuple(avg.shape) == (STYLE_DIM,) else avg
    return kept


def load_e4e(path: str | os.PathLike[str], device: Any = "cpu", image_size: int = IMAGE_SIZE) -> E4E:
    """``E4E`` in eval mode with the weights of the released checkpoint at ``path`` (strict keys and shapes; the
    release loads as ``Encoder4Editing(width=64)``, see ``E4E.width``).

    Raises:
        FileNotFoundError, ValueError: see ``read_e4e_checkpoint``; missing/unexpected ``encoder.*`` keys or shape
            mismatches are named.
    """
    from idforge.methods.base import check_state_keys

    sd = read_e4e_checkpoint(path)
    # The release is width 64; the width is read from the stem so test encoders load too, every other key and
    # shape is then checked strictly against that width.
    stem = sd.get("encoder.input_layer.0.weight")
    width = int(stem.shape[0]) if stem is not None and stem.ndim == 4 else 64
    try:
        with torch.device("meta"):
            model = E4E(image_size, width)
    except ValueError as exc:
        raise ValueError(f"e4e checkpoint {path}: {exc}") from None
    check_state_keys(model.state_dict(), sd, source=f"e4e checkpoint {path}")
    model.load_state_dict(sd, strict=True, assign=True)
    return model.to(device).eval().requires_grad_(False)
