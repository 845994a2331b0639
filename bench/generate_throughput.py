"""Generation throughput of each method's sampler vs the plain diffusers pipeline, measured in one run.

    python bench/generate_throughput.py --model tiny                          # 64 px, 30 steps, batch 4
    python bench/generate_throughput.py --model sd15-shape --steps 2 --batch 1  # 512 px, CPU-sized
    python bench/generate_throughput.py --model sd15-shape --steps 30 --batch 8  # the GPU goal (>= 5 images/s)

Every sampler runs on the same randomly initialised base model of the real shape (``bench/train_throughput.py``'s
``build_pipeline``: SD1.5 = UNet 860M, CLIP-L text encoder, VAE), at the same resolution, steps, guidance scale,
batch (prompts per call), scheduler (the pipeline's own) and dtype (fp16 on GPU, fp32 on CPU):

- plain: ``StableDiffusionPipeline.__call__`` (diffusers' own loop), the reference;
- each method: ``method.generate`` (idforge's sampler with the method's processors and its identity condition built
  from random reference features of the real sizes), as the generation driver calls it.

Prints images/s and peak memory (CUDA: peak allocated; CPU: peak RSS growth during the timed calls) per sampler,
each method's ratio to plain, its UNet streams (Infinite-ID's mixed attention runs a second, text-only latent
stream: its paper's extra cost, x2 UNet rows) and its overhead beyond those streams:
``(plain_ips / method_ips) / streams - 1`` (goal <= 0.10). ``--json`` writes the numbers.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).parent))
from train_throughput import PeakMemory, build_pipeline, feature_dims  # noqa: E402

METHODS = ("infinite-id", "id-adapter")
PROMPT = "a photo of a person wearing a red hat, studio light"


def method_config(name: str, kind: str) -> dict[str, Any]:
    dims = feature_dims(kind)
    cfg: dict[str, Any] = {"clip_dim": dims["clip_dim"], "face_dim": dims["face"]}
    if kind == "tiny" and name == "id-adapter":
        cfg.update(mff_dim=32, mff_heads=2)
    return cfg


def random_refs(kind: str, num_refs: int) -> Any:
    import torch

    from idforge.methods.types import IdentityRefs

    d = feature_dims(kind)
    g = torch.Generator().manual_seed(0)
    return IdentityRefs(
        face_embeds=torch.nn.functional.normalize(torch.randn(num_refs, d["face"], generator=g), dim=-1),
        clip_image_embeds=torch.randn(num_refs, d["clip_embed"], generator=g),
        clip_patch_tokens=torch.randn(num_refs, d["clip_tokens"], d["clip_dim"], generator=g),
        face_crops=torch.rand(num_refs, 3, 112, 112, generator=g),
    )


def timed(call: Any, batch: int, warmup: int, repeats: int, device: Any) -> tuple[float, float]:
    """(images/s over ``repeats`` calls of ``batch`` images after ``warmup`` untimed ones, peak memory bytes)."""
    import torch

    for _ in range(warmup):
        call()
    with PeakMemory(device) as mem:
        start = time.perf_counter()
        for _ in range(repeats):
            images = call()
            if len(images) != batch:
                raise RuntimeError(f"expected {batch} images, got {len(images)}")
        if device.type == "cuda":
            torch.cuda.synchronize()
        elapsed = time.perf_counter() - start
    return repeats * batch / elapsed, mem.peak_bytes


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="tiny", choices=["tiny", "sd15-shape", "sdxl-shape"])
    ap.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    ap.add_argument("--batch", type=int, default=4, help="prompts per call (images per call)")
    ap.add_argument("--resolution", type=int, default=None, help="pixels; default: native (64 tiny, 512, 1024)")
    ap.add_argument("--steps", type=int, default=30, help="sampling steps")
    ap.add_argument("--guidance", type=float, default=7.5)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=2, help="timed calls per sampler")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args(argv)

    import torch

    from idforge.methods.registry import get_method

    device = torch.device(args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu"))
    gpu = device.type == "cuda"
    if args.threads:
        torch.set_num_threads(args.threads)
    res = args.resolution or {"tiny": 64, "sd15-shape": 512, "sdxl-shape": 1024}[args.model]
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        pipe = build_pipeline(args.model, Path(tmp))
        build_s = time.perf_counter() - t0
    pipe.set_progress_bar_config(disable=True)
    pipe.to(device, torch.float16 if gpu else torch.float32)
    prompts = [PROMPT] * args.batch
    results: dict[str, Any] = {
        "model": args.model, "device": torch.cuda.get_device_name() if gpu else "cpu", "resolution": res,
        "steps": args.steps, "guidance": args.guidance, "batch": args.batch, "repeats": args.repeats,
        "cpu_threads": torch.get_num_threads(), "model_build_s": round(build_s, 1),
        "load_average_start": round(os.getloadavg()[0], 2),
    }

    def plain() -> list[Any]:
        gens = [torch.Generator("cpu").manual_seed(0) for _ in prompts]
        return pipe(prompt=prompts, num_inference_steps=args.steps, guidance_scale=args.guidance, height=res,
                    width=res, generator=gens, output_type="pil").images

    with torch.inference_mode():
        ips, mem = timed(plain, args.batch, args.warmup, args.repeats, device)
    results["plain"] = {"images_per_s": ips, "peak_mem_gib": mem / 2**30}
    print(f"plain diffusers: {ips:.4f} images/s, peak {mem / 2**30:.3f} GiB", flush=True)

    for name in args.methods:
        torch.manual_seed(0)
        method = get_method(name, method_config(name, args.model))
        method.attach(pipe)
        method.to(device, torch.float16 if gpu else torch.float32)
        num_refs = int(method.config.model_dump().get("num_refs", 1))
        with torch.inference_mode():
            cond = method.identity_condition(random_refs(args.model, num_refs).to(device), pipe)

            def ours(method=method, cond=cond) -> list[Any]:
                return method.generate(pipe, prompts, cond, seeds=[0], batch_size=args.batch,
                                       num_inference_steps=args.steps, guidance_scale=args.guidance, height=res,
                                       width=res)

            ips_m, mem_m = timed(ours, args.batch, args.warmup, args.repeats, device)
        streams = method.sampling_streams()
        method.detach(pipe)
        ratio = ips_m / ips
        rec = {"images_per_s": ips_m, "peak_mem_gib": mem_m / 2**30, "ratio_to_plain": ratio, "streams": streams,
               "overhead_beyond_streams": (1 / ratio) / streams - 1}
        results[name] = rec
        print(f"{name}: {ips_m:.4f} images/s ({ratio:.3f}x plain), peak {mem_m / 2**30:.3f} GiB, {streams} stream(s), "
              f"overhead beyond streams {rec['overhead_beyond_streams']:+.1%}", flush=True)
    results["load_average_end"] = round(os.getloadavg()[0], 2)
    print(json.dumps(results, indent=1, default=float))
    if args.json:
        args.json.write_text(json.dumps(results, indent=2, default=float))
    return results


if __name__ == "__main__":
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    sys.exit(0 if main() else 1)
