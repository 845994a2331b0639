"""The pipelines: curation, train-adapter, personalize, end-to-end, retrain.

Each builder takes a :class:`~pipelines.platform.Target` (container images + the cluster's platform config) and
returns a ``@dsl.pipeline`` function. Every pipeline receives the idforge config as YAML text (``config_yaml``;
empty = defaults) plus the few settings users change per run as typed parameters (``preset``, ``steps``, ``lr``,
``workers``, the identities range ``first_identity``/``max_identities`` and the fan-out's ``identities_per_task``);
``resolve_config`` applies them once,
so one config drives every step and a step's cache key changes exactly when its inputs or its config do.
Curation reads ``config_yaml`` itself and prepare the preset-resolved config, so changing ``steps`` or ``lr``
keeps both cached.

Caching: on for deterministic steps (curate, prepare, generate, evaluate), off for training and for the steps
with side effects outside the pipeline's artifacts (the MLflow parent run, registering). Retries: the steps that
can fail for reasons outside the code (a node lost, the object store or MLflow briefly away) retry with backoff;
a retried train step re-attaches to its Ray job and resumes from its last checkpoint.

Honest run status: each pipeline's body sits in a ``dsl.ExitHandler`` whose exit task (``close_parent_run``)
ends the MLflow parent run FINISHED or FAILED from ``dsl.PipelineTaskFinalStatus`` and tags the KFP run id.

kfp's local runner does not resolve ``dsl.OneOf``, so the end-to-end pipeline runs generate -> evaluate ->
register inside each regime branch instead of after a merged output.
"""


import contextlib
from collections.abc import Callable, Iterator
from typing import Any

from kfp import dsl
from kfp.dsl import Dataset

from components.curate import curate
from components.evaluate import evaluate, generate, register
from components.finetune import finetune_identity_chunk, gather_models, plan_identity_chunks
from components.prepare import prepare
from components.registry import champion_artifact, method_regime
from components.settings import resolve_config
from components.tracking import close_parent_run, open_parent_run
from components.train import train_adapter
from pipelines.platform import Target

DEFAULT_METHOD_POPULATION = "infinite-id"
DEFAULT_METHOD_PER_IDENTITY = "id-ea"
# Transient failures (preempted node, object store or MLflow restarting): 2 more tries, 1 min then 2 min apart.
RETRY = {"num_retries": 2, "backoff_duration": "60s", "backoff_factor": 2.0, "backoff_max_duration": "900s"}


def _cpu(task: Any, target: Target, cpu: str = "1", memory: str = "4Gi") -> Any:
    task.set_container_image(target.cpu).set_cpu_request(cpu).set_memory_request(memory)
    return target.platform.apply(task)


def _gpu(task: Any, target: Target, gpus: int = 1, cpu: str = "4", memory: str = "32Gi") -> Any:
    task.set_container_image(target.cuda).set_cpu_request(cpu).set_memory_request(memory)
    task.set_accelerator_type("nvidia.com/gpu").set_accelerator_limit(gpus)
    return target.platform.apply(task, gpu=True)


@contextlib.contextmanager
def _closing_parent_run(target: Target, config_yaml: Any) -> Iterator[None]:
    """The pipeline body, followed (success or not) by the exit task that closes the MLflow parent run."""
    close = close_parent_run(config_yaml=config_yaml, kfp_run_id=dsl.PIPELINE_JOB_ID_PLACEHOLDER)
    _cpu(close, target, memory="1Gi").set_caching_options(False)
    with dsl.ExitHandler(close, name="close-parent-run-on-exit"):
        yield


def _settings(target: Target, config_yaml: Any, preset: Any, steps: Any = 0, lr: Any = 0.0) -> Any:
    task = resolve_config(config_yaml=config_yaml, preset=preset, steps=steps, lr=lr)
    return _cpu(task, target, memory="1Gi").output


def _open_run(target: Target, config_yaml: Any, name: str, dataset: Any) -> Any:
    run = open_parent_run(config_yaml=config_yaml, pipeline_name=name, dataset=dataset,
                          kfp_run_id=dsl.PIPELINE_JOB_ID_PLACEHOLDER)
    return _cpu(run, target, memory="1Gi").set_caching_options(False)


def _curate(target: Target, raw_uri: Any, config_yaml: Any, labels_uri: Any) -> Any:
    # No MLflow run id goes in: it changes every run and would defeat the cache of the costliest CPU step.
    task = curate(raw_uri=raw_uri, config_yaml=config_yaml, labels_uri=labels_uri)
    return _cpu(task, target, cpu="2", memory="8Gi").set_retry(**RETRY)


def _evaluate_and_register(
    target: Target, model: Any, dataset: Any, method: Any, base_model: Any, config_yaml: Any, parent: Any,
    gates_yaml: Any, compare_to_champion: bool = False,
) -> Any:
    gen = _gpu(generate(model=model, dataset=dataset, method=method, base_model=base_model,
                        config_yaml=config_yaml), target).set_retry(**RETRY)
    ev = _cpu(evaluate(generated=gen.outputs["generated"], dataset=dataset, config_yaml=config_yaml,
                       parent_run_id=parent), target, cpu="2", memory="8Gi").set_retry(**RETRY)
    reg = register(eval_run_id=ev.outputs["Output"], config_yaml=config_yaml, gates_yaml=gates_yaml,
                   compare_to_champion=compare_to_champion)
    _cpu(reg, target, memory="2Gi").set_caching_options(False)
    return ev


def _train_population(target: Target, dataset: Any, method: Any, base_model: Any, prep_config: Any,
                      config_yaml: Any, parent: Any, workers: Any, gpus_per_worker: Any, ray_address: Any,
                      init_from: Any = "", prepare_engine: Any = "") -> Any:
    prep = _gpu(prepare(dataset=dataset, base_model=base_model, config_yaml=prep_config, engine=prepare_engine,
                        ray_address=ray_address), target)
    train = train_adapter(prepared=prep.outputs["prepared"], method=method, base_model=base_model,
                          config_yaml=config_yaml, parent_run_id=parent, workers=workers,
                          gpus_per_worker=gpus_per_worker, ray_address=ray_address, init_from=init_from)
    # The GPUs are the Ray cluster's (KubeRay workers): this pod submits the job and follows it, so it asks
    # for none. It still runs the CUDA image, because without `ray_address` it trains in-process on local Ray.
    train.set_container_image(target.cuda).set_cpu_request("2").set_memory_request("8Gi")
    target.platform.apply(train, ray=True)
    return train.set_caching_options(False).set_retry(**RETRY)


def _finetune_all(target: Target, dataset: Any, method: Any, base_model: Any, config_yaml: Any, parent: Any,
                  first_identity: Any, max_identities: Any, identities_per_task: Any) -> Any:
    # One pod per chunk of identities: the base loads once per pod, not once per identity, and a pod fetches only
    # its chunk's rows and files through the dataset's URI (an artifact input would download the whole dataset).
    plan = _cpu(plan_identity_chunks(dataset=dataset, config_yaml=config_yaml, identities_per_task=identities_per_task,
                                     first=first_identity, max_identities=max_identities), target, memory="2Gi")
    with dsl.ParallelFor(plan.output, parallelism=8) as chunk:
        ft = finetune_identity_chunk(chunk=chunk, method=method, base_model=base_model, config_yaml=config_yaml,
                                     parent_run_id=parent)
        _gpu(ft, target).set_caching_options(False).set_retry(**RETRY)
    # the gather step collects the chunks' {identity: uri} indexes (parameters), not their artifacts
    gathered = gather_models(indexes=dsl.Collected(ft.outputs["Output"]), method=method)
    return _cpu(gathered, target, memory="1Gi")


def _import_dataset(uri: Any) -> Any:
    return dsl.importer(artifact_uri=uri, artifact_class=Dataset, reimport=False)


# ----------------------------------------------------------------------------------------------------------------


def build_curation(target: Target) -> Callable[..., Any]:
    @dsl.pipeline(name="curation", description="Raw photos -> audited, identity-grouped dataset.")
    def curation(raw_uri: str, config_yaml: str = "", labels_uri: str = ""):
        with _closing_parent_run(target, config_yaml):
            cur = _curate(target, raw_uri, config_yaml, labels_uri)
            _open_run(target, config_yaml, "curation", cur.outputs["dataset"])

    return curation


def build_train_adapter(target: Target) -> Callable[..., Any]:
    @dsl.pipeline(name="train-adapter",
                  description="Curated dataset -> prepare -> Ray Train (population method) -> evaluate -> register.")
    def train_adapter_pipeline(
        dataset_uri: str, base_model: str, method: str = DEFAULT_METHOD_POPULATION, config_yaml: str = "",
        gates_yaml: str = "", preset: str = "", steps: int = 0, lr: float = 0.0, workers: int = 1,
        gpus_per_worker: float = 1.0, ray_address: str = "", prepare_engine: str = "",
    ):
        with _closing_parent_run(target, config_yaml):
            prep_cfg = _settings(target, config_yaml, preset)
            run_cfg = _settings(target, prep_cfg, "", steps, lr)
            dataset = _import_dataset(dataset_uri)
            parent = _open_run(target, run_cfg, "train-adapter", dataset.output)
            train = _train_population(target, dataset.output, method, base_model, prep_cfg, run_cfg, parent.output,
                                      workers, gpus_per_worker, ray_address, prepare_engine=prepare_engine)
            _evaluate_and_register(target, train.outputs["model"], dataset.output, method, base_model, run_cfg,
                                   parent.output, gates_yaml)

    return train_adapter_pipeline


def build_personalize(target: Target) -> Callable[..., Any]:
    @dsl.pipeline(name="personalize",
                  description="Curated dataset -> fine-tune every identity in parallel -> generate -> evaluate.")
    def personalize(
        dataset_uri: str, base_model: str, method: str = DEFAULT_METHOD_PER_IDENTITY, config_yaml: str = "",
        gates_yaml: str = "", preset: str = "", steps: int = 0, lr: float = 0.0, first_identity: int = 0,
        max_identities: int = 0, identities_per_task: int = 8,
    ):
        with _closing_parent_run(target, config_yaml):
            run_cfg = _settings(target, _settings(target, config_yaml, preset), "", steps, lr)
            dataset = _import_dataset(dataset_uri)
            parent = _open_run(target, run_cfg, "personalize", dataset.output)
            gathered = _finetune_all(target, dataset.output, method, base_model, run_cfg, parent.output,
                                     first_identity, max_identities, identities_per_task)
            _evaluate_and_register(target, gathered.outputs["model"], dataset.output, method, base_model, run_cfg,
                                   parent.output, gates_yaml)

    return personalize


def build_end_to_end(target: Target) -> Callable[..., Any]:
    @dsl.pipeline(name="end-to-end",
                  description="Raw photos -> curation -> training (any method) -> generate -> evaluate -> register.")
    def end_to_end(
        raw_uri: str, base_model: str, method: str = DEFAULT_METHOD_POPULATION, config_yaml: str = "",
        labels_uri: str = "", gates_yaml: str = "", preset: str = "", steps: int = 0, lr: float = 0.0,
        workers: int = 1, gpus_per_worker: float = 1.0, ray_address: str = "", first_identity: int = 0,
        max_identities: int = 0, identities_per_task: int = 8, prepare_engine: str = "",
    ):
        with _closing_parent_run(target, config_yaml):
            cur = _curate(target, raw_uri, config_yaml, labels_uri)
            dataset = cur.outputs["dataset"]
            prep_cfg = _settings(target, config_yaml, preset)
            run_cfg = _settings(target, prep_cfg, "", steps, lr)
            parent = _open_run(target, run_cfg, "end-to-end", dataset)
            regime = _cpu(method_regime(method=method), target, memory="1Gi")
            with dsl.If(regime.output == "population", name="population-method"):
                train = _train_population(target, dataset, method, base_model, prep_cfg, run_cfg, parent.output,
                                          workers, gpus_per_worker, ray_address, prepare_engine=prepare_engine)
                _evaluate_and_register(target, train.outputs["model"], dataset, method, base_model, run_cfg,
                                       parent.output, gates_yaml)
            with dsl.Else(name="per-identity-method"):
                gathered = _finetune_all(target, dataset, method, base_model, run_cfg, parent.output,
                                         first_identity, max_identities, identities_per_task)
                _evaluate_and_register(target, gathered.outputs["model"], dataset, method, base_model, run_cfg,
                                       parent.output, gates_yaml)

    return end_to_end


def build_retrain(target: Target) -> Callable[..., Any]:
    @dsl.pipeline(name="retrain",
                  description="New dataset version -> curation -> training warm-started from the champion -> "
                              "evaluation -> promotion only if it beats the champion.")
    def retrain(
        raw_uri: str, base_model: str, method: str = DEFAULT_METHOD_POPULATION, config_yaml: str = "",
        labels_uri: str = "", gates_yaml: str = "", preset: str = "", steps: int = 0, lr: float = 0.0,
        workers: int = 1, gpus_per_worker: float = 1.0, ray_address: str = "", prepare_engine: str = "",
    ):
        with _closing_parent_run(target, config_yaml):
            cur = _curate(target, raw_uri, config_yaml, labels_uri)
            prep_cfg = _settings(target, config_yaml, preset)
            run_cfg = _settings(target, prep_cfg, "", steps, lr)
            parent = _open_run(target, run_cfg, "retrain", cur.outputs["dataset"])
            champion = _cpu(champion_artifact(method=method, config_yaml=run_cfg), target, memory="1Gi")
            champion.set_caching_options(False)  # the champion moves between runs
            train = _train_population(target, cur.outputs["dataset"], method, base_model, prep_cfg, run_cfg,
                                      parent.output, workers, gpus_per_worker, ray_address,
                                      init_from=champion.output, prepare_engine=prepare_engine)
            _evaluate_and_register(target, train.outputs["model"], cur.outputs["dataset"], method, base_model,
                                   run_cfg, parent.output, gates_yaml, compare_to_champion=True)

    return retrain


BUILDERS: dict[str, Callable[[Target], Callable[..., Any]]] = {
    "curation": build_curation,
    "train-adapter": build_train_adapter,
    "personalize": build_personalize,
    "end-to-end": build_end_to_end,
    "retrain": build_retrain,
}
