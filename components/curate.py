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
):
    """Detect, gate, align, matte, dedup and group the photos; every input lands in the manifest.

    Its counts go to the artifact's metadata; the parent MLflow run records them (see open_parent_run).
    """
    import json

    from idforge.config import load_config_text
    from idforge.curate.run import curate_dataset

    cfg = load_config_text(config_yaml, source="pipeline parameter config_yaml")
    report = curate_dataset(raw_uri, dataset.path, cfg=cfg, labels=labels_uri or None)
    counts = {
        "files": report.files, "faces_accepted": report.faces_accepted, "identities": report.identities,
        "rejected_rows": report.counts.get("rejected", 0), **report.metrics,
    }  # fmt: skip
    for key, value in counts.items():
        metrics.log_metric(key, float(value))
    # The metrics live in the artifact's metadata; a file at its path lets caches see the artifact exists.
    with open(metrics.path, "w") as fh:
        json.dump(dict(metrics.metadata), fh)
    dataset.metadata.update({"raw_uri": raw_uri, **counts})
