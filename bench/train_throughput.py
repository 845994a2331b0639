"""Training throughput of a population method's step vs a plain eager reference step, measured in one run.

    python bench/train_throughput.py --method infinite-id --model sd15-shape --batch 16 --resolution 512
    python bench/train_throughput.py --method id-adapter --model sdxl-shape --batch 4 --resolution 1024
    python bench/train_throughput.py --method infinite-id --model tiny          # seconds, for a smoke test

Both steps run on the same randomly initialised base model of the real shape (SD1.5: UNet 860M, CLIP-L text
encoder, VAE; SDXL: UNet 2.6B, two text encoders) at the same batch and resolution, from the same cached inputs
(``prepare`` latents and text embeddings), with the same autocast dtype (bf16 on GPU, float32 on CPU):

- ours: ``idforge.train.loop.TrainStep`` — the loop's own step (the method's ``training_loss``, frozen weights in
  the autocast dtype, channels-last UNet, fused AdamW, optional ``--compile``);
- reference: frozen UNet + one decoupled image cross-attention (IP-Adapter: image projection to 4 tokens, an
  extra K/V per cross-attention layer, outputs summed), plain eager: fp32 frozen weights under autocast, foreach
  AdamW, default memory format, no compile.

Prints samples/s and peak memory of each (CUDA: peak allocated; CPU: peak RSS growth during the timed steps), the
ratio ours/reference, and the data loader's samples/s over a prepared cache of the same shapes (it must exceed
the step's, or data loading would be the bottleneck). ``--json`` writes the numbers.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import os
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

# ----------------------------------------------------------------------------------------------------------------
# base models of the real shapes, random weights (nothing is downloaded)


def _tokenizer(tmp: Path) -> Any:
    from transformers import CLIPTokenizer

    from idforge.diffusion.tiny import make_tiny

    tiny = make_tiny(tmp / "tiny-sd15", kind="sd15", seed=0)
    return CLIPTokenizer.from_pretrained(tiny / "tokenizer")


def _vae() -> Any:
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, layers_per_block=2,
        block_out_channels=(128, 256, 512, 512), down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4, sample_size=512,
    )


def _text_encoder(vocab: int, hidden: int, layers: int, heads: int, projection: int | None = None) -> Any:
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    cfg = CLIPTextConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=hidden * 4, num_hidden_layers=layers,
                         num_attention_heads=heads, max_position_embeddings=77, projection_dim=projection or hidden,
                         hidden_act="gelu")
    return (CLIPTextModelWithProjection if projection else CLIPTextModel)(cfg)


def build_pipeline(kind: str, tmp: Path) -> Any:
    """A StableDiffusion(XL)Pipeline of random weights in the real architecture (``tiny``: the test model)."""
    import torch
    from diffusers import DDPMScheduler, StableDiffusionPipeline, StableDiffusionXLPipeline, UNet2DConditionModel

    if kind == "tiny":
        from idforge.diffusion.tiny import make_tiny

        return StableDiffusionPipeline.from_pretrained(make_tiny(tmp / "tiny", kind="sd15"), local_files_only=True)
    torch.manual_seed(0)
    tok = _tokenizer(tmp)
    sched = DDPMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000,
                          clip_sample=False)
    if kind == "sd15-shape":
        unet = UNet2DConditionModel(sample_size=64, cross_attention_dim=768, attention_head_dim=8)
        return StableDiffusionPipeline(vae=_vae(), text_encoder=_text_encoder(len(tok), 768, 12, 12), tokenizer=tok,
                                       unet=unet, scheduler=sched, safety_checker=None, feature_extractor=None,
                                       requires_safety_checker=False)
    if kind == "sdxl-shape":
        unet = UNet2DConditionModel(
            sample_size=128, block_out_channels=(320, 640, 1280),
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
            transformer_layers_per_block=(1, 2, 10), attention_head_dim=(5, 10, 20), cross_attention_dim=2048,
            use_linear_projection=True, addition_embed_type="text_time", addition_time_embed_dim=256,
            projection_class_embeddings_input_dim=2816,
        )
        return StableDiffusionXLPipeline(
            vae=_vae(), text_encoder=_text_encoder(len(tok), 768, 12, 12), tokenizer=tok,
            text_encoder_2=_text_encoder(len(tok), 1280, 32, 20, projection=1280), tokenizer_2=tok,
            unet=unet, scheduler=sched, force_zeros_for_empty_prompt=True,
        )
    raise SystemExit(f"unknown --model {kind!r}: sd15-shape | sdxl-shape | tiny")


# ----------------------------------------------------------------------------------------------------------------
# inputs (what `prepare` caches), shaped for the model and the method


def feature_dims(kind: str) -> dict[str, int]:
    """Face and CLIP feature sizes the methods are configured for, per base model."""
    if kind == "tiny":
        return {"face": 512, "clip_tokens": 17, "clip_dim": 32, "clip_embed": 32}
    if kind == "sd15-shape":  # CLIP ViT-L/14 (IDAdapter) / ViT-H/14 (IP-Adapter) penultimate states: 257 tokens
        return {"face": 512, "clip_tokens": 257, "clip_dim": 1024, "clip_embed": 768}
    return {"face": 512, "clip_tokens": 257, "clip_dim": 1664, "clip_embed": 1280}  # OpenCLIP bigG (Infinite-ID)


def make_batch(pipe: Any, kind: str, batch: int, resolution: int, refs: int, seed: int = 0) -> Any:
    import torch

    from idforge.diffusion.text import encode_prompts, tokenize
    from idforge.methods.types import TrainBatch

    g = torch.Generator().manual_seed(seed)
    d = feature_dims(kind)
    prompts = ["a photo of a person"] * batch
    ids, ids_2 = tokenize(pipe, prompts)
    with torch.no_grad():
        text = encode_prompts(pipe, prompts)
    h = resolution // 8
    template = torch.tensor([[38.29, 51.70], [73.53, 51.50], [56.03, 71.74], [41.55, 92.37], [70.73, 92.20]])
    return TrainBatch(
        latents=torch.randn(batch, 4, h, h, generator=g),
        input_ids=ids, input_ids_2=ids_2,
        text_embeds=text.hidden, pooled_text_embeds=text.pooled,
        face_embeds=torch.nn.functional.normalize(torch.randn(batch, refs, d["face"], generator=g), dim=-1),
        clip_image_embeds=torch.randn(batch, refs, d["clip_embed"], generator=g),
        clip_patch_tokens=torch.randn(batch, refs, d["clip_tokens"], d["clip_dim"], generator=g),
        target_kps=(template / 112 * resolution * 0.6 + resolution * 0.2).expand(batch, 5, 2).clone(),
        identity=torch.arange(batch),
    )


# ----------------------------------------------------------------------------------------------------------------
# the reference step: frozen UNet + one decoupled image cross-attention (IP-Adapter), eager


class DecoupledCrossAttnProcessor:
    """IP-Adapter's processor: text attention + scale * attention over the image tokens (own K/V), summed."""

    def __init__(self, to_k_ip: Any, to_v_ip: Any, text_len: int, scale: float = 1.0) -> None:
        self.to_k_ip, self.to_v_ip, self.text_len, self.scale = to_k_ip, to_v_ip, text_len, scale

    def __call__(self, attn: Any, hidden_states: Any, encoder_hidden_states: Any = None, attention_mask: Any = None,
                 temb: Any = None, *args: Any, **kwargs: Any) -> Any:
        import torch.nn.functional as F

        b = hidden_states.shape[0]
        spatial = hidden_states.ndim == 4
        if spatial:
            _, c, hh, ww = hidden_states.shape
            hidden_states = hidden_states.view(b, c, hh * ww).transpose(1, 2)
        text, image = encoder_hidden_states[:, : self.text_len], encoder_hidden_states[:, self.text_len:]
        q = attn.to_q(hidden_states)
        heads = attn.heads

        def split(x: Any) -> Any:
            return x.view(b, -1, heads, x.shape[-1] // heads).transpose(1, 2)

        out = F.scaled_dot_product_attention(split(q), split(attn.to_k(text)), split(attn.to_v(text)))
        ip = F.scaled_dot_product_attention(split(q), split(self.to_k_ip(image)), split(self.to_v_ip(image)))
        out = (out + self.scale * ip).transpose(1, 2).reshape(b, -1, heads * q.shape[-1] // heads)
        out = attn.to_out[1](attn.to_out[0](out))
        if spatial:
            out = out.transpose(-1, -2).reshape(b, c, hh, ww)
        if attn.residual_connection:
            out = out + (hidden_states if not spatial else hidden_states.transpose(-1, -2).reshape(b, c, hh, ww))
        return out / attn.rescale_output_factor


class ReferenceStep:
    """Eager IP-Adapter-style training step over cached latents/text embeddings."""

    def __init__(self, pipe: Any, clip_embed_dim: int, amp_dtype: Any, num_tokens: int = 4, lr: float = 1e-4) -> None:
        import torch
        from torch import nn

        unet = pipe.unet
        cross = unet.config.cross_attention_dim
        self.pipe, self.amp_dtype, self.num_tokens = pipe, amp_dtype, num_tokens
        self.proj = nn.Sequential(nn.Linear(clip_embed_dim, num_tokens * cross), nn.Unflatten(-1, (num_tokens, cross)),
                                  nn.LayerNorm(cross)).to(unet.device)
        self.kv = nn.ModuleDict()
        procs = {}
        for name, proc in unet.attn_processors.items():
            if name.endswith("attn2.processor"):
                attn = unet.get_submodule(name[: -len(".processor")])
                key = name.replace(".", "_")
                self.kv[key] = nn.ModuleList([nn.Linear(cross, attn.to_k.out_features, bias=False),
                                              nn.Linear(cross, attn.to_v.out_features, bias=False)])
                procs[name] = DecoupledCrossAttnProcessor(self.kv[key][0], self.kv[key][1], text_len=77)
            else:
                procs[name] = proc
        self.kv.to(unet.device)
        self._original = dict(unet.attn_processors)
        unet.set_attn_processor(procs)
        self.params = [*self.proj.parameters(), *self.kv.parameters()]
        self.optimizer = torch.optim.AdamW(self.params, lr=lr)
        from diffusers import DDPMScheduler

        self.scheduler = DDPMScheduler.from_config(pipe.scheduler.config)

    def detach(self) -> None:
        self.pipe.unet.set_attn_processor(dict(self._original))

    def __call__(self, batch: Any, generator: Any) -> dict[str, float]:
        import torch
        import torch.nn.functional as F

        from idforge.diffusion.text import TextCondition, unet_call

        autocast = (torch.autocast(device_type=batch.latents.device.type, dtype=self.amp_dtype)
                    if self.amp_dtype is not None else contextlib.nullcontext())
        with autocast:
            tokens = self.proj(batch.clip_image_embeds[:, 0])
            text = TextCondition(torch.cat([batch.text_embeds, tokens.to(batch.text_embeds.dtype)], dim=1),
                                 batch.pooled_text_embeds)
            noise = torch.randn(batch.latents.shape, generator=generator, device=generator.device).to(batch.latents)
            t = torch.randint(0, 1000, (batch.batch_size,), generator=generator, device=generator.device)
            t = t.to(batch.latents.device)
            noisy = self.scheduler.add_noise(batch.latents, noise, t)
            pred = unet_call(self.pipe, noisy, t, text)
            loss = F.mse_loss(pred.float(), noise.float())
        loss.backward()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return {"loss": float(loss.detach())}


# ----------------------------------------------------------------------------------------------------------------
# measuring


class PeakMemory:
    """Peak memory during a block: CUDA peak allocated, or (CPU) peak RSS above the block's starting RSS."""

    def __init__(self, device: Any) -> None:
        self.device, self.peak_bytes = device, 0

    def __enter__(self) -> PeakMemory:
        import torch

        if self.device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self._base = 0
            return self
        import psutil

        self._proc = psutil.Process()
        self._base = self._proc.memory_info().rss
        self._peak = self._base
        self._stop = threading.Event()

        def sample() -> None:
            while not self._stop.wait(0.005):
                self._peak = max(self._peak, self._proc.memory_info().rss)

        self._thread = threading.Thread(target=sample, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        import torch

        if self.device.type == "cuda":
            torch.cuda.synchronize()
            self.peak_bytes = torch.cuda.max_memory_allocated()
            return
        self._stop.set()
        self._thread.join()
        self.peak_bytes = max(self._peak, self._proc.memory_info().rss) - self._base


def time_steps(step: Any, warmup: int, steps: int, batch_size: int, device: Any) -> tuple[float, float]:
    """(samples/s over ``steps`` timed calls after ``warmup`` untimed ones, peak memory bytes)."""
    import torch

    for _ in range(warmup):
        step()
    with PeakMemory(device) as mem:
        start = time.perf_counter()
        for _ in range(steps):
            step()
        if device.type == "cuda":
            torch.cuda.synchronize()
        elapsed = time.perf_counter() - start
    return steps * batch_size / elapsed, mem.peak_bytes


def loader_throughput(kind: str, batch: int, resolution: int, refs: int, seconds: float = 3.0) -> float:
    """samples/s of ``PreparedDataset`` + ``make_loader`` over a cache of random items of the real shapes."""
    import torch

    from idforge.train.dataset import PreparedDataset, make_loader
    from idforge.train.prepare import _save, item_path

    d = feature_dims(kind)
    h = resolution // 8
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        rows = []
        g = torch.Generator().manual_seed(0)
        n_ids, per_id = 8, 4
        for i in range(n_ids * per_id):
            key = f"{i:040x}"
            _save(item_path(root, key), {
                "latents": torch.randn(4, h, h, generator=g), "latents_flip": torch.randn(4, h, h, generator=g),
                "face_embed": torch.randn(d["face"], generator=g), "clip_image_embed": torch.randn(d["clip_embed"]),
                "clip_patch_tokens": torch.randn(d["clip_tokens"], d["clip_dim"], generator=g),
                "ref_pixels": torch.zeros(3, 112, 112, dtype=torch.uint8), "target_kps": torch.zeros(5, 2),
                "face_mask": torch.ones(1, h, h),
            }, "float16", {"resolution": str(resolution)})
            rows.append({"key": key, "identity": f"id{i // per_id}", "identity_index": i // per_id,
                         "class_noun": "person", "source": key, "sha256": key, "face_index": 0,
                         "file": item_path(Path("."), key).as_posix()})
        import pandas as pd

        pd.DataFrame(rows).to_parquet(root / "index.parquet")
        _save(root / "text" / "t.safetensors", {"input_ids": torch.zeros(1, 77, dtype=torch.long),
                                                "text_embeds": torch.randn(1, 77, 768)}, "float16", {})
        (root / "prepared.json").write_text(json.dumps({
            "resolution": resolution, "text_file": "text/t.safetensors",
            "identities": sorted({r["identity"] for r in rows}),
            "captions": [{"class_noun": "person", "template": "a photo of a {class_noun}",
                          "prompt": "a photo of a person"}]}))
        # memory_cache_bytes=0: read every item from disk each time (the large-dataset path)
        ds = PreparedDataset(root, refs_per_item=refs, memory_cache_bytes=0)
        it = iter(make_loader(ds, batch))
        next(it)
        n, start = 0, time.perf_counter()
        while time.perf_counter() - start < seconds:
            next(it)
            n += batch
        return n / (time.perf_counter() - start)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--method", default="infinite-id", choices=["infinite-id", "id-adapter"])
    ap.add_argument("--model", default="sd15-shape", choices=["sd15-shape", "sdxl-shape", "tiny"])
    ap.add_argument("--batch", type=int, default=None, help="default: 16 on GPU, 1 on CPU")
    ap.add_argument("--resolution", type=int, default=None, help="pixels; default: native (512 / 1024), 64 tiny")
    ap.add_argument("--steps", type=int, default=None, help="timed steps (default 20 GPU, 3 CPU)")
    ap.add_argument("--warmup", type=int, default=None, help="untimed steps first (default 5 GPU, 1 CPU)")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--compile", action="store_true", help="torch.compile the UNet in our step")
    ap.add_argument("--no-loader", action="store_true", help="skip the data-loader measurement")
    ap.add_argument("--checkpointing", action="store_true",
                    help="gradient checkpointing of the frozen UNet in both steps (train.gradient_checkpointing)")
    ap.add_argument("--optimizer", default="adamw_fused", choices=["adamw", "adamw_fused", "adamw_8bit"],
                    help="our step's train.optimizer (the reference keeps plain foreach AdamW)")
    ap.add_argument("--no-reference", action="store_true",
                    help="measure our step only (a memory check: no ratio)")
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args(argv)

    import torch

    from idforge.methods.registry import get_method
    from idforge.train.config import TrainConfig
    from idforge.train.loop import TrainStep, _precision
    from idforge.train.optim import peak_memory_gib

    device = torch.device(args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu"))
    gpu = device.type == "cuda"
    batch = args.batch or (16 if gpu else 1)
    resolution = args.resolution or {"sd15-shape": 512, "sdxl-shape": 1024, "tiny": 64}[args.model]
    steps = args.steps or (20 if gpu else 3)
    warmup = args.warmup if args.warmup is not None else (5 if gpu else 1)
    cfg = TrainConfig(method=args.method, batch_size=batch, compile_unet=args.compile, max_grad_norm=1.0,
                      optimizer=args.optimizer if gpu or args.optimizer != "adamw_fused" else "adamw",
                      gradient_checkpointing=args.checkpointing)
    amp_dtype, frozen_dtype = _precision(cfg, device)
    dims = feature_dims(args.model)
    method_cfg = {"clip_dim": dims["clip_dim"], "face_dim": dims["face"]}
    if args.model == "tiny" and args.method == "id-adapter":
        method_cfg.update(mff_dim=32, mff_heads=2)
    refs = int(get_method(args.method, method_cfg).config.model_dump().get("num_refs", 1))

    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        pipe = build_pipeline(args.model, Path(tmp))
        build_s = time.perf_counter() - t0
    for name in ("unet", "vae", "text_encoder", "text_encoder_2"):
        mod = getattr(pipe, name, None)
        if mod is not None:
            mod.requires_grad_(False).eval()
    pipe.set_progress_bar_config(disable=True)
    pipe.to(device)
    data = make_batch(pipe, args.model, batch, resolution, refs).to(device)
    generator = torch.Generator(device=device).manual_seed(0)
    results: dict[str, Any] = {
        "method": args.method, "model": args.model, "device": str(torch.cuda.get_device_name() if gpu else "cpu"),
        "batch": batch, "resolution": resolution, "autocast": str(amp_dtype), "timed_steps": steps,
        "cpu_threads": torch.get_num_threads(), "model_build_s": round(build_s, 1),
        "gradient_checkpointing": cfg.gradient_checkpointing, "optimizer": cfg.optimizer,
    }
    if cfg.gradient_checkpointing:
        pipe.unet.enable_gradient_checkpointing()

    # reference first, on fp32 frozen weights (its autocast does the low-precision compute)
    if not args.no_reference:
        ref = ReferenceStep(pipe, dims["clip_embed"], amp_dtype)
        sps, mem = time_steps(functools.partial(ref, data, generator), warmup, steps, batch, device)
        ref.detach()
        results.update(reference_samples_per_s=sps, reference_peak_mem_gib=mem / 2**30)
        del ref

    # ours: the loop's step and precision policy (frozen weights in the autocast dtype, channels-last, fused AdamW)
    if frozen_dtype != "float32":
        pipe.to(dtype=getattr(torch, frozen_dtype))
    if gpu and cfg.channels_last:
        pipe.unet.to(memory_format=torch.channels_last)
    if gpu:
        torch.backends.cuda.matmul.allow_tf32 = cfg.allow_tf32
    method = get_method(args.method, method_cfg)
    method.attach(pipe)
    method.train()
    if cfg.compile_unet:
        pipe.unet = torch.compile(pipe.unet)
    ours = TrainStep(method, pipe, cfg, amp_dtype)
    sps, mem = time_steps(lambda: ours([data], generator), warmup, steps, batch, device)
    results.update(ours_samples_per_s=sps, ours_peak_mem_gib=mem / 2**30,
                   trainable_params=sum(p.numel() for p in method.trainable_parameters()))
    if not args.no_reference:
        results["ratio_ours_over_reference"] = results["ours_samples_per_s"] / results["reference_samples_per_s"]
    results["process_peak_rss_gib"] = peak_memory_gib(device) if not gpu else float("nan")
    if not args.no_loader:
        results["loader_samples_per_s"] = loader_throughput(args.model, batch, resolution, refs)

    width = max(map(len, results))
    for k, v in results.items():
        print(f"{k:<{width}}  {v:.3f}" if isinstance(v, float) else f"{k:<{width}}  {v}")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))
    return results


if __name__ == "__main__":
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    sys.exit(0 if main() else 1)
