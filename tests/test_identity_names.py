"""Identity names: one rule (idforge.io.identity) where labels are read and where an identity becomes a path; a
labels.csv row or a dataset row naming '..' can no longer make ``finetune --all`` reach outside its output."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from idforge.curate import group
from idforge.errors import DataError
from idforge.io.identity import MAX_LENGTH, check_identity, identity_path

BAD = ["..", ".", "", ".hidden", "a/b", "a\\b", "/abs", "ann smith", "x" * (MAX_LENGTH + 1), "-dash", "é"]


@pytest.mark.parametrize("name", ["ann", "id-0123abcd", "Obama_2", "a.b", "x" * MAX_LENGTH, "0"])
def test_valid_names_pass_unchanged(name, tmp_path):
    assert check_identity(name) == name
    assert identity_path(tmp_path, name, ".json").parent == tmp_path


@pytest.mark.parametrize("name", BAD)
def test_invalid_names_are_refused_with_the_rule(name, tmp_path):
    with pytest.raises(DataError, match=r"somewhere: .* is not a valid identity name: use 1-64 letters"):
        check_identity(name, "somewhere")
    with pytest.raises(DataError):
        identity_path(tmp_path, name)


def test_labels_csv_row_with_dotdot_is_refused_with_its_line(tmp_path):
    p = tmp_path / "labels.csv"
    p.write_text("file,identity\na.jpg,ann\nb.jpg,..\n")
    with pytest.raises(DataError, match=r"labels.csv line 3: '\.\.' is not a valid identity name"):
        group.read_labels(p)


def test_finetune_all_on_a_dataset_naming_dotdot_leaves_the_output_parent_alone(tmp_path):
    import pandas as pd

    # A dataset whose identities include '..' (curated before names were checked, or edited by hand): each
    # identity's artifact directory is <output>/<identity>, replaced at the end of its training, so '..' was the
    # output's parent, removed and replaced.
    ds = tmp_path / "ds"
    ds.mkdir()
    pd.DataFrame({"identity": ["ann", ".."], "n_images": [2, 2]}).to_parquet(ds / "identities.parquet")
    parent = tmp_path / "parent"
    keep = parent / "keep.txt"
    keep.parent.mkdir()
    keep.write_text("precious")
    out = parent / "out"
    idforge = Path(sys.executable).with_name("idforge")
    proc = subprocess.run([str(idforge), "finetune", "--method", "textual-inversion", "--dataset", str(ds), "-o",
                           str(out), "--all", "--model", str(tmp_path / "no-model")],
                          capture_output=True, text=True, timeout=120, env={**os.environ, "RAY_ADDRESS": ""})
    assert proc.returncode == 2, proc.stderr
    assert "'..' is not a valid identity name" in proc.stderr and "identities.parquet" in proc.stderr
    assert keep.read_text() == "precious" and sorted(p.name for p in parent.iterdir()) == ["keep.txt", "out"]
    assert list(out.iterdir()) == []  # nothing started: refused before any identity ran
