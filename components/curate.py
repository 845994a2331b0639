"""Curation: raw photos (folder or s3:// prefix) -> curated dataset artifact."""

from kfp import dsl
from kfp.dsl import Dataset, Metrics, Output

from components.images import DEFAULT_REGISTRY, DEFAULT_TAG


@dsl.component(base_image=f"{DEFAULT_REGISTRY}/idforge-cpu:{DEFAULT_TAG}", install_kfp_package=False)
def curate(
    raw_uri: str,
    config_yaml: str,
    dataset: Output[Dataset],
    metrics: Output[Metrics],
    labels_uri: str = "",
    engine: str = "",
    ray_address: str = "",
):
    """Detect, gate, align, matte, dedup and group the photos; every input lands in the manifest.

    Its counts go to the artifact's metadata; the parent MLflow run records them (see open_parent_run).

    Args:
        raw_uri: The raw photos: a folder or an ``s3://bucket/prefix``, read recursively.
        config_yaml: The resolved idforge config as YAML text (its ``curate`` section applies); "" = defaults.
        labels_uri: Optional labels CSV, local or ``s3://`` (columns ``identity`` and ``file``/``path``/``source``)
            naming who is in which photo; "" = identities grouped by face embedding alone.
        engine: ``local`` (a process pool in this pod) or ``ray`` (Ray Data over the files, an actor pool of
            ``curate.workers`` actors); "" = the config's ``curate.engine``.
        ray_address: With engine ``ray``: the Ray cluster to join (``ray://head:10001``); "" = the config's
            ``curate.ray_address``, else a Ray started inside this pod.

    Returns:
        dataset: The curated dataset: manifest.parquet (every input, accepted or rejected with its reason),
            identities.parquet, embeddings.npy, crops/, masks/, matted/ and report.json; its metadata holds the
            counts below and ``raw_uri``.
        metrics: The curation counts (files, faces accepted, identities, rejected rows) and quality metrics.
    """
    from idforge.config import load_config_text
    from idforge.curate.run import curate_dataset
    from idforge.ops.kfp_metrics import write_metrics

    overrides = [f"curate.engine={engine}"] if engine else []
    overrides += [f"curate.ray_address={ray_address}"] if ray_address else []
    cfg = load_config_text(config_yaml, overrides, source="pipeline parameter config_yaml")
    report = curate_dataset(raw_uri, dataset.path, cfg=cfg, labels=labels_uri or None)
    counts = {
        "files": report.files, "faces_accepted": report.faces_accepted, "identities": report.identities,
        "rejected_rows": report.counts.get("rejected", 0), **report.metrics,
    }  # fmt: skip
    write_metrics(metrics, counts)
    dataset.metadata.update({"raw_uri": raw_uri, **counts})
