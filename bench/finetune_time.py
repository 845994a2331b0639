"""Wall time of one identity's fine-tuning, split into load / train / sample / save, against plain textual inversion.

    python bench/finetune_time.py --method id-ea                       # tiny SD1.5-shaped model, paper recipe
    python bench/finetune_time.py --method pidiff --steps 20           # shorten on CPU
    python bench/finetune_time.py --method id-ea --shape sd21 --device cuda --resolution 512   # the GPU target

The same run trains the method and, as the reference, plain Textual Inversion with the SAME steps, batch size and
resolution (one token, diffusers recipe otherwise), both through ``idforge.train.per_identity.finetune_identity``,
and prints the time ratio. ``--shape sd21`` builds SD2.1-base-shaped random weights (UNet 320-1280 channels,
OpenCLIP-H-sized text encoder, 1024-d cross-attention) locally; no weights are downloaded. The issue's target:
ID-EA's 320 steps x batch 8 in <= 30 s including model load on one H100 at 512 px.
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any


def make_sd21_shaped(out_dir: Path, seed: int = 0) -> Path:
    """Random SD2.1-base-shaped pipeline saved with ``save_pretrained`` (tokenizer: the tiny offline CLIP one)."""
    import torch
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from idforge.diffusion.loading import load_pipeline
    from idforge.diffusion.tiny import make_tiny

    tiny = load_pipeline(make_tiny(out_dir.parent / "tiny-tokenizer-src", "sd15", seed))
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        sample_size=64, in_channels=4, out_channels=4, layers_per_block=2,
        block_out_channels=(320, 640, 1280, 1280), attention_head_dim=(5, 10, 20, 20), cross_attention_dim=1024,
        use_linear_projection=True,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"))
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, layers_per_block=2, sample_size=512,
        block_out_channels=(128, 256, 512, 512),
        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4)
    tok = tiny.tokenizer
    text = CLIPTextModel(CLIPTextConfig(
        vocab_size=max(49408, len(tok)), hidden_size=1024, intermediate_size=4096, num_attention_heads=16,
        num_hidden_layers=23, projection_dim=512, hidden_act="gelu", max_position_embeddings=77,
        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id))
    sched = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
                          set_alpha_to_one=False, steps_offset=1, prediction_type="epsilon")
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=text, tokenizer=tok, unet=unet, scheduler=sched,
                                   safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.save_pretrained(out_dir)
    return out_dir


def run_one(method: str, model: str, dataset: Path, out: Path, args: argparse.Namespace, method_config: dict[str, Any],
            steps: int | None, batch: int | None) -> dict[str, Any]:
    from idforge.config import TrackingConfig
    from idforge.train.finetune_config import FinetuneConfig
    from idforge.train.per_identity import finetune_identity

    cfg = FinetuneConfig(method_config=method_config, steps=steps, batch_size=batch, resolution=args.resolution,
                         device=args.device, dtype=args.dtype, sample_steps=args.sample_steps, sample_seeds=[0],
                         num_threads=args.threads, log_every=10**9)
    res = finetune_identity(method, "id00", dataset, model, out / method, cfg, tracking=TrackingConfig(enabled=False))
    meta = json.loads((Path(res.artifact_dir) / "finetune.json").read_text())
    r = meta["recipe"]
    return {"method": method, "steps": r["steps"], "batch_size": r["batch_size"], **res.timings,
            "train_per_step_s": res.timings["train"] / r["steps"], "first_loss": res.first_loss,
            "final_loss": res.final_loss}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--method", required=True, help="textual-inversion | dreambooth-lora | id-ea | sefi-ide | pidiff")
    p.add_argument("--model", help="base model dir; default: a freshly built tiny (or --shape) model")
    p.add_argument("--shape", choices=["tiny", "sd21"], default="tiny")
    p.add_argument("--steps", type=int, help="override the paper's step count (e.g. to shorten on CPU)")
    p.add_argument("--batch-size", type=int, help="override the paper's batch size")
    p.add_argument("--resolution", type=int, help="training resolution; default: the model's native")
    p.add_argument("--images", type=int, default=4, help="images of the synthetic identity")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"])
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--sample-steps", type=int, default=1, help="denoising steps of the final sample (timed apart)")
    p.add_argument("--no-reference", action="store_true", help="skip the textual-inversion reference")
    p.add_argument("--json", help="write the results here")
    p.add_argument("--keep", help="keep the work directory here instead of a temp dir")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)

    from idforge.methods.personalized import register_per_identity_methods
    from idforge.train.testdata import write_curated_synthetic

    register_per_identity_methods()
    work = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="finetune-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    try:
        t0 = time.perf_counter()
        if args.model:
            model = args.model
        elif args.shape == "sd21":
            model = str(make_sd21_shaped(work / "sd21"))
        else:
            from idforge.diffusion.tiny import make_tiny

            model = str(make_tiny(work / "tiny", "sd15"))
        build_s = time.perf_counter() - t0
        dataset = write_curated_synthetic(work / "ds", identities=1, images_per_identity=args.images, size=256)
        rows = [run_one(args.method, model, dataset, work / "out", args, {}, args.steps, args.batch_size)]
        if not args.no_reference:
            ours = rows[0]
            rows.append(run_one("textual-inversion", model, dataset, work / "ref", args, {"num_tokens": 1},
                                ours["steps"], ours["batch_size"]))
        print(f"model: {model} ({args.shape}, built in {build_s:.1f}s)")
        print(f"{'method':<18} {'steps':>5} {'batch':>5} {'load_s':>8} {'train_s':>8} {'sample_s':>8} {'save_s':>7} "
              f"{'total_s':>8} {'s/step':>7}")
        for r in rows:
            print(f"{r['method']:<18} {r['steps']:>5} {r['batch_size']:>5} {r['load']:>8.2f} {r['train']:>8.2f} "
                  f"{r['sample']:>8.2f} {r['save']:>7.2f} {r['total']:>8.2f} {r['train_per_step_s']:>7.3f}")
        result: dict[str, Any] = {"model": model, "shape": args.shape, "rows": rows}
        if len(rows) == 2:
            result["ratio_train"] = rows[0]["train"] / rows[1]["train"]
            result["ratio_total"] = rows[0]["total"] / rows[1]["total"]
            print(f"ratio vs textual inversion (same steps/batch): train x{result['ratio_train']:.2f}, "
                  f"total x{result['ratio_total']:.2f}")
        if args.json:
            Path(args.json).write_text(json.dumps(result, indent=2))
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
