"""Which CLIP image features a prepared dataset holds, so the features generation computes are the same ones.

An adapter trained on the patch tokens of one CLIP model and hidden layer reads another model's or layer's tokens
as noise, silently. So prepare records ``{"model", "hidden_layer", "crop"}`` in its index (``prepared.json``,
key ``clip_features``), training copies the record beside the exported ``method.safetensors``
(``clip_features.json``), and generation refuses to compute reference features that differ, naming both values.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from idforge.errors import ConfigError

FILE = "clip_features.json"


def clip_record(model: str, hidden_layer: int, crop: str) -> dict[str, Any]:
    return {"model": str(model), "hidden_layer": int(hidden_layer), "crop": str(crop)}


def write_beside(out_dir: str | Path, info: dict[str, Any]) -> Path | None:
    """Copy the prepared index's record next to a trained artifact (None when the data has no CLIP features)."""
    from idforge.io.atomic import atomic_write_text

    record = info.get("clip_features")
    if not record:
        return None
    path = Path(out_dir) / FILE
    atomic_write_text(path, json.dumps(record, indent=2, sort_keys=True))
    return path


def read_beside(artifact: str | Path | None) -> dict[str, Any] | None:
    """The record beside a checkpoint file, or None (artifacts of methods without CLIP features have none)."""
    if artifact is None:
        return None
    path = Path(artifact).parent / FILE
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except ValueError as exc:
        raise ConfigError(f"{path} is not valid JSON ({exc}); re-export the trained artifact") from None


def check_clip_features(recorded: dict[str, Any] | None, model: str, hidden_layer: int, crop: str,
                        source: str) -> None:
    """Raise ConfigError when generation's CLIP features differ from the recorded training ones."""
    if not recorded:
        return
    mine = clip_record(model, hidden_layer, crop)
    diff = [k for k in ("model", "hidden_layer", "crop") if recorded.get(k) != mine[k]]
    if not diff:
        return
    keys = {"model": "generate.clip_model (or model.clip)", "hidden_layer": "generate.clip_hidden_layer",
            "crop": "generate.clip_crop"}
    parts = "; ".join(f"{k}: trained on {recorded.get(k)!r}, generating with {mine[k]!r}" for k in diff)
    raise ConfigError(f"{source} was trained on other CLIP features than generation would compute ({parts}): set "
                      + ", ".join(keys[k] for k in diff) + " to the training values (prepare.clip_hidden_layer, "
                      "prepare.clip_crop and model.clip of the prepare run)")


__all__ = ["FILE", "check_clip_features", "clip_record", "read_beside", "write_beside"]
