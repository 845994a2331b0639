"""Pipelines: compiled YAML is current, every pipeline has the steps and settings the design asks for."""

from __future__ import annotations

import subprocess
import sys

import pytest
import yaml

from components.images import Images
from pipelines.runner import COMPILED_DIR, PipelineError, build, compile_all, registry

EXPECTED = {"curation", "train-adapter", "personalize", "end-to-end", "retrain"}


def _clean_image_env(monkeypatch):
    monkeypatch.delenv("IDFORGE_IMAGE_REGISTRY", raising=False)
    monkeypatch.delenv("IDFORGE_IMAGE_TAG", raising=False)
    monkeypatch.delenv("IDFORGE_IMAGES_FILE", raising=False)


def test_every_pipeline_is_registered():
    assert set(registry()) == EXPECTED


def test_compiled_yaml_is_up_to_date(tmp_path, monkeypatch):
    _clean_image_env(monkeypatch)
    fresh = compile_all(tmp_path)
    assert {p.stem for p in fresh} == EXPECTED
    for path in fresh:
        committed = COMPILED_DIR / path.name
        assert committed.is_file(), f"{committed} missing: run `idforge pipeline compile` and commit it"
        assert committed.read_text() == path.read_text(), (
            f"{committed} is stale: run `idforge pipeline compile` and commit the result"
        )


def _executors(spec: dict) -> dict[str, dict]:
    return spec["deploymentSpec"]["executors"]


def _all_tasks(spec: dict) -> dict[str, dict]:
    tasks = dict(spec["root"]["dag"]["tasks"])
    for comp in spec["components"].values():
        tasks.update(comp.get("dag", {}).get("tasks", {}))
    return tasks


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_images_resources_and_caching(name, tmp_path, monkeypatch):
    _clean_image_env(monkeypatch)
    images = Images.load(registry="registry.test/team", tag="t1")
    from kfp import compiler

    out = tmp_path / f"{name}.yaml"
    compiler.Compiler().compile(build(name, images), package_path=str(out))
    spec = next(yaml.safe_load_all(out.read_text()))
    execs = _executors(spec)
    for key, ex in execs.items():
        container = ex.get("container")
        if container is None:  # importer
            continue
        image = container["image"]
        assert image in {images.cpu, images.cuda}, f"{key} runs {image}"
        gpu_stage = any(s in key for s in ("prepare", "finetune-identity", "generate"))
        assert (image == images.cuda) == (gpu_stage or "train-adapter" in key), f"{key} in the wrong image"
        if gpu_stage:
            assert container["resources"]["accelerator"]["resourceCount"] == "1"
        if "train-adapter" in key:  # GPUs come from the Ray cluster, not this pod
            assert "accelerator" not in container["resources"]
        assert "resources" in container
        # no pip install at run time: the image carries everything
        assert "pip install" not in " ".join(container.get("command", []))
    tasks = _all_tasks(spec)
    for task_name, task in tasks.items():
        comp = task.get("componentRef", {}).get("name", "")
        caching = task.get("cachingOptions", {}).get("enableCache", False)
        if any(s in comp for s in ("train-adapter", "finetune-identity", "open-parent-run", "close-parent-run",
                                   "register", "champion")):
            assert not caching, f"{task_name} must not be cached"
        elif any(s in comp for s in ("comp-curate", "comp-prepare", "comp-generate", "comp-evaluate")):
            assert caching, f"{task_name} should be cached"


def test_end_to_end_branches_on_the_method_regime(monkeypatch, tmp_path):
    _clean_image_env(monkeypatch)
    compile_all(tmp_path)
    spec = next(yaml.safe_load_all((tmp_path / "end-to-end.yaml").read_text()))
    text = yaml.safe_dump(spec)
    assert "method-regime" in text
    assert "for-loop" in text  # per-identity fan-out
    assert "comp-train-adapter" in spec["components"]
    params = spec["root"]["inputDefinitions"]["parameters"]
    assert {"raw_uri", "base_model", "method", "config_yaml"} <= set(params)


# ----------------------------------------------------------------------------------------------------------------
# the platform config: what a step pod needs from the cluster, read back from every committed pipeline


def _compiled(name: str) -> tuple[dict, dict]:
    """(pipeline spec, kubernetes platform spec per executor) of the committed pipelines/compiled/<name>.yaml."""
    pipeline, platform = yaml.safe_load_all((COMPILED_DIR / f"{name}.yaml").read_text())
    return pipeline, platform["platforms"]["kubernetes"]["deploymentSpec"]["executors"]


def _env_sources(k8s: dict) -> tuple[dict[str, set[str]], dict[str, set[str]]]:
    secrets = {s["secretName"]: {k["secretKey"] for k in s["keyToEnv"]} for s in k8s.get("secretAsEnv", [])}
    maps = {c["configMapName"]: {k["configMapKey"] for k in c["keyToEnv"]} for c in k8s.get("configMapAsEnv", [])}
    return secrets, maps


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_every_step_gets_its_environment_and_gpu_steps_their_nodes(name):
    from pipelines.platform import Platform

    platform = Platform()
    pipeline, k8s = _compiled(name)
    containers = {k: ex["container"] for k, ex in _executors(pipeline).items() if "container" in ex}
    assert containers and set(k8s) == set(containers), "every container step needs a platform entry"
    for key, container in containers.items():
        secrets, maps = _env_sources(k8s[key])
        assert maps == {platform.settings.name: set(platform.settings.keys)}, key
        assert secrets[platform.s3_secret.name] == {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"}, key
        assert secrets[platform.mlflow_secret.name] == set(platform.mlflow_secret.keys), key
        labels = k8s[key]["podMetadata"]["labels"]
        assert labels["idforge.io/s3-client"] == labels["idforge.io/mlflow-client"] == "true", key
        # the Ray token and the label that reaches the Ray head: only the steps that submit to Ray
        ray = "train-adapter" in key
        assert (platform.ray_secret.name in secrets) == ray and ("idforge.io/ray-client" in labels) == ray, key
        gpu = "accelerator" in container.get("resources", {})
        tolerations = k8s[key].get("tolerations", [])
        assert ({"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in tolerations) == gpu, key
        assert (k8s[key].get("nodeSelector", {}).get("labels") == {"nvidia.com/gpu.present": "true"}) == gpu, key
    assert "AWS_SECRET_ACCESS_KEY=" not in (COMPILED_DIR / f"{name}.yaml").read_text()


def test_platform_names_are_set_at_compile_time(tmp_path, monkeypatch):
    from kfp import compiler

    from idforge.errors import ConfigError
    from pipelines.platform import Platform

    _clean_image_env(monkeypatch)
    spec = tmp_path / "platform.yaml"
    spec.write_text("s3_secret: {name: team-s3, keys: [AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY]}\n"
                    "settings: {name: team-settings, keys: [AWS_ENDPOINT_URL, MLFLOW_TRACKING_URI]}\n"
                    "gpu_tolerations: [{key: gpu-pool, operator: Equal, value: a100, effect: NoExecute}]\n"
                    "gpu_node_selector: {pool: a100}\n"
                    "s3_ca_config_map: team-ca\n")
    out = tmp_path / "personalize.yaml"
    compiler.Compiler().compile(build("personalize", platform=Platform.load(spec)), package_path=str(out))
    _, platform = yaml.safe_load_all(out.read_text())
    k8s = platform["platforms"]["kubernetes"]["deploymentSpec"]["executors"]
    secrets, maps = _env_sources(k8s["exec-finetune-identity-chunk"])
    assert "team-s3" in secrets and maps == {"team-settings": {"AWS_ENDPOINT_URL", "MLFLOW_TRACKING_URI"}}
    assert k8s["exec-finetune-identity-chunk"]["tolerations"] == [
        {"key": "gpu-pool", "operator": "Equal", "value": "a100", "effect": "NoExecute"}]
    assert k8s["exec-finetune-identity-chunk"]["nodeSelector"]["labels"] == {"pool": "a100"}
    assert [(v["configMapName"], v["mountPath"]) for v in k8s["exec-plan-identity-chunks"]["configMapAsVolume"]] == [
        ("team-ca", "/etc/idforge-s3-ca")]
    assert "configMapAsVolume" not in _compiled("personalize")[1]["exec-plan-identity-chunks"]  # default: plain HTTP
    spec.write_text("s3_secrets: {name: x, keys: []}\n")
    with pytest.raises(ConfigError, match="unknown config key 's3_secrets'"):
        Platform.load(spec)
    with pytest.raises(ConfigError, match="does not exist"):
        Platform.load(tmp_path / "missing.yaml")


RETRIED = ("curate", "train-adapter", "finetune-identity", "generate", "evaluate")


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_transient_steps_retry_and_the_exit_task_closes_the_parent_run(name):
    pipeline, _ = _compiled(name)
    tasks = _all_tasks(pipeline)
    for task_name, task in tasks.items():
        comp = task.get("componentRef", {}).get("name", "")
        retried = any(comp == f"comp-{s}" or comp.startswith(f"comp-{s}-") for s in RETRIED)
        assert ("retryPolicy" in task) == retried, task_name
        if retried:
            assert task["retryPolicy"]["maxRetryCount"] == 2
    # the whole body runs inside the ExitHandler; the exit task sits beside it, runs whatever the body did, and
    # gets the body's final status and the KFP run id, which open-parent-run tags the parent run with
    root = pipeline["root"]["dag"]["tasks"]
    assert set(root) == {"close-parent-run", "exit-handler-1"}
    close = root["close-parent-run"]
    assert close["triggerPolicy"]["strategy"] == "ALL_UPSTREAM_TASKS_COMPLETED"
    assert close["dependentTasks"] == ["exit-handler-1"]
    inputs = close["inputs"]["parameters"]
    assert inputs["status"]["taskFinalStatus"]["producerTask"] == "exit-handler-1"
    assert inputs["kfp_run_id"]["runtimeValue"]["constant"] == "{{$.pipeline_job_uuid}}"
    opener = next(t for t in tasks.values() if t["componentRef"]["name"] == "comp-open-parent-run")
    assert opener["inputs"]["parameters"]["kfp_run_id"]["runtimeValue"]["constant"] == "{{$.pipeline_job_uuid}}"


@pytest.mark.parametrize("name, per_run", [
    ("train-adapter", {"method", "preset", "steps", "lr", "workers"}),
    ("personalize", {"method", "preset", "steps", "lr", "first_identity", "max_identities", "identities_per_task"}),
    ("end-to-end", {"method", "preset", "steps", "lr", "workers", "first_identity", "max_identities",
                    "identities_per_task"}),
    ("retrain", {"method", "preset", "steps", "lr", "workers"}),
])
def test_per_run_settings_are_typed_parameters(name, per_run):
    pipeline, _ = _compiled(name)
    params = pipeline["root"]["inputDefinitions"]["parameters"]
    assert per_run | {"config_yaml"} <= set(params)
    types = {"preset": "STRING", "method": "STRING", "steps": "NUMBER_INTEGER", "lr": "NUMBER_DOUBLE",
             "workers": "NUMBER_INTEGER", "first_identity": "NUMBER_INTEGER", "max_identities": "NUMBER_INTEGER",
             "identities_per_task": "NUMBER_INTEGER"}
    assert {k: params[k]["parameterType"] for k in per_run} == {k: types[k] for k in per_run}
    assert params["steps"]["defaultValue"] == 0 and params["lr"]["defaultValue"] == 0.0  # 0 = the config's


@pytest.mark.parametrize("name", ["personalize", "end-to-end"])
def test_per_identity_fan_out_is_over_chunks_and_no_pod_receives_every_artifact(name):
    """The ParallelFor iterates the planner's chunks; the chunk pod gets the dataset as a URI (an artifact input
    would be downloaded whole) and its identities, in its chunk item; the gather step collects parameters (the
    chunks' indexes), never the chunk models, so no pod downloads every artifact."""
    pipeline, _ = _compiled(name)
    comps = pipeline["components"]
    chunk = comps["comp-finetune-identity-chunk"]["inputDefinitions"]
    assert "artifacts" not in chunk and "chunk" in chunk["parameters"]
    gather = comps["comp-gather-models"]["inputDefinitions"]
    assert "artifacts" not in gather and gather["parameters"]["indexes"]["parameterType"] == "LIST"
    plan = comps["comp-plan-identity-chunks"]["inputDefinitions"]["parameters"]
    assert plan["identities_per_task"]["parameterType"] == "NUMBER_INTEGER"
    tasks = _all_tasks(pipeline)
    loop = next(t for k, t in tasks.items() if k.startswith("for-loop"))
    assert loop["parameterIterator"]["items"]["inputParameter"] == "pipelinechannel--plan-identity-chunks-Output"
    ft = tasks["finetune-identity-chunk"]["inputs"]["parameters"]
    assert ft["chunk"]["componentInputParameter"].startswith("pipelinechannel--plan-identity-chunks-Output")
    root_params = pipeline["root"]["inputDefinitions"]["parameters"]
    assert root_params["identities_per_task"]["defaultValue"] == 8


def test_unknown_pipeline_names_the_choices():
    with pytest.raises(PipelineError, match="available: curation"):
        build("nope")


def test_cli_compile_and_list(tmp_path):
    out = subprocess.run([sys.executable, "-m", "idforge.cli", "pipeline", "compile", "--out", str(tmp_path)],
                         capture_output=True, text=True, check=True)
    assert len(out.stdout.split()) == len(EXPECTED)
    listed = subprocess.run([sys.executable, "-m", "idforge.cli", "pipeline", "list"], capture_output=True,
                            text=True, check=True)
    assert set(listed.stdout.split()) == EXPECTED


def test_pipeline_config_makes_every_path_a_step_reads_absolute(tmp_path, monkeypatch):
    """Steps run in other processes: the tracking store and protocol files must not depend on their cwd."""
    from idforge.config import load_config_text
    from pipelines.runner import pipeline_config_yaml

    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    cfg = load_config_text("tracking: {uri: 'sqlite:///runs/mlruns.db'}\n"
                           "generate: {protocol: configs/protocols/smoke.yaml}\n"
                           "evaluate: {protocol: s3://bucket/protocol.yaml}\n")
    out = yaml.safe_load(pipeline_config_yaml(cfg, tmp_path / "repo"))
    assert out["tracking"]["uri"] == f"sqlite:///{tmp_path / 'runs' / 'mlruns.db'}"
    assert out["generate"]["protocol"] == str(tmp_path / "repo" / "configs" / "protocols" / "smoke.yaml")
    assert out["evaluate"]["protocol"] == "s3://bucket/protocol.yaml"  # URIs are left alone
    assert cfg.generate.protocol == "configs/protocols/smoke.yaml"  # the caller's config is not modified


@pytest.mark.parametrize("name", ["train-adapter", "end-to-end", "retrain"])
def test_the_prepare_engine_is_a_pipeline_parameter(name):
    pipeline, _ = _compiled(name)
    param = pipeline["root"]["inputDefinitions"]["parameters"]["prepare_engine"]
    assert param["parameterType"] == "STRING" and param["defaultValue"] == ""  # "" = the config's prepare.engine
    prep = next(t for t in _all_tasks(pipeline).values() if t["taskInfo"]["name"] == "prepare")
    # inside the exit handler's sub-DAG the pipeline's parameters arrive as channels named after them
    assert prep["inputs"]["parameters"]["engine"]["componentInputParameter"].endswith("-prepare_engine")
    assert prep["inputs"]["parameters"]["ray_address"]["componentInputParameter"].endswith("-ray_address")
