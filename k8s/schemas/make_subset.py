"""Write the JSON Schemas in this folder from KubeRay's upstream CRD definitions (a subset, as JSON Schema).

Upstream: github.com/ray-project/kuberay, tag ray-operator/v1.7.0 (commit 59d663aeec13760646da3db9c1cf8cfe883e30b7),
files ray-operator/config/crd/bases/ray.io_rayclusters.yaml and ray.io_rayjobs.yaml, version v1, openAPIV3Schema.
The committed .json files are this script's output; it is kept so the subset can be regenerated for a newer KubeRay:

    python k8s/schemas/make_subset.py UPSTREAM/ray.io_rayclusters.yaml UPSTREAM/ray.io_rayjobs.yaml k8s/schemas

What is kept and what changes (the rest of the upstream schema is copied as it is, without descriptions):
- Pod templates (``template``, ``submitterPodTemplate``; 95% of the upstream text) become a $ref to the Kubernetes
  ``io.k8s.api.core.v1.PodTemplateSpec`` that kubernetes-validate ships: the CRD's copy is generated from that
  same Go type, so the pods are checked in full. ``metadata`` refers to ObjectMeta the same way.
- Fields idforge does not use and whose subtrees are large (TLS, auth, GCS fault tolerance, history server, network
  policy, upgrade strategy, head service, ingress) keep only their type: accepted, not checked in depth.
- ``status`` is dropped (the operator writes it). CEL rules (``x-kubernetes-validations``) are dropped: they need
  a CEL engine. ``nullable`` becomes a JSON Schema ``null`` type.
- Every object with listed properties gets ``additionalProperties: false``: an unknown field is an error, as with
  kubectl's strict field validation (the default since Kubernetes 1.27), instead of being silently pruned.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import yaml

K8S_DEFS = "https://kubernetes.io/api/_definitions.json#/$defs/"
UPSTREAM = "github.com/ray-project/kuberay@ray-operator/v1.7.0 (59d663aeec13760646da3db9c1cf8cfe883e30b7)"
POD_TEMPLATE_FIELDS = {"template", "submitterPodTemplate"}
SHALLOW_FIELDS = {
    "authOptions", "gcsFaultToleranceOptions", "historyServerOptions", "networkPolicy", "tlsOptions",
    "upgradeStrategy", "headService", "ingressOptions", "headServiceAnnotations",
}
DROPPED_KEYS = {"description", "x-kubernetes-validations", "x-kubernetes-list-type", "x-kubernetes-list-map-keys",
                "x-kubernetes-map-type", "x-kubernetes-preserve-unknown-fields", "x-kubernetes-int-or-string",
                "default"}


def _v1_schema(crd_path: Path) -> dict[str, Any]:
    crd = yaml.safe_load(crd_path.read_text())
    (version,) = [v for v in crd["spec"]["versions"] if v["name"] == "v1"]
    return version["schema"]["openAPIV3Schema"]


def _convert(node: Any, name: str | None = None) -> Any:
    if isinstance(node, list):
        return [_convert(item) for item in node]
    if not isinstance(node, dict):
        return node
    if name in POD_TEMPLATE_FIELDS and "spec" in node.get("properties", {}):
        return {"$ref": K8S_DEFS + "io.k8s.api.core.v1.PodTemplateSpec"}
    if name in SHALLOW_FIELDS:
        return {"type": node.get("type", "object")}
    out: dict[str, Any] = {}
    for key, value in node.items():
        if key in DROPPED_KEYS or key == "nullable":
            continue
        if key == "properties":
            out[key] = {prop: _convert(sub, prop) for prop, sub in value.items()}
        elif key in ("items", "additionalProperties") and isinstance(value, dict):
            out[key] = _convert(value)
        elif key in ("anyOf", "oneOf", "allOf"):
            out[key] = [_convert(v) for v in value]
        else:
            out[key] = value
    if node.get("nullable") and isinstance(out.get("type"), str):
        out["type"] = [out["type"], "null"]
    if "properties" in out and "additionalProperties" not in out:
        out["additionalProperties"] = False
    return out


def _document(schema: dict[str, Any], kind: str, source_file: str) -> dict[str, Any]:
    spec = _convert(schema["properties"]["spec"])
    return {
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "$id": f"https://idforge.local/schemas/{kind.lower()}.ray.io_v1.json",
        "$comment": f"Subset of {UPSTREAM} ray-operator/config/crd/bases/{source_file}, v1 openAPIV3Schema; "
                    f"written by k8s/schemas/make_subset.py",
        "type": "object",
        "required": ["apiVersion", "kind", "metadata", "spec"],
        "properties": {
            "apiVersion": {"type": "string", "enum": ["ray.io/v1"]},
            "kind": {"type": "string", "enum": [kind]},
            "metadata": {"$ref": K8S_DEFS + "io.k8s.apimachinery.pkg.apis.meta.v1.ObjectMeta"},
            "spec": spec,
            "status": {"type": "object"},
        },
        "additionalProperties": False,
    }


def main(rayclusters_yaml: str, rayjobs_yaml: str, out_dir: str) -> None:
    out = Path(out_dir)
    cluster = _document(_v1_schema(Path(rayclusters_yaml)), "RayCluster", "ray.io_rayclusters.yaml")
    job = _document(_v1_schema(Path(rayjobs_yaml)), "RayJob", "ray.io_rayjobs.yaml")
    # A RayJob's rayClusterSpec is the same type as a RayCluster's spec: point at it instead of a second copy.
    job["properties"]["spec"]["properties"]["rayClusterSpec"] = {
        "$ref": "raycluster.ray.io_v1.json#/properties/spec"
    }
    for name, doc in (("raycluster.ray.io_v1.json", cluster), ("rayjob.ray.io_v1.json", job)):
        (out / name).write_text(json.dumps(doc, indent=1, sort_keys=True) + "\n")
        print(f"wrote {out / name}")


if __name__ == "__main__":
    if len(sys.argv) != 4:
        raise SystemExit(__doc__)
    main(*sys.argv[1:])
