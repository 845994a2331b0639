"""End to end on tiny models: generate (2 identities x 3 prompts x 2 seeds) -> evaluate -> report -> MLflow ->
registry (the pyfunc model generates in a fresh process; a failing gate leaves the alias alone) -> compare."""

from __future__ import annotations

import html.parser
import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml
from PIL import Image

from idforge.config import IdforgeConfig

REPO = Path(__file__).resolve().parents[1]
IDENTITIES = ["obama", "macron"]
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def e2e(tmp_path_factory, tiny_sd15_dir, tiny_clip_dir, samples_dir):
    from idforge.diffusion.loading import load_pipeline
    from idforge.evaluate.generate import generate_images
    from idforge.evaluate.run import evaluate_generated
    from idforge.methods.checkpoint import save_method
    from tests.test_generate_plain_method import PlainNoIdentity

    root = tmp_path_factory.mktemp("e2e")
    uri = f"sqlite:///{(root / 'mlruns.db').as_posix()}"
    cfg = IdforgeConfig.model_validate({
        "model": {"base": str(tiny_sd15_dir), "clip": str(tiny_clip_dir)},
        "tracking": {"uri": uri, "experiment": "e2e"},
        "generate": {"protocol": str(REPO / "configs/protocols/smoke.yaml"), "batch_size": 2},
        "evaluate": {"protocol": str(REPO / "configs/protocols/smoke.yaml"), "clip_model": str(tiny_clip_dir)},
    })
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MLFLOW_TRACKING_URI", uri)
        pipe = load_pipeline(tiny_sd15_dir)
        method = PlainNoIdentity()
        method.attach(pipe)
        artifact = save_method(method, root / "method.safetensors")
        method.detach(pipe)
        gen = generate_images(None, artifact, samples_dir, None, None, None, root / "gen", cfg,
                              identities=IDENTITIES, pipe=pipe)
        ev = evaluate_generated(root / "gen", samples_dir, root / "eval", cfg)
        yield {"root": root, "cfg": cfg, "uri": uri, "gen": gen, "eval": ev, "artifact": artifact, "pipe": pipe,
               "samples": samples_dir}


def test_generation_covers_the_protocol(e2e):
    idx = e2e["gen"].index
    assert e2e["gen"].generated == 12 and e2e["gen"].skipped == 0
    assert len(idx) == 12
    assert sorted(idx["identity"].unique()) == sorted(IDENTITIES)
    assert idx.groupby("identity").size().tolist() == [6, 6]
    assert sorted(idx["seed"].unique()) == [0, 1]
    assert idx["prompt_template"].nunique() == 3
    gen_dir = e2e["root"] / "gen"
    for rec in idx.to_dict("records"):
        png = gen_dir / rec["image"]
        side = json.loads(png.with_suffix(".json").read_text())
        assert side["seed"] == rec["seed"] and side["prompt"] == rec["prompt"]
        assert side["artifact_sha256"] and side["sampling"]["num_inference_steps"] == 2
        assert "{}" not in side["prompt"] and "a person" in side["prompt"]
        assert Image.open(png).size == (64, 64)
    assert (gen_dir / "refs" / "obama" / "0.png").is_file()
    assert sorted(json.loads((gen_dir / "generate.json").read_text())["identities"]) == sorted(IDENTITIES)


def test_generation_is_resumable_and_deterministic_per_seed(e2e, tmp_path):
    from idforge.evaluate.generate import generate_images

    copy = tmp_path / "gen"
    shutil.copytree(e2e["root"] / "gen", copy)
    idx = e2e["gen"].index
    # every image of one (identity, seed): regenerated in the same prompt batches, so bit for bit the same
    victims = [copy / p for p in idx[(idx.identity == "macron") & (idx.seed == 1)]["image"]]
    before = [np.asarray(Image.open(v)) for v in victims]
    for v in victims:
        v.unlink()
    again = generate_images(None, e2e["artifact"], e2e["samples"], None, None, None, copy, e2e["cfg"],
                            identities=IDENTITIES, pipe=e2e["pipe"])
    assert (again.generated, again.skipped) == (3, 9)
    for v, b in zip(victims, before, strict=True):
        np.testing.assert_array_equal(np.asarray(Image.open(v)), b)
    # a changed recipe (other sampling) is not mistaken for done work
    cfg2 = e2e["cfg"].model_copy(deep=True)
    cfg2.generate.num_inference_steps = 3
    third = generate_images(None, e2e["artifact"], e2e["samples"], None, [0], None, copy, cfg2,
                            identities=["obama"], pipe=e2e["pipe"])
    assert (third.generated, third.skipped) == (3, 0)
    recorded = {rec["image"]: json.loads((copy / rec["image"]).with_suffix(".json").read_text())["sampling"][
        "num_inference_steps"] for rec in idx.to_dict("records")}
    redone = set(idx[(idx.identity == "obama") & (idx.seed == 0)]["image"])
    assert len(redone) == 3 and recorded == {img: 3 if img in redone else 2 for img in recorded}
    # another seed gives another picture, not a few changed pixels (same identity, prompt and recipe)
    for _, same in idx[idx.identity == "macron"].groupby("prompt_template"):
        a, b = (np.asarray(Image.open(e2e["root"] / "gen" / p)).astype(int) for p in same.sort_values("seed")["image"])
        assert np.abs(a - b).mean() > 5, same["image"].tolist()


def test_metrics_parquet(e2e):
    m = pd.read_parquet(e2e["root"] / "eval" / "metrics.parquet")
    assert len(m) == 12
    for col in ("id_sim_opencv", "id_sim_insightface", "face_detected_opencv", "face_detected_insightface",
                "clip_t", "clip_i", "lpips_shift_tolerant", "div_lpips_shift_tolerant"):
        assert col in m.columns, col
    # a tiny random model draws no faces: every image is counted, detection rate 0, ID similarity scored 0
    assert not m["face_detected_opencv"].any() and not m["face_detected_insightface"].any()
    s = e2e["eval"].summary
    assert s["face_det_rate_opencv"] == 0.0 and s["id_sim_opencv"] == 0.0 and np.isnan(s["id_sim_opencv_excl_missing"])
    assert s["num_images"] == 12
    assert np.isfinite(m["clip_t"]).all() and (m["clip_t"].abs() <= 1).all()
    assert (m["lpips_shift_tolerant"] > 0).all() and (m["div_lpips_shift_tolerant"] > 0).all()
    aggr = e2e["eval"].aggregates
    assert list(aggr["identity"].index) == sorted(IDENTITIES)
    assert sorted(aggr["category"].index) == ["background", "clothing", "plain"]
    assert aggr["method"].index.tolist() == ["test-no-identity"]
    assert aggr["category"]["clip_t"].mean() == pytest.approx(m["clip_t"].mean(), rel=1e-5)  # 4 images each


class _Page(html.parser.HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.imgs: list[dict[str, str]] = []
        self.tables: dict[str, int] = {}
        self._table: str | None = None
        self.links: list[str] = []

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if tag == "img":
            self.imgs.append(a)
        elif tag == "table":
            self._table = a.get("id")
            if self._table:
                self.tables[self._table] = 0
        elif tag == "tr" and self._table:
            self.tables[self._table] += 1
        elif tag == "a":
            self.links.append(a.get("href", ""))

    def handle_endtag(self, tag):
        if tag == "table":
            self._table = None


def test_report_html_has_tables_and_every_image(e2e):
    ev_dir = e2e["root"] / "eval"
    text = (ev_dir / "report.html").read_text()
    page = _Page()
    page.feed(text)
    assert page.tables["metrics-summary"] > 5  # header + one row per metric
    assert page.tables["metrics-category"] == 4 and page.tables["metrics-identity"] == 3
    assert page.imgs == [] and "base64" not in text  # the index page embeds nothing: it stays small
    assert {f"identities/{i}.html" for i in IDENTITIES} <= set(page.links)
    assert "<svg" in text and text.count('class="bar"') >= 3
    assert any(e2e["eval"].run_id in link for link in page.links)
    assert "http://" not in text.replace("http://127.0.0.1:5000", "").replace("http://www.w3.org/2000/svg", "")
    gen, refs = [], []
    for ident in IDENTITIES:
        sub = _Page()
        sub.feed((ev_dir / "identities" / f"{ident}.html").read_text())
        gen += [i for i in sub.imgs if i.get("class") == "gen"]
        refs += [i for i in sub.imgs if i.get("class") == "ref"]
        full = [link for link in sub.links if link.endswith(".png")]
        assert len(full) == 6 and all((ev_dir / "identities" / link).resolve().is_file() for link in full)
    assert sorted(i["alt"] for i in gen) == sorted(e2e["gen"].index["image"])
    n_refs = sum(len(list((e2e["samples"] / ident).glob("*.*"))) for ident in IDENTITIES)
    assert len(refs) == n_refs
    for img in gen + refs:  # every thumbnail is a decodable file beside the pages
        Image.open(ev_dir / "identities" / img["src"]).verify()


def test_report_renders_in_chromium(e2e, tmp_path):
    from idforge.evaluate.browser import check_images, screenshot

    ev_dir = e2e["root"] / "eval"
    total = 0
    for ident in IDENTITIES:
        check = check_images(ev_dir / "identities" / f"{ident}.html")
        assert check.broken == []
        total += check.total
    assert total == 12 + sum(len(list((e2e["samples"] / i).glob("*.*"))) for i in IDENTITIES)
    shot = screenshot(ev_dir / "report.html", tmp_path / "report.png")
    im = np.asarray(Image.open(shot).convert("RGB"))
    assert im.shape[:2] == (2400, 1400) and im.std() > 10  # something rendered, not a blank page


def test_mlflow_run_has_metrics_table_grids_and_report(e2e):
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=e2e["uri"])
    run = client.get_run(e2e["eval"].run_id)
    assert run.info.status == "FINISHED"
    assert run.data.metrics["clip_t"] == pytest.approx(e2e["eval"].summary["clip_t"])
    assert run.data.metrics["face_det_rate_opencv"] == 0.0
    assert "cat.clothing.clip_t" in run.data.metrics
    assert run.data.params["method"] == "test-no-identity"
    names = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"report.html", "metrics.parquet", "metrics_table.json", "generate.json", "summary.json",
            "identities", "thumbs"} <= names
    pages = {a.path for a in client.list_artifacts(run.info.run_id, "identities")}
    assert pages == {"identities/obama.html", "identities/macron.html"}
    grids = {a.path for a in client.list_artifacts(run.info.run_id, "grids")}
    assert grids == {"grids/obama.png", "grids/macron.png"}


_FRESH = textwrap.dedent("""
    import base64, sys, pathlib
    import mlflow, pandas as pd
    name, out, *photos = sys.argv[1:]
    model = mlflow.pyfunc.load_model(f"models:/{name}@champion")
    refs = [base64.b64encode(pathlib.Path(p).read_bytes()).decode() for p in photos]
    res = model.predict(pd.DataFrame({"prompt": ["a photo of {} in the snow"], "reference_images": [refs],
                                      "seed": [1]}))
    pathlib.Path(out).write_bytes(base64.b64decode(res["image"][0]))
    print(res["prompt"][0])
""")


def test_register_pyfunc_in_fresh_process_and_gates(e2e, tmp_path):
    from mlflow import MlflowClient

    from idforge.evaluate.register import register_run

    passing = tmp_path / "gates_ok.yaml"
    passing.write_text(yaml.safe_dump({"model_name": "e2e-plain", "gates": [
        {"metric": "clip_i", "op": ">=", "value": -1.0},
        {"metric": "face_det_rate_opencv", "op": ">=", "value": 0.0},
    ]}))
    ok = register_run(e2e["eval"].run_id, passing, e2e["cfg"])
    assert ok.promoted and ok.version == "1" and not ok.failed
    client = MlflowClient(tracking_uri=e2e["uri"])
    assert str(client.get_model_version_by_alias("e2e-plain", "champion").version) == "1"

    # the registered model, loaded by alias in a fresh process, generates from a prompt and reference photos
    out = tmp_path / "pred.png"
    photos = [str(e2e["samples"] / "obama" / f) for f in ("1.jpg", "2.jpg")]
    env = {**os.environ, "MLFLOW_TRACKING_URI": e2e["uri"], "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-c", _FRESH, "e2e-plain", str(out), *photos], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip().splitlines()[-1] == "a photo of a person in the snow"
    # same method, prompt and seed as the driver's image: the same picture (this method ignores the identity).
    # The driver ran this prompt in a batch of two, the model alone: float rounding may move a pixel by 1.
    idx = e2e["gen"].index
    row = idx[(idx.identity == "obama") & (idx.category == "background") & (idx.seed == 1)].iloc[0]
    pred = np.asarray(Image.open(out).convert("RGB")).astype(int)
    ref = np.asarray(Image.open(e2e["root"] / "gen" / row["image"]).convert("RGB")).astype(int)
    assert pred.shape == ref.shape == (64, 64, 3)
    assert np.abs(pred - ref).max() <= 2 and (pred != ref).mean() < 0.01
    other_seed = idx[(idx.identity == "obama") & (idx.category == "background") & (idx.seed == 0)].iloc[0]
    assert np.abs(pred - np.asarray(Image.open(e2e["root"] / "gen" / other_seed["image"])).astype(int)).mean() > 5

    # the repository's gates fail on a tiny random model: a new version, the alias stays on version 1
    bad = register_run(e2e["eval"].run_id, REPO / "configs/gates.yaml", e2e["cfg"], model_name="e2e-plain")
    assert not bad.promoted and bad.version == "2"
    assert {g.gate.metric for g in bad.failed} == {"id_sim_opencv_excl_missing", "clip_t", "face_det_rate_opencv"}
    assert "face_det_rate_opencv >= 0.8 (FAIL: 0.0000)" in bad.summary()
    assert str(client.get_model_version_by_alias("e2e-plain", "champion").version) == "1"
    assert client.get_model_version("e2e-plain", "2").tags["idforge.gates_passed"] == "false"


def test_compare_runs(e2e, tmp_path):
    import mlflow

    from idforge.evaluate.run import compare_runs

    mlflow.set_tracking_uri(e2e["uri"])
    with mlflow.start_run(experiment_id=mlflow.get_run(e2e["eval"].run_id).info.experiment_id) as other:
        mlflow.log_param("method", "other")
        mlflow.log_metrics({"clip_t": e2e["eval"].summary["clip_t"] + 0.25, "id_sim": 0.5})
    df = compare_runs([e2e["eval"].run_id, other.info.run_id], e2e["cfg"], output=tmp_path / "cmp.csv")
    a, b = df.columns[0], df.columns[1]
    assert a.startswith("test-no-identity") and b.startswith("other")
    assert df.loc["clip_t", f"delta {b}"] == pytest.approx(0.25)
    assert df.loc["id_sim", f"delta {b}"] == pytest.approx(0.5)
    assert pd.read_csv(tmp_path / "cmp.csv", index_col=0).shape == df.shape

    from idforge.errors import ConfigError

    with pytest.raises(ConfigError, match="does not exist"):
        compare_runs([e2e["eval"].run_id, "0" * 32], e2e["cfg"])


def test_register_as_pipelines_do_and_champion_rule(e2e, tmp_path, tiny_sd15_dir):
    """Gates as YAML text, explicit artifact/method/base model, 'beats the champion' rule, champion download."""
    import mlflow

    from idforge.evaluate.register import download_champion, register_run

    gates = yaml.safe_dump({"model_name": "e2e-pipe", "gates": [{"metric": "clip_t", "op": ">=", "value": -1.0}]})
    kw = {"artifact": e2e["artifact"], "method": "test-no-identity", "base_model": str(tiny_sd15_dir),
          "compare_to_champion": True}
    assert download_champion("test-no-identity", e2e["cfg"], tmp_path / "none", model_name="e2e-pipe") is None
    first = register_run(e2e["eval"].run_id, gates, e2e["cfg"], **kw)
    assert first.promoted and first.worse_than_champion == []  # no champion yet: the gates decide
    got = download_champion("test-no-identity", e2e["cfg"], tmp_path / "champ", model_name="e2e-pipe")
    assert got is not None and got.read_bytes() == Path(e2e["artifact"]).read_bytes()
    # the config's store decides, not MLflow's process-wide URI (the retrain pipeline's step has only its config)
    import os

    saved = os.environ.get("MLFLOW_TRACKING_URI")
    mlflow.set_tracking_uri(f"sqlite:///{tmp_path / 'elsewhere.db'}")
    try:
        again = download_champion("test-no-identity", e2e["cfg"], tmp_path / "champ2", model_name="e2e-pipe")
    finally:
        mlflow.set_tracking_uri(saved or e2e["uri"])
    assert again is not None and again.read_bytes() == got.read_bytes()

    # a candidate that passes the gate but scores lower CLIP-T than the champion is registered, not promoted
    mlflow.set_tracking_uri(e2e["uri"])
    exp = mlflow.get_run(e2e["eval"].run_id).info.experiment_id
    with mlflow.start_run(experiment_id=exp) as worse:
        mlflow.log_metric("clip_t", e2e["eval"].summary["clip_t"] - 0.1)
    second = register_run(worse.info.run_id, gates, e2e["cfg"], **kw)
    assert not second.promoted and all(g.passed for g in second.gates)
    assert len(second.worse_than_champion) == 1 and second.worse_than_champion[0].startswith("clip_t ")
    assert "worse than the champion on: clip_t" in second.summary()
    from mlflow import MlflowClient

    alias = MlflowClient(tracking_uri=e2e["uri"]).get_model_version_by_alias("e2e-pipe", "champion")
    assert str(alias.version) == first.version
