"""Curation at scale: grouping on synthetic ArcFace-like embeddings, and curation through Ray Data vs the local
engine.

    python bench/scale.py grouping [--faces 10000 100000 1000000]
    python bench/scale.py curation [--images 48]
    python bench/scale.py training-input [--items 10000 100000]
    python bench/scale.py fanout [--identities 6] [--method textual-inversion] [--base DIR] [--device cpu]
    python bench/scale.py evaluation [--identities 50 500] [--images-per-identity 8] [--size 256]

grouping: per N, a child process builds N synthetic faces (``idforge.curate.synthetic``: 20 photos per person,
within-person cosine 0.5-0.8, strangers 0 +/- 0.044 at D = 512), the FAISS similarity graph and the average-linkage
clusters (``curate.group.cluster``); it reports seconds per step, its peak RSS and the pairwise precision/recall
against the true people. The reference, measured in the same run, is the old dense grouping (N x N float64 +
scipy average linkage) at the largest N it fits (2 000 faces by default), for the time ratio at that N.

curation: the sample photos re-encoded into ``--images`` distinct files (bench/curate_throughput.py), curated by
the local engine (1 process) and by Ray Data on a local Ray with 1 and 2 CPU actors; images/s over the per-file
stage (model loading and actor start-up included, Ray's own start-up not) and the 2-vs-1 ratio.

training-input: per N, a child process writes a synthetic sharded prepared set of N items (small tensors of the
tiny model's shapes, 20 photos per identity, 256 items per shard), then a FRESH child streams it the way one
``train.input: stream`` worker does (``idforge.train.stream``: metadata, identity split, shard cache in copy mode
bounded at 64 MiB, shuffle window of 8 shards, batches of 8 composed and collated) for ``--samples`` samples; it
reports the peak RSS, the RSS after imports (the floor), samples/s and the cache's bytes. The reference rate, in
the same run, is the tiny model's training step rate (``bench/train_throughput.py --model tiny``, batch 1).

fanout: the per-identity overhead of the fan-out -- what an identity costs beyond its own data load, training,
sampling and saving -- with one shared worker (``train.identity_worker.BaseWorker``: the base loaded once, restored
after each identity) against one process per identity (interpreter + imports + base load each time, as the old
one-Ray-task-per-identity fan-out paid), same dataset, same run. Shared: base load / N + restore. Per process: the
child's wall time minus its identity's own timings, plus its base load. Prints the per-process / shared ratio.
``--base`` defaults to a tiny random SD1.5-shaped model built here (then the load is small and the ratio is mostly
interpreter start-up); pass a real-sized model directory for the load that dominates at scale.

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


# ----------------------------------------------------------------------------------------------------------------
# training input streamed per rank


def write_synthetic_sharded(out: Path, items: int, per_identity: int = 20, shard_items: int = 256) -> Path:
    """A sharded prepared set of ``items`` synthetic items (tiny-model shapes, small reference crops)."""
    import numpy as np
    import pandas as pd
    import torch

    from idforge.io.atomic import atomic_write_text
    from idforge.train import shards
    from idforge.train.prepare import FORMAT

    rng = np.random.default_rng(0)
    ident = [f"id{i // per_identity:06d}" for i in range(items)]
    keys = [f"{i:040x}" for i in range(items)]
    files: list[str] = []
    (out / shards.SHARD_DIR).mkdir(parents=True, exist_ok=True)
    shapes = {"latents": (4, 8, 8), "latents_flip": (4, 8, 8), "face_embed": (64,), "clip_image_embed": (32,),
              "clip_patch_tokens": (17, 32), "target_kps": (5, 2), "face_mask": (1, 8, 8)}
    for start in range(0, items, shard_items):
        chunk = range(start, min(items, start + shard_items))
        # one draw per field and shard (a per-item draw would dominate the bench's set-up time)
        bulk = {name: torch.from_numpy(rng.standard_normal((len(chunk), *shape), dtype=np.float32))
                for name, shape in shapes.items()}
        pixels = torch.from_numpy(rng.integers(0, 255, (len(chunk), 3, 16, 16), dtype=np.uint8))
        tensors = {keys[i]: {**{name: b[j].clone() for name, b in bulk.items()}, "ref_pixels": pixels[j].clone()}
                   for j, i in enumerate(chunk)}
        meta = {keys[i]: {"identity": ident[i], "source": f"p/{i}.png", "input_hash": "", "resolution": "64"}
                for i in chunk}
        rel = shards.shard_rel(shards.shard_name([keys[i] for i in chunk]))
        shards.write_shard(out / rel, tensors, meta, "float16")
        files += [rel] * len(chunk)
    identities = sorted(set(ident))
    index = pd.DataFrame({"key": keys, "identity": ident, "identity_index": [int(i[2:]) for i in ident],
                          "class_noun": "person", "source": [f"p/{i}.png" for i in range(items)],
                          "sha256": "", "face_index": 0, "file": files, "caption_row": -1})
    index.to_parquet(out / "index.parquet", index=False, row_group_size=shards.INDEX_ROW_GROUP)
    captions = [{"class_noun": "person", "template": t, "prompt": t.format(class_noun="person"), "kind": "template"}
                for t in ("a photo of a {class_noun}", "a portrait of a {class_noun}")]
    (out / "text").mkdir(exist_ok=True)
    from safetensors.torch import save_file

    save_file({"input_ids": torch.zeros(2, 77, dtype=torch.long), "text_embeds": torch.randn(2, 77, 32)},
              str(out / "text" / "t.safetensors"))
    info = {"format": FORMAT, "layout": shards.LAYOUT, "resolution": 64, "text_file": "text/t.safetensors",
            "captions": captions, "identities": identities, "num_items": items, "fingerprint": "synthetic"}
    atomic_write_text(out / "prepared.json", json.dumps(info))
    return out


def stream_child(data: Path, samples: int, batch: int, cache_bytes: int) -> dict:
    import gc

    import torch

    from idforge.train.stream import ShardCache, StreamDataset, make_stream_loader

    torch.set_num_threads(1)
    gc.collect()
    floor = _current_rss_gb()
    with tempfile.TemporaryDirectory(prefix="idforge-stream-") as td:
        cache = ShardCache(str(data), Path(td) / "shards", cache_bytes, copy=True)
        t = time.perf_counter()
        ds = StreamDataset(data, cache, refs_per_item=1, seed=0)
        setup_s = time.perf_counter() - t
        meta_rss = _current_rss_gb()
        loader = iter(make_stream_loader(ds, batch, seed=0, window=8))
        next(loader)  # first shards in
        t = time.perf_counter()
        n = 0
        while n < samples:
            b = next(loader)
            n += int(b["latents"].shape[0])
        wall = time.perf_counter() - t
        return {"items": len(ds), "samples": n, "samples_per_s": round(n / wall, 1), "setup_s": round(setup_s, 2),
                "rss_after_imports_gb": round(floor, 3), "rss_after_metadata_gb": round(meta_rss, 3),
                "peak_rss_gb": round(_peak_rss_gb(), 3), "cache_peak_mb": round(cache.peak_bytes / 2**20, 1),
                "cache_bound_mb": round(cache_bytes / 2**20, 1), "shard_misses": cache.misses,
                "fetched_mb": round(cache.bytes_fetched / 2**20, 1)}


def _current_rss_gb() -> float:
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 1024**3


def _child(args: list[str]) -> dict:
    proc = subprocess.run([sys.executable, __file__, *args], capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise SystemExit(f"child {args} failed: {proc.stderr[-2000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def training_input(sizes: list[int], samples: int, batch: int, cache_mb: int, step_rate: float | None) -> list[dict]:
    results = []
    with tempfile.TemporaryDirectory(prefix="idforge-bench-") as td:
        for n in sizes:
            data = Path(td) / f"p{n}"
            t = time.perf_counter()
            _child(["_write_sharded", str(data), str(n)])
            res = _child(["_stream_child", str(data), str(samples), str(batch), str(cache_mb << 20)])
            res["write_s"] = round(time.perf_counter() - t, 1)
            results.append(res)
            print(json.dumps(res), flush=True)
    if step_rate is None:
        with tempfile.TemporaryDirectory() as td:
            out = Path(td) / "tiny.json"
            subprocess.run([sys.executable, str(Path(__file__).with_name("train_throughput.py")), "--method",
                            "infinite-id", "--model", "tiny", "--no-reference", "--no-loader", "--steps", "20",
                            "--json", str(out)], capture_output=True, text=True, check=True)
            step_rate = float(json.loads(out.read_text())["ours_samples_per_s"])
    small, large = results[0], results[-1]
    ratio = large["peak_rss_gb"] / small["peak_rss_gb"]
    slowest = min(r["samples_per_s"] for r in results)
    print(f"peak RSS {large['items']} vs {small['items']} items: {large['peak_rss_gb']} / {small['peak_rss_gb']} GB "
          f"= {ratio:.3f}x (goal <= 1.10); slowest stream {slowest} samples/s vs the tiny model's step rate "
          f"{step_rate:.1f} samples/s = {slowest / step_rate:.1f}x (goal >= 1)", flush=True)
    return results


def fanout_child(method: str, identity: str, dataset: str, base: str, out: str, cfg_json: str) -> dict:
    from idforge.config import TrackingConfig
    from idforge.train.finetune_config import FinetuneConfig
    from idforge.train.per_identity import finetune_identity

    cfg = FinetuneConfig.model_validate_json(cfg_json)
    off = TrackingConfig(enabled=False)
    return finetune_identity(method, identity, dataset, base, out, cfg, tracking=off).to_json()


def _own_s(timings: dict) -> float:
    """The identity's own work: data load + attach (load minus the base), train, sample, save."""
    return timings["load"] - timings.get("base_load", 0.0) + timings["train"] + timings["sample"] + timings["save"]


def fanout(identities: int, method: str, base: str | None, device: str) -> dict:
    from idforge.config import TrackingConfig
    from idforge.diffusion.tiny import make_tiny
    from idforge.train.finetune_config import FinetuneConfig
    from idforge.train.identity_worker import BaseWorker
    from idforge.train.per_identity import list_identities
    from idforge.train.testdata import write_curated_synthetic

    with tempfile.TemporaryDirectory() as td:
        tmp = Path(td)
        base = base or str(make_tiny(tmp / "tiny-sd15", kind="sd15", seed=0))
        ds = write_curated_synthetic(tmp / "ds", identities=identities, images_per_identity=2, size=128, seed=0)
        ids = list_identities(ds)
        cfg = FinetuneConfig(steps=1, batch_size=1, sample_steps=1, sample_seeds=[0], num_threads=1, device=device)
        off = TrackingConfig(enabled=False)

        t = time.perf_counter()
        worker = BaseWorker(base, cfg)
        shared = [worker.finetune(method, i, ds, tmp / "shared", tracking=off) for i in ids]
        shared_wall = time.perf_counter() - t
        restore = [r.timings["restore"] for r in shared]
        shared_overhead = worker.load_s / len(ids) + sum(restore) / len(ids)

        per_proc, walls = [], []
        for i in ids:
            t = time.perf_counter()
            cmd = [sys.executable, __file__, "_fanout_child", method, i, str(ds), base, str(tmp / "alone"),
                   cfg.model_dump_json()]
            proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
            walls.append(time.perf_counter() - t)
            if proc.returncode != 0:
                raise SystemExit(f"fanout child {i} failed: {proc.stderr[-2000:]}")
            per_proc.append(json.loads(proc.stdout.strip().splitlines()[-1]))
        # everything the child spent that is not the identity's own work: start-up, imports, base load
        proc_overhead = sum(w - _own_s(r["timings"]) for w, r in zip(walls, per_proc, strict=True)) / len(ids)
        res = {
            "method": method, "identities": len(ids), "device": device, "base": "tiny-sd15" if "tiny-sd15" in base
            else base,
            "shared_base_load_s": round(worker.load_s, 3), "shared_restore_mean_s": round(sum(restore) / len(ids), 4),
            "shared_restore_max_s": round(max(restore), 4),
            "shared_overhead_per_identity_s": round(shared_overhead, 4),
            "shared_wall_s": round(shared_wall, 2),
            "per_process_base_load_mean_s": round(sum(r["timings"]["base_load"] for r in per_proc) / len(ids), 3),
            "per_process_overhead_per_identity_s": round(proc_overhead, 3),
            "per_process_wall_s": round(sum(walls), 2),
            "overhead_ratio": round(proc_overhead / max(shared_overhead, 1e-9), 1),
        }
        print(json.dumps(res), flush=True)
        print(f"per-identity overhead: one process per identity {proc_overhead:.3f} s vs shared worker "
              f"{shared_overhead:.4f} s -> {res['overhead_ratio']}x; wall for {len(ids)} identities "
              f"{res['per_process_wall_s']} s vs {res['shared_wall_s']} s", flush=True)
        return res




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
    t = sub.add_parser("training-input")
    t.add_argument("--items", type=int, nargs="+", default=[10_000, 100_000])
    t.add_argument("--samples", type=int, default=20_000, help="samples streamed per size")
    t.add_argument("--batch", type=int, default=8)
    t.add_argument("--cache-mb", type=int, default=64)
    t.add_argument("--step-rate", type=float, default=None,
                   help="reference samples/s; default: measure the tiny model's step rate in this run")
    w = sub.add_parser("_write_sharded")
    w.add_argument("out", type=Path)
    w.add_argument("items", type=int)
    sc = sub.add_parser("_stream_child")
    sc.add_argument("data", type=Path)
    sc.add_argument("samples", type=int)
    sc.add_argument("batch", type=int)
    sc.add_argument("cache_bytes", type=int)
    f = sub.add_parser("fanout")
    f.add_argument("--identities", type=int, default=6)
    f.add_argument("--method", default="textual-inversion")
    f.add_argument("--base", default=None, help="base model directory; default: a tiny SD1.5-shaped one")
    f.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    fchild = sub.add_parser("_fanout_child")
    for name in ("method", "identity", "dataset", "base", "out", "cfg_json"):
        fchild.add_argument(name)
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
    if args.what == "_write_sharded":
        write_synthetic_sharded(args.out, args.items)
        print(json.dumps({"written": args.items}))
        return 0
    if args.what == "_stream_child":
        print(json.dumps(stream_child(args.data, args.samples, args.batch, args.cache_bytes)))
        return 0
    if args.what == "_fanout_child":
        print(json.dumps(fanout_child(args.method, args.identity, args.dataset, args.base, args.out, args.cfg_json)))
        return 0
    if args.what == "_evaluation_child":
        print(json.dumps(evaluation_child(args.gen, args.out)))
        return 0
    print(f"{os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.2f} at start (other jobs share these cores)",
          flush=True)
    if args.what == "grouping":
        grouping(args.faces, args.dense_faces)
    elif args.what == "training-input":
        training_input(args.items, args.samples, args.batch, args.cache_mb, args.step_rate)
    elif args.what == "fanout":
        fanout(args.identities, args.method, args.base, args.device)
    elif args.what == "evaluation":
        evaluation(args.identities, args.images_per_identity, args.size)
    else:
        curation(args.images)
    print(f"load average {os.getloadavg()[0]:.2f} at end", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
