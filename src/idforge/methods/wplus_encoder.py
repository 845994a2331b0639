"""An e4e-style W+ encoder (Tov et al., 2021): face image -> w+ (18, 512), for PIDiff's Visual Guidance Module.

Structure as in e4e's ``Encoder4Editing``: a convolutional backbone gives a feature pyramid (coarse 16x16 ...,
here three scales); ``map2style`` heads (strided convs down to 1x1, then a linear) turn it into styles; styles
0-2 read the coarsest level, 3-6 the middle (top-down merged) and 7-17 the finest. As in e4e, w+ = w_0 repeated plus
per-layer offsets (w_i = w_0 + delta_i), so the layers share one base latent and differ where they need to.

No weights ship with idforge. ``load_wplus_encoder(path)`` reads a checkpoint of THIS module (safetensors or a torch
file holding a state dict, optionally under ``state_dict``/``encoder`` with an ``encoder.`` prefix); a converted e4e
checkpoint must match these keys. Without a path the encoder is randomly initialised (tests, shape checks).
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

N_STYLES = 18
STYLE_DIM = 512
COARSE = range(0, 3)  # e4e: styles 0-2 from the coarsest features
MIDDLE = range(3, 7)  # 3-6 from the middle level
FINE = range(7, 18)  # 7-17 from the finest level


class _Block(nn.Module):
    """conv3x3(stride) -> BN -> PReLU -> conv3x3 -> BN, plus a 1x1 shortcut (an IR block, as e4e's backbone)."""

    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout), nn.PReLU(cout),
            nn.Conv2d(cout, cout, 3, 1, 1, bias=False), nn.BatchNorm2d(cout))
        self.short = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x: Tensor) -> Tensor:
        return self.body(x) + self.short(x)


class _Map2Style(nn.Module):
    """(B, C, s, s) -> (B, style_dim): log2(s) strided convs (``channels`` wide) to 1x1, then a linear
    (e4e's GradualStyleBlock, where channels = 512)."""

    def __init__(self, cin: int, style_dim: int, spatial: int, channels: int) -> None:
        super().__init__()
        layers: list[nn.Module] = [nn.Conv2d(cin, channels, 3, 2, 1), nn.LeakyReLU(0.2)]
        s = spatial // 2
        while s > 1:
            layers += [nn.Conv2d(channels, channels, 3, 2, 1), nn.LeakyReLU(0.2)]
            s //= 2
        self.convs = nn.Sequential(*layers)
        self.linear = nn.Linear(channels, style_dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.linear(self.convs(x).flatten(1))


class WPlusEncoder(nn.Module):
    """Aligned face RGB (B, 3, H, W) in [0, 1] -> w+ (B, 18, 512).

    ``image_size`` (default 256, e4e's input) is what images are resized to; ``width`` the backbone's base
    channels (e4e's IR-SE50 uses 64..512, map2style heads 8 * width = 512; smaller widths make cheap test encoders).
    """

    def __init__(self, image_size: int = 256, width: int = 64, style_dim: int = STYLE_DIM, n_styles: int = N_STYLES
                 ) -> None:
        super().__init__()
        if image_size % 64:
            raise ValueError(f"image_size {image_size} must be a multiple of 64")
        self.image_size, self.style_dim, self.n_styles = image_size, style_dim, n_styles
        w = width
        self.stem = nn.Sequential(nn.Conv2d(3, w, 3, 1, 1, bias=False), nn.BatchNorm2d(w), nn.PReLU(w))
        # Strides: /2 -> /4 (fine, image/4), /8 (middle), /16 (coarse), as e4e's c1/c2/c3 at 64/32/16 for 256 px.
        self.stage1 = nn.Sequential(_Block(w, w, 2), _Block(w, w * 2, 2))
        self.stage2 = _Block(w * 2, w * 4, 2)
        self.stage3 = _Block(w * 4, w * 8, 2)
        s_fine, s_mid, s_coarse = image_size // 4, image_size // 8, image_size // 16
        self.lat_mid = nn.Conv2d(w * 4, w * 8, 1)
        self.lat_fine = nn.Conv2d(w * 2, w * 8, 1)
        self.styles = nn.ModuleList(
            _Map2Style(w * 8, style_dim, s_coarse if i in COARSE else s_mid if i in MIDDLE else s_fine, w * 8)
            for i in range(n_styles))

    def forward(self, images: Tensor) -> Tensor:
        x = images.float()
        if x.shape[-2:] != (self.image_size, self.image_size):
            x = F.interpolate(x, size=(self.image_size, self.image_size), mode="bilinear", align_corners=False)
        x = self.stem(x * 2 - 1)
        c1 = self.stage1(x)
        c2 = self.stage2(c1)
        c3 = self.stage3(c2)
        p2 = F.interpolate(c3, size=c2.shape[-2:], mode="bilinear", align_corners=False) + self.lat_mid(c2)
        p1 = F.interpolate(p2, size=c1.shape[-2:], mode="bilinear", align_corners=False) + self.lat_fine(c1)
        feats = [c3 if i in COARSE else p2 if i in MIDDLE else p1 for i in range(self.n_styles)]
        w0 = self.styles[0](feats[0])
        deltas = [self.styles[i](feats[i]) for i in range(1, self.n_styles)]
        return torch.stack([w0, *[w0 + d for d in deltas]], dim=1)


def _strip(sd: dict[str, Tensor]) -> dict[str, Tensor]:
    for key in ("state_dict", "encoder"):
        if key in sd and isinstance(sd[key], dict):
            sd = sd[key]
    return {k.removeprefix("encoder."): v for k, v in sd.items()}


def load_wplus_encoder(path: str | os.PathLike[str] | None = None, image_size: int = 256, width: int = 64,
                       seed: int = 0) -> WPlusEncoder:
    """A ``WPlusEncoder`` in eval mode, with weights from ``path`` (strict keys) or random init when None.

    The random init is fixed by ``seed`` (and leaves the global RNG untouched), so a process that reloads a trained
    identity sees the same encoder the training process saw.

    Raises:
        FileNotFoundError: ``path`` does not exist.
        ValueError: the checkpoint's keys/shapes do not match this encoder (missing/unexpected keys named).
    """
    from idforge.methods.base import check_state_keys

    p = Path(path) if path is not None else None
    if p is not None and not p.is_file():
        raise FileNotFoundError(f"W+ encoder checkpoint {p} does not exist (set pidiff encoder_path to a "
                                "checkpoint of idforge.methods.wplus_encoder.WPlusEncoder, or leave it empty)")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        enc = WPlusEncoder(image_size=image_size, width=width)
    if p is not None:
        if p.suffix == ".safetensors":
            from safetensors.torch import load_file

            sd = load_file(str(p))
        else:
            sd = torch.load(str(p), map_location="cpu", weights_only=True)
        sd = _strip(dict(sd))
        check_state_keys(enc.state_dict(), sd, source=f"W+ encoder checkpoint {p}")
        enc.load_state_dict(sd, strict=True)
    return enc.eval()
