"""What a compiled pipeline asks of the cluster it runs on (kfp-kubernetes): where each step's environment comes
from, where GPU steps may schedule, and the pod labels k8s/'s NetworkPolicies admit.

The defaults name the objects k8s/ creates (Secret ``idforge-s3``, ConfigMap ``idforge-bucket-layout``, ...) and
copy the Ray GPU workers' toleration and node selector (k8s/base/ray, k8s/overlays/cluster); a cluster that
names things otherwise passes a YAML file of these fields at compile/submit time (``--platform FILE``).
Secrets travel as references only: the compiled YAML names a Secret and its keys, never a value.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field

from components.images import Images
from idforge.errors import ConfigError


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class EnvSource(_Strict):
    """One Secret or ConfigMap and the keys a step reads from it (each key becomes the variable of that name)."""

    name: str
    keys: tuple[str, ...]


class Toleration(_Strict):
    key: str
    operator: Literal["Exists", "Equal"] = "Exists"
    value: str | None = None
    effect: Literal["NoSchedule", "PreferNoSchedule", "NoExecute"] | None = "NoSchedule"


class Platform(_Strict):
    """The cluster-side names and scheduling rules the pipelines compile in."""

    # S3 credentials, for every step (the idforge account: read/write on the idforge bucket only).
    s3_secret: EnvSource = EnvSource(name="idforge-s3", keys=("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"))
    # MLflow basic-auth credentials of the pipeline's MLflow account, for every step.
    mlflow_secret: EnvSource = EnvSource(
        name="idforge-mlflow-pipeline", keys=("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD"))
    # Non-secret settings, for every step: S3 endpoint and region, MLflow, checkpoint root, Ray Jobs API.
    settings: EnvSource = EnvSource(name="idforge-bucket-layout", keys=(
        "AWS_ENDPOINT_URL", "AWS_DEFAULT_REGION", "MLFLOW_TRACKING_URI", "IDFORGE_CHECKPOINTS",
        "RAY_API_SERVER_ADDRESS", "RAY_AUTH_MODE"))
    # Ray's auth token, only for the steps that submit to the Ray cluster.
    ray_secret: EnvSource = EnvSource(name="idforge-ray-auth", keys=("RAY_AUTH_TOKEN",))
    gpu_tolerations: tuple[Toleration, ...] = (Toleration(key="nvidia.com/gpu"),)
    gpu_node_selector: dict[str, str] = Field(default_factory=lambda: {"nvidia.com/gpu.present": "true"})
    # Labels the NetworkPolicies in k8s/base/network admit: every step reaches S3 and MLflow, Ray clients the head.
    step_labels: dict[str, str] = Field(default_factory=lambda: {
        "idforge.io/s3-client": "true", "idforge.io/mlflow-client": "true"})
    ray_client_labels: dict[str, str] = Field(default_factory=lambda: {"idforge.io/ray-client": "true"})
    # With S3 over TLS (k8s/components/s3-tls): the ConfigMap holding the CA as ca.crt, mounted in every step at
    # s3_ca_mount (add AWS_CA_BUNDLE and SSL_CERT_FILE to settings.keys so the clients use it). None = plain HTTP.
    s3_ca_config_map: str | None = None
    s3_ca_mount: str = "/etc/idforge-s3-ca"

    @classmethod
    def load(cls, path: str | Path | None = None) -> Platform:
        """The defaults, or the fields of the YAML file at ``path`` over them.

        Raises:
            ConfigError: the file is missing, not a mapping, or has an unknown key or a bad value.
        """
        if path is None:
            return cls()
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"platform file {p} does not exist; pass a YAML file of {', '.join(cls.model_fields)}")
        data = yaml.safe_load(p.read_text()) or {}
        if not isinstance(data, dict):
            raise ConfigError(f"platform file {p} must hold a mapping at the top")
        from pydantic import ValidationError

        from idforge.config import format_validation_error

        try:
            return cls.model_validate(data)
        except ValidationError as exc:
            raise ConfigError(format_validation_error(exc, cls, str(p))) from None

    def apply(self, task: Any, *, gpu: bool = False, ray: bool = False) -> Any:
        """Give ``task`` its environment and labels; GPU steps their tolerations and node selector; Ray clients
        the Ray token and the label that lets them reach the head."""
        from kfp import kubernetes

        kubernetes.use_config_map_as_env(task, self.settings.name, {k: k for k in self.settings.keys})
        for secret in (self.s3_secret, self.mlflow_secret) + ((self.ray_secret,) if ray else ()):
            kubernetes.use_secret_as_env(task, secret.name, {k: k for k in secret.keys})
        if self.s3_ca_config_map:
            kubernetes.use_config_map_as_volume(task, self.s3_ca_config_map, mount_path=self.s3_ca_mount)
        for key, value in {**self.step_labels, **(self.ray_client_labels if ray else {})}.items():
            kubernetes.add_pod_label(task, key, value)
        if gpu:
            for tol in self.gpu_tolerations:
                kubernetes.add_toleration(task, key=tol.key, operator=tol.operator, value=tol.value,
                                          effect=tol.effect)
            for key, value in self.gpu_node_selector.items():
                kubernetes.add_node_selector(task, key, value)
        return task


@dataclass(frozen=True)
class Target:
    """What a pipeline is compiled for: the images its steps run (``components.images.Images``) and the platform."""

    images: Images
    platform: Platform = field(default_factory=Platform)

    @property
    def cpu(self) -> str:
        return self.images.cpu

    @property
    def cuda(self) -> str:
        return self.images.cuda
