"""The torch ArcFace replays the ONNX graph exactly and passes gradients to the image."""

from __future__ import annotations

import numpy as np
import pytest


@pytest.mark.slow  # imports torch and runs ArcFace twice: ~5 s on 2 cores
def test_torch_arcface_matches_onnxruntime_and_has_gradients(face_photos, insightface_analyzer):
    import torch
    from PIL import Image

    from idforge.faces.align import align_face
    from idforge.faces.torch_arcface import arcface_input, load_torch_arcface

    crops = []
    for rel in ("obama/1.jpg", "macron/2.jpg", "ardern/1.jpg"):
        rgb = np.asarray(Image.open(face_photos.root / rel).convert("RGB"))
        crops.append(align_face(rgb, insightface_analyzer.detect(rgb)[0].kps, 112))
    crops = np.stack(crops)
    ref = insightface_analyzer.embed_aligned(crops)

    model = load_torch_arcface()
    assert not any(p.requires_grad for p in model.parameters())
    x = arcface_input(crops).requires_grad_(True)
    emb = model(x)
    assert emb.shape == (3, 512) and emb.dtype == torch.float32
    cos = (emb.detach().numpy() * ref).sum(1)
    assert cos.min() > 0.999, cos
    # An identity loss pulls the first face towards the second: the gradient reaches every input pixel block.
    loss = 1 - (emb[0] * emb[1].detach()).sum()
    loss.backward()
    assert x.grad is not None and x.grad[0].abs().sum() > 0 and x.grad[1].abs().sum() == 0
