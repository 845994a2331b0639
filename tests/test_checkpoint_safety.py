"""Training checkpoints are data, not code: every file loads with ``torch.load(weights_only=True)``, the RNG
states included, and a checkpoint that carries a pickled callable is refused instead of run."""

from __future__ import annotations

import pickle
import random

import numpy as np
import pytest
import torch

from idforge.train import checkpoint as ckpt


def _draws(generator: torch.Generator) -> list[float]:
    return [float(np.random.rand()), random.random(), float(torch.rand(1)), float(torch.rand(1, generator=generator))]


def test_rng_states_round_trip_through_weights_only_files(tmp_path):
    generator = torch.Generator().manual_seed(3)
    np.random.seed(5)
    random.seed(7)
    torch.manual_seed(9)
    torch.save(ckpt.capture_rng(generator), tmp_path / ckpt.rng_file(1))
    expected = _draws(generator)
    np.random.seed(0)
    random.seed(0)
    torch.manual_seed(0)
    generator.manual_seed(0)
    state = ckpt.read_rng(tmp_path, 1)
    assert state is not None and ckpt.read_rng(tmp_path, 0) is None
    ckpt.restore_rng(state, generator)
    assert _draws(generator) == expected  # every stream continues exactly where it was captured


class _Payload:
    def __reduce__(self):  # what a hostile checkpoint would carry: a call made at load time
        return (print, ("payload ran",))


@pytest.mark.parametrize("name", [ckpt.STATE_FILE, ckpt.rng_file(0)])
def test_a_checkpoint_carrying_code_is_refused(tmp_path, name, capsys):
    torch.save({"step": 1, "x": _Payload()}, tmp_path / name)
    read = ckpt.read_state if name == ckpt.STATE_FILE else (lambda d: ckpt.read_rng(d, 0))
    with pytest.raises(pickle.UnpicklingError, match="Weights only load failed"):
        read(tmp_path)
    assert "payload ran" not in capsys.readouterr().out
