"""Training-state checkpoints: everything a resumed run needs to continue as if it had never stopped.

A checkpoint directory holds
    train_state.pt        (rank 0) method weights, optimizer, LR schedule, EMA, step, samples seen
    method.safetensors    (rank 0) the method as ``save_method`` writes it (EMA weights when exported so)
    rng_rank<r>.pt        (every rank) its noise generator and the global torch/numpy/python RNG states
Ray Train merges the files every rank reports into one directory; the local loop writes the same layout.
"""

from __future__ import annotations

import logging
import random
from pathlib import Path
from typing import Any

import numpy as np

log = logging.getLogger(__name__)

STATE_FILE = "train_state.pt"
METHOD_FILE = "method.safetensors"


def rng_file(rank: int) -> str:
    return f"rng_rank{rank}.pt"


def capture_rng(generator: Any) -> dict[str, Any]:
    import torch

    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state = {
        "generator": generator.get_state(),
        "torch": torch.get_rng_state(),
        # numpy's state as a tensor and plain numbers: the file then loads with weights_only=True (no pickled
        # numpy objects, so no code can ride along in a checkpoint)
        "numpy": {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                  "has_gauss": int(has_gauss), "cached_gaussian": float(cached)},
        "python": random.getstate(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng(state: dict[str, Any], generator: Any) -> None:
    import torch

    generator.set_state(state["generator"])
    torch.set_rng_state(state["torch"])
    n = state["numpy"]
    np.random.set_state((n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"],
                         n["cached_gaussian"]))
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def write_rank_files(directory: Path, rank: int, generator: Any, state: dict[str, Any] | None,
                     method: Any | None, export_weights: dict[str, Any] | None = None) -> None:
    """Write this rank's part of a checkpoint into ``directory`` (rank 0 also the shared state and the method)."""
    import torch

    torch.save(capture_rng(generator), directory / rng_file(rank))
    if rank == 0:
        assert state is not None and method is not None
        torch.save(state, directory / STATE_FILE)
        from idforge.methods.checkpoint import save_method

        if export_weights is not None:
            live = {k: v.detach().clone() for k, v in method.state_dict().items()}
            method.load_state_dict(export_weights)
            try:
                save_method(method, directory / METHOD_FILE)
            finally:
                method.load_state_dict(live)
        else:
            save_method(method, directory / METHOD_FILE)


def read_state(directory: Path) -> dict[str, Any]:
    import torch

    path = Path(directory) / STATE_FILE
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {directory} has no {STATE_FILE}")
    # weights_only: a checkpoint is data, not code (tensors, dicts, numbers).
    return torch.load(path, map_location="cpu", weights_only=True)


def read_rng(directory: Path, rank: int) -> dict[str, Any] | None:
    import torch

    path = Path(directory) / rng_file(rank)
    if not path.is_file():
        return None
    return torch.load(path, map_location="cpu", weights_only=True)
