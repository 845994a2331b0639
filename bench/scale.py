"""Curation at scale: grouping on synthetic ArcFace-like embeddings, and curation through Ray Data vs the local
engine.

    python bench/scale.py grouping [--faces 10000 100000 1000000]
    python bench/scale.py curation [--images 48]
    python bench/scale.py evaluation [--identities 50 500] [--images-per-identity 8] [--size 256]

grouping: per N, a child process builds N synthetic faces (``idforge.curate.synthetic``: 20 photos per person,
within-person cosine 0.5-0.8, strangers 0 +/- 0.044 at D = 512), the FAISS similarity graph and the average-linkage
clusters (``curate.group.cluster``); it reports seconds per step, its peak RSS and the pairwise precision/recall
against the true people. The reference, measured in the same run, is the old dense grouping (N x N float64 +
scipy average linkage) at the largest N it fits (2 000 faces by default), for the time ratio at that N.

curation: the sample photos re-encoded into ``--images`` distinct files (bench/curate_throughput.py), curated by
the local engine (1 process) and by Ray Data on a local Ray with 1 and 2 CPU actors; images/s over the per-file
stage (model loading and actor start-up included, Ray's own start-up not) and the 2-vs-1 ratio.

evaluation: per N, a synthetic generation run (N identities x images per identity of random RGB PNGs at --size px,
two 256 px pre-aligned reference crops per identity, the index generate writes) is evaluated in a child process
(identity metrics with the OpenCV backend, the paged report, no MLflow); it reports seconds and the child's peak RSS,
the bytes the decoded images would take held all at once, and the largest-vs-smallest N peak RSS ratio (goal: flat
within 20 %: evaluation streams one identity at a time).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

THRESHOLD = 0.35  # the insightface default


def _peak_rss_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2  # ru_maxrss is in KiB on Linux


def _cpu_s() -> float:
    """CPU seconds of this process (all threads): what the work costs however many other jobs share the cores."""
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def grouping_child(n: int, dense: bool) -> dict:
    import numpy as np

    from idforge.curate import group
    from idforge.curate.knn import knn_graph
    from idforge.curate.synthetic import synthetic_embeddings

    t = time.perf_counter()
    emb, person = synthetic_embeddings(n, seed=1)
    cpu0 = _cpu_s()
    out: dict = {"faces": n, "generate_s": round(time.perf_counter() - t, 2)}
    if dense:
        from scipy.cluster.hierarchy import fcluster, linkage
        from scipy.spatial.distance import squareform

        t = time.perf_counter()
        dist = 1.0 - np.clip(emb.astype(np.float64) @ emb.astype(np.float64).T, -1.0, 1.0)
        np.fill_diagonal(dist, 0.0)
        z = linkage(squareform(np.maximum(dist, 0.0), checks=False), method="average")
        clusters = fcluster(z, t=1.0 - THRESHOLD, criterion="distance")
        out.update(method="dense", cluster_s=round(time.perf_counter() - t, 2))
    else:
        t = time.perf_counter()
        graph = knn_graph(emb, THRESHOLD)
        out.update(method="knn-graph", index=graph.index, edges=len(graph.i), graph_s=round(time.perf_counter() - t, 2))
        t = time.perf_counter()
        clusters = group.cluster(emb, THRESHOLD, "average", graph=graph)
        out["cluster_s"] = round(time.perf_counter() - t, 2)
    t = time.perf_counter()
    p, r = group.pairwise_precision_recall(clusters, person)
    order = np.lexsort((person, clusters))
    c, pp = clusters[order], person[order]
    merged = int(((c[1:] == c[:-1]) & (pp[1:] != pp[:-1])).sum())  # cluster boundaries crossing people
    out.update(pr_s=round(time.perf_counter() - t, 2), precision=round(p, 5), recall=round(r, 5),
               clusters_holding_two_people=merged, peak_rss_gb=round(_peak_rss_gb(), 2))
    out["total_s"] = round(out.get("graph_s", 0) + out["cluster_s"], 2)
    out["cpu_s"] = round(_cpu_s() - cpu0, 1)  # graph + clustering + P/R, all threads
    return out


def grouping(faces: list[int], dense_n: int) -> list[dict]:
    results = []
    for n, dense in [(dense_n, True), (dense_n, False)] + [(n, False) for n in faces]:
        cmd = [sys.executable, __file__, "_grouping_child", str(n)] + (["--dense"] if dense else [])
        proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
        if proc.returncode != 0:
            raise SystemExit(f"grouping child N={n} failed: {proc.stderr[-2000:]}")
        res = json.loads(proc.stdout.strip().splitlines()[-1])
        results.append(res)
        print(json.dumps(res), flush=True)
    ref, same = results[0], results[1]
    print(f"reference at N={dense_n}: dense {ref['cluster_s']} s, {ref['peak_rss_gb']} GB; kNN graph "
          f"{same['total_s']} s, {same['peak_rss_gb']} GB -> {ref['cluster_s'] / max(same['total_s'], 1e-9):.2f}x")
    return results


def curation(images: int) -> list[dict]:
    import ray

    sys.path.insert(0, str(Path(__file__).parent))
    from curate_throughput import make_inputs

    from idforge.curate.config import CurateConfig
    from idforge.curate.run import curate_dataset

    results = []
    with tempfile.TemporaryDirectory() as td:
        tmp = Path(td)
        inputs = make_inputs(tmp / "in", images)
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
        try:
            for engine, workers in (("local", 1), ("ray", 1), ("ray", 2)):
                cfg = CurateConfig(engine=engine, workers=workers, ray_batch_files=4, progress=False,
                                   matte={"backend": "landmarks"},
                                   work_dir=str(tmp / "work" / f"{engine}{workers}"), min_images_per_identity=1)
                report = curate_dataset(str(inputs), str(tmp / f"ds-{engine}-{workers}"), cfg=cfg)
                wall = report.timings["per_file_wall"]
                t = report.timings
                # CPU seconds of the per-file work: the actors' own (Ray) or the per-file sub-stages' (local)
                cpu = t.get("cpu_per_file") or sum(v for k, v in t.items() if k.startswith("cpu_"))
                res = {"engine": engine, "workers": workers, "images": report.files, "per_file_wall_s": round(wall, 2),
                       "images_per_s": round(report.files / wall, 3), "total_s": t["total"],
                       "per_file_cpu_s": round(cpu, 2), "images_per_cpu_s": round(report.files / max(cpu, 1e-9), 2)}
                results.append(res)
                print(json.dumps(res), flush=True)
        finally:
            ray.shutdown()
    ray1, ray2 = results[1], results[2]
    print(f"Ray Data 2 vs 1 CPU actors: {ray2['images_per_s'] / ray1['images_per_s']:.2f}x; "
          f"Ray 1 actor vs local engine: {ray1['images_per_s'] / results[0]['images_per_s']:.2f}x")
    return results


def make_generated(root: Path, identities: int, per_identity: int, size: int) -> Path:
    """A generation run's layout (images/, refs/ with the pre-aligned marker, index.parquet, generate.json) of
    random images; returns its directory."""
    import numpy as np
    import pandas as pd
    from PIL import Image

    rng = np.random.default_rng(0)
    gen = root / f"gen-{identities}"
    rows = []
    for i in range(identities):
        ident = f"id{i:05d}"
        for k in range(2):
            ref = gen / "refs" / ident / f"{k}.png"
            ref.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(rng.integers(0, 256, (256, 256, 3), dtype=np.uint8)).save(ref, compress_level=1)
        for j in range(per_identity):
            rel = f"images/{ident}/plain/p{j // 2:02d}_s{j % 2}.png"
            (gen / rel).parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(gen / rel, compress_level=1)
            rows.append({"image": rel, "identity": ident, "category": "plain", "prompt_index": j // 2,
                         "seed": j % 2, "prompt": f"a photo of a person, take {j // 2}",
                         "prompt_template": f"a photo of {{}}, take {j // 2}", "method": "synthetic"})
    (gen / "refs" / ".prealigned").touch()
    pd.DataFrame(rows).to_parquet(gen / "index.parquet", index=False)
    (gen / "generate.json").write_text(json.dumps({"conditioning_backend": "insightface", "base_model": "none"}))
    return gen


def evaluation_child(gen: str, out: str) -> dict:
    import yaml

    from idforge.config import IdforgeConfig
    from idforge.evaluate.run import evaluate_generated

    repo = Path(__file__).resolve().parents[1]
    proto = yaml.safe_load((repo / "configs/protocols/smoke.yaml").read_text())
    proto.update(prompt_set=str(repo / "data/prompts/smoke.yaml"), face_backends=["opencv"],
                 metrics={"identity": True, "clip_t": False, "clip_i": False, "lpips": False, "diversity": False})
    proto_path = Path(out).parent / f"{Path(out).name}-protocol.yaml"
    proto_path.write_text(yaml.safe_dump(proto))
    cfg = IdforgeConfig.model_validate({"tracking": {"enabled": False},
                                        "evaluate": {"protocol": str(proto_path), "device": "cpu"}})
    t = time.perf_counter()
    res = evaluate_generated(gen, None, out, cfg)
    report = Path(out) / "report.html"
    return {"images": len(res.metrics), "seconds": round(time.perf_counter() - t, 1),
            "peak_rss_gb": round(_peak_rss_gb(), 3), "report_html_kb": round(report.stat().st_size / 1024, 1)}


def evaluation(identities: list[int], per_identity: int, size: int) -> list[dict]:
    results = []
    with tempfile.TemporaryDirectory() as td:
        tmp = Path(td)
        for n in identities:
            t = time.perf_counter()
            gen = make_generated(tmp, n, per_identity, size)
            made = time.perf_counter() - t
            cmd = [sys.executable, __file__, "_evaluation_child", str(gen), str(tmp / f"eval-{n}")]
            env = {**os.environ, "OMP_NUM_THREADS": "1", "TQDM_DISABLE": "1"}
            proc = subprocess.run(cmd, capture_output=True, text=True, check=False, env=env)
            if proc.returncode != 0:
                raise SystemExit(f"evaluation child N={n} failed: {proc.stderr[-2000:]}")
            res = {"identities": n, "make_s": round(made, 1), **json.loads(proc.stdout.strip().splitlines()[-1]),
                   "all_images_decoded_gb": round(n * per_identity * size * size * 3 / 1024**3, 3)}
            results.append(res)
            print(json.dumps(res), flush=True)
    lo, hi = results[0], results[-1]
    print(f"peak RSS {hi['identities']} vs {lo['identities']} identities: {hi['peak_rss_gb']} / {lo['peak_rss_gb']} GB "
          f"= {hi['peak_rss_gb'] / lo['peak_rss_gb']:.3f}x (goal <= 1.20); report.html {lo['report_html_kb']} -> "
          f"{hi['report_html_kb']} KB", flush=True)
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="what", required=True)
    g = sub.add_parser("grouping")
    g.add_argument("--faces", type=int, nargs="+", default=[10_000, 100_000])
    g.add_argument("--dense-faces", type=int, default=2_000)
    c = sub.add_parser("curation")
    c.add_argument("--images", type=int, default=48)
    e = sub.add_parser("evaluation")
    e.add_argument("--identities", type=int, nargs="+", default=[50, 500])
    e.add_argument("--images-per-identity", type=int, default=8)
    e.add_argument("--size", type=int, default=256)
    ec = sub.add_parser("_evaluation_child")
    ec.add_argument("gen")
    ec.add_argument("out")
    child = sub.add_parser("_grouping_child")
    child.add_argument("n", type=int)
    child.add_argument("--dense", action="store_true")
    args = parser.parse_args(argv)
    if args.what == "_grouping_child":
        print(json.dumps(grouping_child(args.n, args.dense)))
        return 0
    if args.what == "_evaluation_child":
        print(json.dumps(evaluation_child(args.gen, args.out)))
        return 0
    print(f"{os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.2f} at start (other jobs share these cores)",
          flush=True)
    if args.what == "grouping":
        grouping(args.faces, args.dense_faces)
    elif args.what == "evaluation":
        evaluation(args.identities, args.images_per_identity, args.size)
    else:
        curation(args.images)
    print(f"load average {os.getloadavg()[0]:.2f} at end", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
