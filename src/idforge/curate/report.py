"""The run report: counts by status and reason, timings, models; ``summary()`` is what the CLI prints."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any


@dataclass
class CurateReport:
    """Attributes:
    output: the dataset location. files: input files seen. rows: manifest rows.
    counts: {"accepted": n, "rejected": n} over face/file rows. reasons: rejected rows per reason code.
    identities: identities kept (>= min images). faces_accepted: accepted face rows.
    cached_files: files whose per-file results were reused. hidden_files_skipped: dot-files/dot-folders not read
    (.DS_Store, .git...; counted so nothing is dropped silently). timings: seconds per stage (summed over workers for
    the per-file sub-stages; wall clock for "total" and the dataset-level stages).
    backend: analyzer description (models, licence, embedding_dim). metrics: optional quality numbers
    (e.g. grouping precision/recall against labels).
    """

    output: str
    files: int = 0
    rows: int = 0
    counts: dict[str, int] = field(default_factory=dict)
    reasons: dict[str, int] = field(default_factory=dict)
    identities: int = 0
    faces_accepted: int = 0
    cached_files: int = 0
    hidden_files_skipped: int = 0
    workers: int = 1
    timings: dict[str, float] = field(default_factory=dict)
    backend: dict[str, Any] = field(default_factory=dict)
    metrics: dict[str, float] = field(default_factory=dict)
    config_digest: str = ""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def summary(self) -> str:
        lines = [
            f"curated {self.files} files -> {self.output}",
            f"  accepted faces: {self.faces_accepted} in {self.identities} identities "
            f"(backend {self.backend.get('backend', '?')}, {self.backend.get('embedding_dim', '?')}-d embeddings)",
        ]
        if self.reasons:
            reasons = ", ".join(f"{k} {v}" for k, v in sorted(self.reasons.items(), key=lambda kv: (-kv[1], kv[0])))
            lines.append(f"  rejected rows: {self.counts.get('rejected', 0)} ({reasons})")
        if self.hidden_files_skipped:
            lines.append(f"  hidden files/folders skipped: {self.hidden_files_skipped}")
        total = self.timings.get("total", 0.0)
        lines.append(f"  time: {total:.1f} s with {self.workers} worker(s); {self.cached_files} file(s) from cache")
        for k, v in sorted(self.metrics.items()):
            lines.append(f"  {k}: {v:.3f}")
        return "\n".join(lines)
