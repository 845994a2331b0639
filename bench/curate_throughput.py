"""Curation throughput on CPU: images per second per core, overall and per sub-stage, at 1 and 2 workers.

    python bench/curate_throughput.py [--images 48] [--workers 1 2] [--backend insightface] [--matte landmarks]

The input is the sample photos (``idforge.io.samples.fetch_samples``) re-encoded into ``--images`` distinct files
(JPEG quality varies, so every file has its own sha256 and nothing comes from cache). Each worker runs one inference
thread, so "per core" = per worker. Per-sub-stage rates are images / (seconds summed over workers) = images/s of
one core spent on that stage alone. The scaling ratio is overall throughput at N workers / at 1 worker (wall clock:
meaningful on idle cores only); images per CPU-second and the CPU efficiency do not depend on other load.
"""

from __future__ import annotations

import argparse
import io
import json
import logging
import os
import sys
import tempfile
import time
from pathlib import Path


def make_inputs(out: Path, n: int) -> Path:
    from PIL import Image

    from idforge.io.samples import fetch_samples

    samples = fetch_samples(Path(tempfile.gettempdir()) / "idforge-bench-samples")
    photos = sorted(p for p in samples.rglob("*") if p.suffix.lower() in (".jpg", ".png") and "licenses" not in p.parts)
    out.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        src = photos[i % len(photos)]
        with Image.open(src) as im:
            buf = io.BytesIO()
            im.convert("RGB").save(buf, "JPEG", quality=80 + (i // len(photos)) % 20)
        (out / f"{i:04d}_{src.parent.name}.jpg").write_bytes(buf.getvalue())
    return out


def _cpu_seconds() -> float:
    """User + system CPU time of this process and of its finished children (the pool workers are reaped when
    the pool closes). Unlike wall time it barely moves when other jobs share the cores."""
    import resource

    me, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return me.ru_utime + me.ru_stime + kids.ru_utime + kids.ru_stime


def run(inputs: Path, workers: int, backend: str, matte: str, tmp: Path) -> dict:
    from idforge.curate.config import CurateConfig
    from idforge.curate.run import curate_dataset

    cfg = CurateConfig(backend=backend, workers=workers, threads_per_worker=1, progress=False,
                       matte={"backend": matte}, work_dir=str(tmp / "work"), min_images_per_identity=1)
    out = tmp / f"ds-{backend}-{workers}"
    cpu0 = _cpu_seconds()
    t = time.perf_counter()
    report = curate_dataset(str(inputs), str(out), cfg=cfg)
    wall = time.perf_counter() - t
    cpu = _cpu_seconds() - cpu0
    n = report.files
    stages = ("read", "decode", "detect", "align", "gates", "embed", "write_crops")
    per_stage = {s: n / report.timings[s] for s in stages if report.timings.get(s)}
    per_stage_cpu = {s: n / report.timings[f"cpu_{s}"] for s in stages if report.timings.get(f"cpu_{s}")}
    per_file_wall = report.timings["per_file_wall"]
    busy = sum(report.timings.get(s, 0.0) for s in stages)  # per-file work summed over workers, no start-up
    return {
        "cpu_s": round(cpu, 2),
        "images_per_cpu_s": round(n / cpu, 2),
        "steady_images_per_s_per_core": round(n / busy, 2),
        "load_models_s": round(report.timings.get("load_models", 0.0), 2),
        "workers": workers,
        "images": n,
        "wall_s": round(wall, 2),
        "per_file_wall_s": round(per_file_wall, 2),
        "images_per_s": round(n / per_file_wall, 2),
        "images_per_s_per_core": round(n / per_file_wall / workers, 2),
        "stage_images_per_s_per_core": {k: round(v, 1) for k, v in per_stage.items()},
        "stage_images_per_cpu_s": {k: round(v, 1) for k, v in per_stage_cpu.items()},
        "dataset_stages_s": {k: report.timings.get(k) for k in ("matte", "dedup", "group", "write_tables")},
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=48)
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--backend", default="insightface", choices=["insightface", "opencv"])
    parser.add_argument("--matte", default="landmarks", choices=["mediapipe", "landmarks", "none"])
    parser.add_argument("--json", type=Path, default=None, help="also write the results here")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    import cv2

    load_before = os.getloadavg()[0]
    cv2.setNumThreads(1)  # the 1-worker run happens in this process: hold it to one core like a pool worker
    with tempfile.TemporaryDirectory() as td:
        tmp = Path(td)
        inputs = make_inputs(tmp / "in", args.images)
        results = [run(inputs, w, args.backend, args.matte, tmp) for w in args.workers]
    load_after = os.getloadavg()[0]
    base = results[0]["images_per_s"]
    print(f"curate throughput, backend={args.backend}, matte={args.matte}, {args.images} images, "
          f"{os.cpu_count()} CPUs, load average before {load_before:.2f}, after {load_after:.2f}")
    for r in results:
        print(f"  workers={r['workers']}: {r['images_per_s']:.2f} img/s overall, {r['images_per_s_per_core']:.2f} "
              f"img/s/core incl. start-up (per-file stage wall {r['per_file_wall_s']} s, total {r['wall_s']} s); "
              f"steady {r['steady_images_per_s_per_core']:.2f} img/s/core; model load {r['load_models_s']} s")
        print(f"    CPU: {r['cpu_s']} s in all processes -> {r['images_per_cpu_s']} img per CPU-second "
              "(load-independent per-core throughput, start-up included)")
        print("    per sub-stage, img/s/core (wall): "
              + ", ".join(f"{k} {v}" for k, v in r["stage_images_per_s_per_core"].items()))
        print("    per sub-stage, img per CPU-second: "
              + ", ".join(f"{k} {v}" for k, v in r["stage_images_per_cpu_s"].items()))
        print("    dataset stages, s: " + ", ".join(f"{k} {v}" for k, v in r["dataset_stages_s"].items()))
    for r in results[1:]:
        print(f"  scaling ratio {r['workers']} vs {results[0]['workers']} workers: "
              f"{r['images_per_s'] / base:.2f}x wall; "
              f"CPU efficiency {r['images_per_cpu_s'] / results[0]['images_per_cpu_s']:.2f} "
              f"(1.0 = the pool adds no CPU overhead; ideal wall scaling on idle cores = workers x this)")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
