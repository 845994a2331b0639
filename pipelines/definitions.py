"""The pipelines: curation, train-adapter, personalize, end-to-end, retrain.

Each builder takes the container images and returns a ``@dsl.pipeline`` function. Every pipeline receives the
resolved idforge config as YAML text (``config_yaml``; empty = defaults) so one config drives every step and
the cache key of a step changes exactly when its inputs or its config do.

Caching: on for deterministic steps (curate, prepare, generate, evaluate), off for training and for the steps
with side effects outside the pipeline's artifacts (opening the MLflow run, registering).

kfp's local runner does not resolve ``dsl.OneOf``, so the end-to-end pipeline runs generate -> evaluate ->
register inside each regime branch instead of after a merged output.
"""


from collections.abc import Callable
from typing import Any

from kfp import dsl
from kfp.dsl import Dataset

from components.curate import curate
from components.evaluate import evaluate, generate, register
from components.finetune import finetune_identity, gather_models, list_identities
from components.images import Images
from components.prepare import prepare
from components.registry import champion_artifact, method_regime
from components.tracking import open_parent_run
from components.train import train_adapter

DEFAULT_METHOD_POPULATION = "infinite-id"
DEFAULT_METHOD_PER_IDENTITY = "id-ea"


def _cpu(task: Any, images: Images, cpu: str = "1", memory: str = "4Gi") -> Any:
    return task.set_container_image(images.cpu).set_cpu_request(cpu).set_memory_request(memory)


def _gpu(task: Any, images: Images, gpus: int = 1, cpu: str = "4", memory: str = "32Gi") -> Any:
    task.set_container_image(images.cuda).set_cpu_request(cpu).set_memory_request(memory)
    return task.set_accelerator_type("nvidia.com/gpu").set_accelerator_limit(gpus)


def _open_run(images: Images, config_yaml: Any, name: str, dataset: Any) -> Any:
    run = open_parent_run(config_yaml=config_yaml, pipeline_name=name, dataset=dataset)
    return _cpu(run, images, memory="1Gi").set_caching_options(False)


def _curate(images: Images, raw_uri: Any, config_yaml: Any, labels_uri: Any) -> Any:
    # No MLflow run id goes in: it changes every run and would defeat the cache of the costliest CPU step.
    task = curate(raw_uri=raw_uri, config_yaml=config_yaml, labels_uri=labels_uri)
    return _cpu(task, images, cpu="2", memory="8Gi")


def _evaluate_and_register(
    images: Images, model: Any, dataset: Any, method: Any, base_model: Any, config_yaml: Any, parent: Any,
    gates_yaml: Any, compare_to_champion: bool = False,
) -> Any:
    gen = _gpu(generate(model=model, dataset=dataset, method=method, base_model=base_model,
                        config_yaml=config_yaml), images)
    ev = _cpu(evaluate(generated=gen.outputs["generated"], dataset=dataset, config_yaml=config_yaml,
                       parent_run_id=parent), images, cpu="2", memory="8Gi")
    reg = register(eval_run_id=ev.outputs["Output"], config_yaml=config_yaml, gates_yaml=gates_yaml,
                   compare_to_champion=compare_to_champion)
    _cpu(reg, images, memory="2Gi").set_caching_options(False)
    return ev


def _train_population(images: Images, dataset: Any, method: Any, base_model: Any, config_yaml: Any, parent: Any,
                      workers: Any, gpus_per_worker: Any, ray_address: Any, init_from: Any = "") -> Any:
    prep = _gpu(prepare(dataset=dataset, base_model=base_model, config_yaml=config_yaml), images)
    train = train_adapter(prepared=prep.outputs["prepared"], method=method, base_model=base_model,
                          config_yaml=config_yaml, parent_run_id=parent, workers=workers,
                          gpus_per_worker=gpus_per_worker, ray_address=ray_address, init_from=init_from)
    # The GPUs are the Ray cluster's (KubeRay workers): this pod submits the job and follows it, so it asks
    # for none. It still runs the CUDA image, because without `ray_address` it trains in-process on local Ray.
    train.set_container_image(images.cuda).set_cpu_request("2").set_memory_request("8Gi")
    return train.set_caching_options(False)


def _finetune_all(images: Images, dataset: Any, method: Any, base_model: Any, config_yaml: Any, parent: Any,
                  max_identities: Any) -> Any:
    ids = _cpu(list_identities(dataset=dataset, max_identities=max_identities), images, memory="1Gi")
    with dsl.ParallelFor(ids.output, parallelism=8) as identity:
        ft = finetune_identity(dataset=dataset, identity=identity, method=method, base_model=base_model,
                               config_yaml=config_yaml, parent_run_id=parent)
        _gpu(ft, images).set_caching_options(False)
    gathered = gather_models(models=dsl.Collected(ft.outputs["model"]), method=method)
    return _cpu(gathered, images, memory="1Gi")


def _import_dataset(uri: Any) -> Any:
    return dsl.importer(artifact_uri=uri, artifact_class=Dataset, reimport=False)


# ----------------------------------------------------------------------------------------------------------------


def build_curation(images: Images) -> Callable[..., Any]:
    @dsl.pipeline(name="curation", description="Raw photos -> audited, identity-grouped dataset.")
    def curation(raw_uri: str, config_yaml: str = "", labels_uri: str = ""):
        cur = _curate(images, raw_uri, config_yaml, labels_uri)
        _open_run(images, config_yaml, "curation", cur.outputs["dataset"])

    return curation


def build_train_adapter(images: Images) -> Callable[..., Any]:
    @dsl.pipeline(name="train-adapter",
                  description="Curated dataset -> prepare -> Ray Train (population method) -> evaluate -> register.")
    def train_adapter_pipeline(
        dataset_uri: str, base_model: str, method: str = DEFAULT_METHOD_POPULATION, config_yaml: str = "",
        gates_yaml: str = "", workers: int = 1, gpus_per_worker: float = 1.0, ray_address: str = "",
    ):
        dataset = _import_dataset(dataset_uri)
        parent = _open_run(images, config_yaml, "train-adapter", dataset.output)
        train = _train_population(images, dataset.output, method, base_model, config_yaml, parent.output,
                                  workers, gpus_per_worker, ray_address)
        _evaluate_and_register(images, train.outputs["model"], dataset.output, method, base_model, config_yaml,
                               parent.output, gates_yaml)

    return train_adapter_pipeline


def build_personalize(images: Images) -> Callable[..., Any]:
    @dsl.pipeline(name="personalize",
                  description="Curated dataset -> fine-tune every identity in parallel -> generate -> evaluate.")
    def personalize(
        dataset_uri: str, base_model: str, method: str = DEFAULT_METHOD_PER_IDENTITY, config_yaml: str = "",
        gates_yaml: str = "", max_identities: int = 0,
    ):
        dataset = _import_dataset(dataset_uri)
        parent = _open_run(images, config_yaml, "personalize", dataset.output)
        gathered = _finetune_all(images, dataset.output, method, base_model, config_yaml, parent.output,
                                 max_identities)
        _evaluate_and_register(images, gathered.outputs["model"], dataset.output, method, base_model, config_yaml,
                               parent.output, gates_yaml)

    return personalize


def build_end_to_end(images: Images) -> Callable[..., Any]:
    @dsl.pipeline(name="end-to-end",
                  description="Raw photos -> curation -> training (any method) -> generate -> evaluate -> register.")
    def end_to_end(
        raw_uri: str, base_model: str, method: str = DEFAULT_METHOD_POPULATION, config_yaml: str = "",
        labels_uri: str = "", gates_yaml: str = "", workers: int = 1, gpus_per_worker: float = 1.0,
        ray_address: str = "", max_identities: int = 0,
    ):
        cur = _curate(images, raw_uri, config_yaml, labels_uri)
        dataset = cur.outputs["dataset"]
        parent = _open_run(images, config_yaml, "end-to-end", dataset)
        regime = _cpu(method_regime(method=method), images, memory="1Gi")
        with dsl.If(regime.output == "population", name="population-method"):
            train = _train_population(images, dataset, method, base_model, config_yaml, parent.output, workers,
                                      gpus_per_worker, ray_address)
            _evaluate_and_register(images, train.outputs["model"], dataset, method, base_model, config_yaml,
                                   parent.output, gates_yaml)
        with dsl.Else(name="per-identity-method"):
            gathered = _finetune_all(images, dataset, method, base_model, config_yaml, parent.output,
                                     max_identities)
            _evaluate_and_register(images, gathered.outputs["model"], dataset, method, base_model, config_yaml,
                                   parent.output, gates_yaml)

    return end_to_end


def build_retrain(images: Images) -> Callable[..., Any]:
    @dsl.pipeline(name="retrain",
                  description="New dataset version -> curation -> training warm-started from the champion -> "
                              "evaluation -> promotion only if it beats the champion.")
    def retrain(
        raw_uri: str, base_model: str, method: str = DEFAULT_METHOD_POPULATION, config_yaml: str = "",
        labels_uri: str = "", gates_yaml: str = "", workers: int = 1, gpus_per_worker: float = 1.0,
        ray_address: str = "",
    ):
        cur = _curate(images, raw_uri, config_yaml, labels_uri)
        parent = _open_run(images, config_yaml, "retrain", cur.outputs["dataset"])
        champion = _cpu(champion_artifact(method=method, config_yaml=config_yaml), images, memory="1Gi")
        champion.set_caching_options(False)  # the champion moves between runs
        train = _train_population(images, cur.outputs["dataset"], method, base_model, config_yaml, parent.output,
                                  workers, gpus_per_worker, ray_address, init_from=champion.output)
        _evaluate_and_register(images, train.outputs["model"], cur.outputs["dataset"], method, base_model,
                               config_yaml, parent.output, gates_yaml, compare_to_champion=True)

    return retrain


BUILDERS: dict[str, Callable[[Images], Callable[..., Any]]] = {
    "curation": build_curation,
    "train-adapter": build_train_adapter,
    "personalize": build_personalize,
    "end-to-end": build_end_to_end,
    "retrain": build_retrain,
}
