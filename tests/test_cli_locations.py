"""The rest of the CLI's location options take s3:// too (the stage commands are tested in test_cli_s3_e2e)."""

from __future__ import annotations

import pytest
from typer.testing import CliRunner

from idforge.cli import app
from idforge.io.locations import local_output_file


@pytest.mark.s3
def test_make_tiny_writes_to_s3_and_inspect_and_gates_read_from_it(s3_env, s3_prefix, tmp_path, monkeypatch):
    from idforge.io.storage import open_storage

    monkeypatch.setenv("IDFORGE_CACHE", str(tmp_path / "cache"))
    runner = CliRunner()
    target = f"{s3_prefix}/models/tiny-clip"
    made = runner.invoke(app, ["models", "make-tiny", target, "--kind", "clip"])
    assert made.exit_code == 0, made.output
    store = open_storage(target)
    assert store.exists(f"{target}/config.json")

    gates = f"{s3_prefix}/gates.yaml"
    store.write_text(gates, "alias: champion\ngates:\n  - metric: clip_t\n    op: '>='\n    value: 0.2\n")
    # the gates file is read from S3; what fails is the run id, not the location
    res = runner.invoke(app, ["register", "--run", "0" * 32, "--gates", gates,
                              "--set", f"tracking.uri=sqlite:///{tmp_path}/mlruns.db"])
    assert res.exit_code != 0
    assert f"MLflow run '{'0' * 32}' does not exist" in str(res.exception)
    missing = runner.invoke(app, ["register", "--run", "0" * 32, "--gates", f"{s3_prefix}/nope.yaml",
                                  "--set", f"tracking.uri=sqlite:///{tmp_path}/mlruns.db"])
    assert "nope.yaml" in str(missing.exception) and "s3:/" + "/" in str(missing.exception)


@pytest.mark.s3
def test_a_one_file_output_is_uploaded_only_when_the_block_succeeds(s3_env, s3_prefix):
    from idforge.io.storage import open_storage

    ok, failed = f"{s3_prefix}/out/table.csv", f"{s3_prefix}/out/broken.csv"
    with local_output_file(ok) as path:
        path.write_text("a,b\n1,2\n")
    assert open_storage(ok).read_text(ok) == "a,b\n1,2\n"
    with pytest.raises(RuntimeError), local_output_file(failed) as path:
        path.write_text("partial")
        raise RuntimeError("the table failed half-way")
    assert not open_storage(failed).exists(failed)


def test_a_local_one_file_output_is_the_path_itself(tmp_path):
    with local_output_file(str(tmp_path / "t.csv")) as path:
        assert path == tmp_path / "t.csv"
