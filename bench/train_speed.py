"""Training step time and peak memory: difflora against the reference LoRA loop, in one run.

    python bench/train_speed.py [--model PATH] [--batch 4] [--rank 16] [--steps 30] [--warmup 5]

Contenders (same model, resolution, batch, rank, precision, optimizer and learning rate):
  reference          the loop of diffusers' examples/text_to_image/train_text_to_image_lora.py,
                     written out here as that script does it: peft `add_adapter` on the U-Net
                     (its targets: to_q/to_k/to_v/to_out.0), images loaded and transformed, VAE
                     latents and text embeddings computed every step, AdamW, grad clipping 1.0.
  difflora_standard  `difflora train` (method standard) on the reference's modules
                     (network_only_if_contains = attention to_q/k/v/out): the like-for-like step.
  difflora_addift    `difflora train` (method addift) on pairs of the same images, same modules.
  difflora_nocache   difflora_standard with cache_latents = false (VAE every step): what caching buys.
  difflora_kohya_targets  difflora_standard with kohya's default LierLa set (also the feed-forward and
                     proj_in/out: 84 modules instead of 56 on the toy model), for information.
Each contender runs in its own process (so peak RSS is its own); warm-up steps are excluded and
the median of the remaining step times is reported, with the ratios difflora / reference.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TQDM_DISABLE", "1")

CONTENDERS = ("reference", "difflora_standard", "difflora_addift", "difflora_nocache", "difflora_kohya_targets")


def _peak_memory_gb(device: str) -> float:
    if device == "cuda":
        import torch

        return torch.cuda.max_memory_allocated() / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB -> GiB


def build_sd15_random(folder: Path) -> str:
    """The SD1.5 U-Net, VAE and CLIP text encoder with random weights, saved as a diffusers folder."""
    import torch
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from difflora.models.ldm import clip_tokenizer
    from difflora.models.sd import StableDiffusion
    from difflora.models.tiny import SD15_TE, SD15_UNET, SD_VAE
    from difflora.toy.base_model import SCHEDULER_CONFIG

    torch.manual_seed(0)
    model = StableDiffusion(UNet2DConditionModel(**SD15_UNET), AutoencoderKL(**SD_VAE),
                            CLIPTextModel(CLIPTextConfig(**SD15_TE)), clip_tokenizer("sd1"), dict(SCHEDULER_CONFIG),
                            variant="sd1", prediction_type="epsilon")
    model.save(folder / "sd15")
    return str(folder / "sd15")


def _make_data(root: Path, n: int, size: int) -> tuple[Path, Path]:
    from PIL import Image

    from difflora.toy import faces

    images = root / "images" / "1_face"
    pairs = root / "pairs"
    images.mkdir(parents=True, exist_ok=True)
    pairs.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for i in range(n):
        a = faces.sample_attributes(rng, held_out=None)
        img = Image.fromarray(faces.render(a, i)).resize((size, size), Image.BICUBIC)
        img.save(images / f"{i:03d}.png")
        (images / f"{i:03d}.txt").write_text(faces.caption(a))
        ab, aa, x, y = faces.make_pair(i, "eyes", "open", "closed")
        Image.fromarray(x).resize((size, size), Image.BICUBIC).save(pairs / f"{i:03d}.png")
        Image.fromarray(y).resize((size, size), Image.BICUBIC).save(pairs / f"{i:03d}_after.png")
        (pairs / f"{i:03d}.txt").write_text(faces.caption(ab))
        (pairs / f"{i:03d}_after.txt").write_text(faces.caption(aa))
    return images.parent, pairs


# ------------------------------------------------------------------ the reference loop
def reference_worker(args, data: Path) -> list[float]:
    """diffusers' train_text_to_image_lora.py training step, without torchvision (PIL transforms)."""
    import torch
    import torch.nn.functional as F
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from diffusers.optimization import get_scheduler
    from peft import LoraConfig
    from PIL import Image
    from transformers import CLIPTextModel, CLIPTokenizer

    torch.manual_seed(0)
    device = torch.device(args.device)
    weight_dtype = torch.bfloat16 if args.precision == "bf16" else torch.float32
    path = args.model
    noise_scheduler = DDPMScheduler.from_pretrained(path, subfolder="scheduler", local_files_only=True)
    tokenizer = CLIPTokenizer.from_pretrained(path, subfolder="tokenizer", local_files_only=True)
    text_encoder = CLIPTextModel.from_pretrained(path, subfolder="text_encoder", local_files_only=True)
    vae = AutoencoderKL.from_pretrained(path, subfolder="vae", local_files_only=True)
    unet = UNet2DConditionModel.from_pretrained(path, subfolder="unet", local_files_only=True)
    for m in (unet, vae, text_encoder):
        m.requires_grad_(False)
    unet.to(device, dtype=weight_dtype)
    vae.to(device, dtype=weight_dtype)
    text_encoder.to(device, dtype=weight_dtype)
    unet.add_adapter(LoraConfig(r=args.rank, lora_alpha=args.rank, init_lora_weights="gaussian",
                                target_modules=["to_k", "to_q", "to_v", "to_out.0"]))
    lora_layers = [p for p in unet.parameters() if p.requires_grad]
    for p in lora_layers:  # the script upcasts trainable params to fp32 under mixed precision
        p.data = p.data.float()
    optimizer = torch.optim.AdamW(lora_layers, lr=1e-4, betas=(0.9, 0.999), weight_decay=1e-2, eps=1e-8)
    lr_scheduler = get_scheduler("constant", optimizer=optimizer)
    files = sorted((data / "1_face").glob("*.png"))
    captions = [f.with_suffix(".txt").read_text() for f in files]
    size = args.resolution
    rng = np.random.default_rng(0)

    def transform(img: Image.Image) -> torch.Tensor:  # Resize, CenterCrop, ToTensor, Normalize([0.5], [0.5])
        img = img.convert("RGB").resize((size, size), Image.BILINEAR)
        arr = np.asarray(img, dtype=np.float32) / 255.0
        return (torch.from_numpy(arr).permute(2, 0, 1) - 0.5) / 0.5

    times = []
    unet.train()
    for step in range(args.warmup + args.steps):
        t0 = time.perf_counter()
        idx = rng.integers(0, len(files), size=args.batch)
        pixel_values = torch.stack([transform(Image.open(files[i])) for i in idx]).to(device, dtype=weight_dtype)
        input_ids = tokenizer([captions[i] for i in idx], max_length=tokenizer.model_max_length, padding="max_length",
                              truncation=True, return_tensors="pt").input_ids.to(device)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.precision == "bf16"):
            latents = vae.encode(pixel_values).latent_dist.sample() * vae.config.scaling_factor
            noise = torch.randn_like(latents)
            timesteps = torch.randint(0, noise_scheduler.config.num_train_timesteps, (latents.shape[0],),
                                      device=device).long()
            noisy_latents = noise_scheduler.add_noise(latents, noise, timesteps)
            encoder_hidden_states = text_encoder(input_ids, return_dict=False)[0]
            target = noise
            model_pred = unet(noisy_latents, timesteps, encoder_hidden_states, return_dict=False)[0]
            loss = F.mse_loss(model_pred.float(), target.float(), reduction="mean")
        loss.backward()
        torch.nn.utils.clip_grad_norm_(lora_layers, 1.0)
        optimizer.step()
        lr_scheduler.step()
        optimizer.zero_grad()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return times[args.warmup:]


# ------------------------------------------------------------------ difflora
REFERENCE_TARGETS = ["attn1_to_", "attn2_to_"]  # to_q, to_k, to_v, to_out_0: what the reference script trains


def difflora_worker(args, images: Path, pairs: Path, method: str, out: Path, cache: bool = True,
                    kohya_targets: bool = False) -> list[float]:
    from difflora.config import JobConfig, apply_method_defaults
    from difflora.train.loop import train

    job = {"model": args.model, "method": method, "resolution": args.resolution, "train_batch_size": args.batch,
           "network_dim": args.rank, "network_alpha": args.rank, "learning_rate": 1e-4, "lr_scheduler": "constant",
           "max_train_steps": args.warmup + args.steps, "max_grad_norm": 1.0, "min_snr_gamma": None,
           "mixed_precision": "bf16" if args.precision == "bf16" else "no", "output_dir": str(out),
           "output_name": method, "log_with": "none", "overwrite": True, "network_train_unet_only": True,
           "cache_latents": cache, "network_only_if_contains": [] if kohya_targets else REFERENCE_TARGETS}
    if method == "standard":
        job["train_data_dir"] = str(images)
    else:
        job["datasets"] = [{"subsets": [{"image_dir": str(pairs), "caption_extension": ".txt"}]}]
    times: list[float] = []
    train(apply_method_defaults(JobConfig.model_validate(job)), on_step=lambda stage, step, s: times.append(s))
    return times[args.warmup:]


def unet_train_flops(args) -> float:
    """FLOPs of one U-Net forward + backward at the bench's batch and resolution (torch.utils.flop_counter)."""
    import torch
    from diffusers import UNet2DConditionModel
    from torch.utils.flop_counter import FlopCounterMode

    unet = UNet2DConditionModel.from_pretrained(args.model, subfolder="unet", local_files_only=True)
    unet.requires_grad_(False)
    cfg = unet.config
    lat = args.resolution // 2 ** (len(_vae_channels(args.model)) - 1)
    x = torch.randn(args.batch, cfg.in_channels, lat, lat, requires_grad=True)
    t = torch.randint(0, 1000, (args.batch,))
    c = torch.randn(args.batch, 77, cfg.cross_attention_dim)
    with FlopCounterMode(display=False) as counter:
        unet(x, t, c).sample.sum().backward()
    return float(counter.get_total_flops())


def _vae_channels(model: str) -> list:
    return json.loads((Path(model) / "vae" / "config.json").read_text())["block_out_channels"]


# Dense bf16 peak of the accelerators a benchmark may run on (TFLOP/s), for MFU.
PEAK_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0, "L40S": 362.0, "RTX 4090": 165.0}


def worker(args) -> None:
    import torch

    torch.set_num_threads(args.threads)
    data = Path(args.data)
    images, pairs = data / "images", data / "pairs"
    if args.worker == "reference":
        times = reference_worker(args, images)
    elif args.worker == "difflora_nocache":
        times = difflora_worker(args, images, pairs, "standard", data / f"out_{args.worker}", cache=False)
    elif args.worker == "difflora_kohya_targets":
        times = difflora_worker(args, images, pairs, "standard", data / f"out_{args.worker}", kohya_targets=True)
    else:
        times = difflora_worker(args, images, pairs, args.worker.split("_", 1)[1], data / f"out_{args.worker}")
    print(json.dumps({"times": times, "peak_gb": _peak_memory_gb(args.device)}))


# ------------------------------------------------------------------ driver
def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="diffusers folder (default: the embedded toy model)")
    ap.add_argument("--arch", choices=["sd15"], default=None,
                    help="build the real SD1.5 architecture with random weights instead of --model (GPU runs)")
    ap.add_argument("--resolution", type=int, default=64)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--repeats", type=int, default=2, help="runs per contender, interleaved")
    ap.add_argument("--precision", choices=["fp32", "bf16"], default="fp32")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=max(1, os.cpu_count() or 1))
    ap.add_argument("--out", default="bench/results/train_speed.json")
    ap.add_argument("--worker", choices=CONTENDERS, help=argparse.SUPPRESS)
    ap.add_argument("--data", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.arch == "sd15" and not args.worker:
        args.model = build_sd15_random(Path(tempfile.mkdtemp(prefix="difflora-sd15-")))
    if args.model is None:
        from difflora.models import default_model_path

        args.model = str(default_model_path())
    if args.worker:
        worker(args)
        return 0

    results: dict[str, dict] = {c: {"times": [], "peak_gb": []} for c in CONTENDERS}
    with tempfile.TemporaryDirectory(prefix="difflora-speed-") as tmp:
        _make_data(Path(tmp), 16, args.resolution)
        base = [sys.executable, __file__, "--model", args.model, "--resolution", str(args.resolution), "--batch",
                str(args.batch), "--rank", str(args.rank), "--steps", str(args.steps), "--warmup", str(args.warmup),
                "--precision", args.precision, "--device", args.device, "--threads", str(args.threads), "--data", tmp]
        env = dict(os.environ, OMP_NUM_THREADS=str(args.threads))
        for r in range(args.repeats):
            for c in CONTENDERS:
                p = subprocess.run(base + ["--worker", c], capture_output=True, text=True, env=env)
                if p.returncode != 0:
                    print(p.stderr[-3000:], file=sys.stderr)
                    return 1
                res = json.loads(p.stdout.strip().splitlines()[-1])
                results[c]["times"] += res["times"]
                results[c]["peak_gb"].append(res["peak_gb"])
                print(f"run {r + 1}/{args.repeats} {c}: median {statistics.median(res['times']) * 1000:.1f} ms/step",
                      file=sys.stderr)
    summary = {c: {"median_step_s": statistics.median(v["times"]), "it_per_s": 1 / statistics.median(v["times"]),
                   "peak_gb": max(v["peak_gb"]), "steps_measured": len(v["times"])} for c, v in results.items()}
    flops = unet_train_flops(args)  # the U-Net forward + backward, which dominates every contender's step
    device_name = "cpu"
    peak = None
    if args.device == "cuda":
        import torch

        device_name = torch.cuda.get_device_name()
        peak = next((v for k, v in PEAK_TFLOPS.items() if k in device_name), None)
    for c, v in summary.items():
        v["unet_tflop_per_s"] = flops / v["median_step_s"] / 1e12
        if peak:
            v["mfu"] = v["unet_tflop_per_s"] / peak
    ref = summary["reference"]["median_step_s"]
    std = summary["difflora_standard"]["median_step_s"]
    ratios = {
        "difflora_standard_time / reference_time": std / ref,
        "difflora_addift_time / reference_time": summary["difflora_addift"]["median_step_s"] / ref,
        "difflora_addift_time / difflora_standard_time": summary["difflora_addift"]["median_step_s"] / std,
        "difflora_standard_peak / reference_peak": summary["difflora_standard"]["peak_gb"] / summary["reference"]["peak_gb"],
        "difflora_standard_time / difflora_nocache_time": std / summary["difflora_nocache"]["median_step_s"],
        "difflora_kohya_targets_time / reference_time": summary["difflora_kohya_targets"]["median_step_s"] / ref,
    }
    print(f"\nmodel {args.model}, {args.resolution}x{args.resolution}, batch {args.batch}, rank {args.rank}, "
          f"{args.precision}, {args.device}, {args.threads} thread(s)")
    print(f"U-Net forward+backward: {flops / 1e9:.2f} GFLOP per step; device {device_name}"
          + (f", dense bf16 peak {peak} TFLOP/s" if peak else ""))
    print(f"{'contender':<20} {'ms/step':>9} {'it/s':>7} {'peak GB':>8} {'U-Net TFLOP/s':>14}" + ("  MFU" if peak else ""))
    for c, s in summary.items():
        print(f"{c:<20} {s['median_step_s'] * 1000:9.1f} {s['it_per_s']:7.2f} {s['peak_gb']:8.2f} "
              f"{s['unet_tflop_per_s']:14.4f}" + (f"  {s['mfu']:.1%}" if peak else ""))
    print()
    for k, v in ratios.items():
        print(f"{k:<46} {v:.2f}")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"settings": {k: v for k, v in vars(args).items() if k not in ("worker", "data")},
                               "device": device_name, "unet_train_gflop": flops / 1e9,
                               "summary": summary, "ratios": ratios}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
