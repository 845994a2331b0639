"""The registered model, served: base model by reference, inference params through MLflow's real clients.

One registration (tiny SD1.5 + tiny CLIP + the plain no-identity method) into a throw-away SQLite registry; then
``mlflow.pyfunc.load_model(...).predict(..., params=...)`` in this process and ``mlflow models serve
--env-manager local`` in a subprocess answering REST ``/invocations`` calls with params.
"""

from __future__ import annotations

import base64
import io
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml
from PIL import Image

from idforge.config import IdforgeConfig
from tests.fixtures.process import LOOPBACK, free_ports, stop_group, wait_ready

REPO = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.slow  # a registration, two model loads and a model server: ~30 s on an idle 2-core machine
NAME = "served"


@pytest.fixture(scope="module")
def registered(tmp_path_factory, _mlflow_template_db, tiny_sd15_dir, tiny_clip_dir, samples_dir):
    import mlflow
    from mlflow import MlflowClient

    from idforge.diffusion.loading import load_pipeline
    from idforge.evaluate.register import register_run
    from idforge.methods.checkpoint import save_method
    from tests.test_generate_plain_method import PlainNoIdentity

    root = tmp_path_factory.mktemp("registered")
    shutil.copyfile(_mlflow_template_db, root / "mlruns.db")  # migrated once per session
    uri = f"sqlite:///{(root / 'mlruns.db').as_posix()}"
    cfg = IdforgeConfig.model_validate({
        "model": {"base": str(tiny_sd15_dir), "clip": str(tiny_clip_dir)},
        "tracking": {"uri": uri, "experiment": "served"},
        "generate": {"protocol": str(REPO / "configs/protocols/smoke.yaml")},
    })
    pipe = load_pipeline(tiny_sd15_dir)
    method = PlainNoIdentity()
    method.attach(pipe)
    artifact = save_method(method, root / "method.safetensors")
    exp = MlflowClient(tracking_uri=uri).create_experiment("served", (root / "mlartifacts").as_uri())
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MLFLOW_TRACKING_URI", uri)
        mlflow.set_tracking_uri(uri)
        runs = []
        for _ in range(2):  # MLflow logs the model config as the run's params: one evaluation run per version
            with mlflow.start_run(experiment_id=exp) as run:
                mlflow.log_metric("clip_t", 0.5)
            runs.append(run.info.run_id)
        gates = yaml.safe_dump({"model_name": NAME, "gates": [{"metric": "clip_t", "op": ">=", "value": 0.0}]})
        kw = {"artifact": artifact, "method": "test-no-identity"}
        result = register_run(runs[0], gates, cfg, base_model=str(tiny_sd15_dir), **kw)
        # a version whose base model is a hub id this machine does not have
        missing = register_run(runs[1], gates, cfg, base_model="example-org/not-cached-anywhere", **kw)
        photos = [base64.b64encode((samples_dir / "obama" / f).read_bytes()).decode() for f in ("1.jpg", "2.jpg")]
        try:
            yield {"uri": uri, "root": root, "result": result, "missing": missing, "photos": photos,
                   "base": tiny_sd15_dir, "clip": tiny_clip_dir}
        finally:
            mlflow.set_tracking_uri(None)  # back to $MLFLOW_TRACKING_URI for the tests after this module


@pytest.fixture(scope="module")
def loaded(registered):
    """The passing version through MLflow's Python client, loaded once for the module."""
    import mlflow

    mlflow.set_tracking_uri(registered["uri"])
    return mlflow.pyfunc.load_model(f"models:/{NAME}/{registered['result'].version}")


def _request(photos: list[str]) -> pd.DataFrame:
    return pd.DataFrame({"prompt": ["a photo of {} in the snow"], "reference_images": [photos]})


def _pixels(b64: str) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(b64))).convert("RGB")).astype(int)


def _differ(a: np.ndarray, b: np.ndarray) -> bool:
    """Another picture, not a rounding difference: the mean absolute pixel difference is above 2 (of 255)."""
    return a.shape == b.shape and float(np.abs(a - b).mean()) > 2.0


def test_a_version_references_the_base_model_and_carries_its_code(registered):
    from mlflow.artifacts import download_artifacts
    from mlflow.models import Model

    local = download_artifacts(f"models:/{NAME}/{registered['result'].version}", tracking_uri=registered["uri"])
    model = Model.load(os.path.join(local, "MLmodel"))
    flavor = model.flavors["python_function"]
    assert set(flavor["artifacts"]) == {"method"}  # no base_model / clip directory copied in
    cfg = flavor["config"]
    assert cfg["base_model"] == str(registered["base"].resolve())
    assert cfg["clip_model"] == str(registered["clip"].resolve())
    assert os.path.isfile(os.path.join(local, flavor["code"], "idforge", "evaluate", "pyfunc_model.py"))
    size = sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(local) for f in fs)
    base_size = sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(registered["base"]) for f in fs)
    assert size < base_size  # the version is smaller than the (tiny) base model alone

    reqs = open(os.path.join(local, "requirements.txt")).read().split()
    assert not any(r.split("==")[0] == "idforge" for r in reqs), reqs
    assert all("==" in r and "+" not in r for r in reqs), reqs  # pinned, public versions
    assert {"torch", "diffusers", "mlflow", "insightface"} <= {r.split("==")[0] for r in reqs}

    params = {p.name: (p.dtype.name, p.default) for p in model.signature.params.params}
    assert params == {"num_inference_steps": ("long", 2), "guidance_scale": ("double", 3.0),  # the smoke recipe
                      "seed": ("long", 0), "scheduler": ("string", "")}


def test_load_model_predict_takes_the_params(registered, loaded):
    from idforge.errors import DataError

    model = loaded
    req = _request(registered["photos"])
    plain = _pixels(model.predict(req)["image"][0])
    assert (plain == _pixels(model.predict(req, params={"num_inference_steps": 2})["image"][0])).all()  # default
    steps = _pixels(model.predict(req, params={"num_inference_steps": 4})["image"][0])
    guidance = _pixels(model.predict(req, params={"guidance_scale": 9.0})["image"][0])
    seeded = model.predict(req, params={"seed": 7})
    scheduler = _pixels(model.predict(req, params={"scheduler": "DPMSolverSinglestepScheduler"})["image"][0])
    assert _differ(plain, steps) and _differ(plain, guidance) and _differ(plain, scheduler)
    assert (plain == _pixels(model.predict(req)["image"][0])).all()  # the request's scheduler was put back
    assert int(seeded["seed"][0]) == 7 and _differ(plain, _pixels(seeded["image"][0]))
    # a row's own seed wins over the param
    own = model.predict(req.assign(seed=[7]), params={"seed": 3})
    assert int(own["seed"][0]) == 7 and (_pixels(own["image"][0]) == _pixels(seeded["image"][0])).all()
    with pytest.raises(DataError, match=r"params.scheduler='Nope'.*DPMSolverSinglestepScheduler"):
        model.predict(req, params={"scheduler": "Nope"})


def test_an_unavailable_base_model_fails_clearly_and_can_be_pointed_elsewhere(registered):
    import mlflow

    from idforge.errors import ModelNotFoundError

    uri = f"models:/{NAME}/{registered['missing'].version}"
    with pytest.raises(ModelNotFoundError) as err:
        mlflow.pyfunc.load_model(uri)
    msg = str(err.value)
    assert "example-org/not-cached-anywhere" in msg and "Hugging Face cache" in msg
    assert "model_config={'base_model'" in msg and "SERVING_MODEL_CONFIG" in msg and "\n" not in msg
    model = mlflow.pyfunc.load_model(uri, model_config={"base_model": str(registered["base"])})
    assert model.predict(_request(registered["photos"]))["image"][0]


def test_mlflow_models_serve_answers_rest_calls_with_params(registered, loaded, tmp_path):
    import requests

    (port,) = free_ports(1)
    log_path = tmp_path / "serve.log"
    # idforge comes from the model's own code/ (not this checkout's src/); `tests` for the test method's module
    # `mlflow models serve` execs `uvicorn` through the shell: the venv's bin must be on PATH, as it is when the
    # venv is activated (CI runs .venv/bin/python without activating it)
    bin_dir = os.path.dirname(sys.executable)
    env = {**os.environ, "MLFLOW_TRACKING_URI": registered["uri"], "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1",
           "PATH": os.pathsep.join([bin_dir, os.environ.get("PATH", "")])}
    mlflow_cli = shutil.which("mlflow", path=os.path.dirname(sys.executable)) or "mlflow"
    cmd = [mlflow_cli, "models", "serve", "-m", f"models:/{NAME}/{registered['result'].version}",
           "--env-manager", "local", "-h", LOOPBACK, "-p", str(port), "-w", "1"]
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, cwd=tmp_path, env=env, stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True)
    base = f"http://{LOOPBACK}:{port}"
    try:
        wait_ready(proc, lambda: requests.get(f"{base}/ping", timeout=2).status_code == 200, what="mlflow models serve",
                   log_path=log_path, timeout_s=90)

        def call(params: dict | None) -> requests.Response:
            body: dict = {"dataframe_records": _request(registered["photos"]).to_dict("records")}
            if params is not None:
                body["params"] = params
            return requests.post(f"{base}/invocations", data=json.dumps(body),
                                 headers={"Content-Type": "application/json"}, timeout=60)

        first, other = call({"num_inference_steps": 2, "seed": 0}), call({"num_inference_steps": 4, "seed": 5})
        assert first.status_code == other.status_code == 200, (first.text[-500:], other.text[-500:])
        a, b = (r.json()["predictions"][0] for r in (first, other))
        assert (a["seed"], b["seed"]) == (0, 5)
        assert _differ(_pixels(a["image"]), _pixels(b["image"]))
        # the server and the Python client give the same picture for the same request
        same = loaded.predict(_request(registered["photos"]), params={"num_inference_steps": 4, "seed": 5})
        assert np.abs(_pixels(same["image"][0]) - _pixels(b["image"])).max() <= 2
        bad = call({"scheduler": "Nope"})
        assert bad.status_code >= 400 and "params.scheduler='Nope'" in bad.text
    finally:
        stop_group(proc, grace_s=10)


def test_only_schedulers_the_shared_sampler_can_drive_are_offered(tiny_sd15_dir):
    import inspect

    from diffusers import DDIMScheduler

    from idforge.evaluate.pyfunc_model import usable_schedulers

    current = DDIMScheduler.from_pretrained(tiny_sd15_dir, subfolder="scheduler")
    usable = usable_schedulers(current)
    assert {"DDIMScheduler", "DDPMScheduler", "DPMSolverMultistepScheduler", "EulerAncestralDiscreteScheduler"} <= set(
        usable)
    assert not {"PNDMScheduler", "LMSDiscreteScheduler", "HeunDiscreteScheduler"} & set(usable)  # no generator
    assert all("generator" in inspect.signature(cls.step).parameters for cls in usable.values())


@pytest.mark.s3
def test_an_s3_reference_is_downloaded_once_into_the_model_cache(tiny_sd15_dir, s3_env, s3_prefix, tmp_path):
    from idforge.errors import ModelNotFoundError
    from idforge.evaluate.pyfunc_model import resolve_reference
    from idforge.io.storage import open_storage

    open_storage(s3_prefix).upload_dir(tiny_sd15_dir, f"{s3_prefix}/sd15")
    cfg = {"model_cache_dir": str(tmp_path / "cache")}
    local = resolve_reference("base_model", f"{s3_prefix}/sd15", cfg)
    assert local.is_relative_to(tmp_path / "cache")
    files = sorted(p.relative_to(local) for p in local.rglob("*") if p.is_file())
    assert files == sorted(p.relative_to(tiny_sd15_dir) for p in tiny_sd15_dir.rglob("*") if p.is_file())
    assert (local / "unet" / "config.json").read_bytes() == (tiny_sd15_dir / "unet" / "config.json").read_bytes()
    stamps = {f: (local / f).stat().st_mtime_ns for f in files}
    again = resolve_reference("base_model", f"{s3_prefix}/sd15", cfg)
    assert again == local and {f: (again / f).stat().st_mtime_ns for f in files} == stamps  # nothing re-downloaded
    with pytest.raises(ModelNotFoundError, match=r"base_model 's3://.*/nothing' is not available here.*SERVING_MODEL"):
        resolve_reference("base_model", f"{s3_prefix}/nothing", cfg)
