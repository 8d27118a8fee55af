"""Z-Image LoRA training step time and peak memory (`bench/train_speed.py --arch zimage`).

    CPU (small):  python bench/train_speed.py --arch zimage --threads 1
    GPU (whole):  python bench/train_speed.py --arch zimage --device cuda
The GPU command is the whole measurement: the real Z-Image transformer (3840 wide, 30 layers + 2 + 2
refiners, random weights built on the meta device, no download) at 1024x1024, batch 1, bf16, rank 16;
3 warm-up + 10 timed steps per contender, each in its own process (its own peak memory). Anchor: SimpleTuner
reports ~0.24 s/step at 21 GiB for Turbo bf16 on an H100. On a CPU: the real layer layout 32 wide, 64 px
(`--zimage-width`), timed by process CPU time (a shared CPU's load stays out of it).

Contenders (same weights, batch, rank 16 alpha 16, AdamW lr 1e-4, latents and caption features random
tensors of the cached shapes, as both sides cache them):
  reference          diffusers' Z-Image LoRA step (examples/dreambooth/train_dreambooth_lora_z_image.py's
                     loop): peft LoRA on the 30 layers' attention.to_q/k/v/to_out.0 and feed_forward.w1/w2/w3,
                     noisy = (1-σ)x + σε, the transformer at 1-σ, loss on its output against x0 - ε;
  difflora_standard  difflora's standard loss (methods/standard.py) on the same Linears (qkv fused);
  difflora_addift    ADDifT's loss (a frozen pass and a LoRA pass);
  fp8, fp8_swap      (CUDA) difflora_standard with fp8_base, and with blocks_to_swap 20 + checkpointing.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

CONTENDERS = ("reference", "difflora_standard", "difflora_addift", "fp8", "fp8_swap")
REAL = dict(dim=3840, n_layers=30, n_refiner_layers=2, n_heads=30, n_kv_heads=30, cap_feat_dim=2560, in_channels=16,
            axes_dims=[32, 48, 48], axes_lens=[1536, 512, 512])


def add_zimage_arguments(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("--zimage-width", type=int, default=None, help="transformer width (default 32 on CPU, the "
                    "real 3840 on CUDA); the layers, refiners and names stay the real ones")
    ap.add_argument("--caption-tokens", type=int, default=None, help="caption tokens (default 32 CPU, 128 CUDA)")
    ap.add_argument("--zimage-contenders", nargs="+", default=None, choices=CONTENDERS)


def _transformer(width: int, device, dtype):
    import torch
    from diffusers import ZImageTransformer2DModel

    cfg = dict(REAL) if width == 3840 else dict(REAL, dim=width, n_heads=2, n_kv_heads=2, cap_feat_dim=16,
                                                axes_dims=[4, 6, 6] if width == 32 else [width // 8, width // 8 * 3 // 2, width // 8 * 3 // 2])
    with torch.device("meta"):
        tr = ZImageTransformer2DModel(**cfg)
    tr.to_empty(device=device)
    g = torch.Generator(device=device).manual_seed(0)
    with torch.no_grad():
        for _, p in sorted(tr.named_parameters()):
            p.copy_(torch.randn(p.shape, generator=g, device=device, dtype=torch.float32) * 0.02)
    return tr.to(dtype).eval().requires_grad_(False)


def worker(args) -> None:
    import torch

    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    cuda = device.type == "cuda"
    dtype = torch.bfloat16 if cuda else torch.float32
    tr = _transformer(args.zimage_width, device, dtype)
    lat = args.resolution // 8
    g = torch.Generator().manual_seed(1)
    x0 = torch.randn(args.batch, 16, lat, lat, generator=g).to(device)
    cap_dim = tr.config.cap_feat_dim
    caps = torch.randn(args.batch, args.caption_tokens, cap_dim, generator=g).to(device, dtype)
    c = args.contender
    if c == "reference":
        from peft import LoraConfig

        tr.add_adapter(LoraConfig(r=args.rank, lora_alpha=args.rank, init_lora_weights="gaussian",
                                  target_modules=r"layers\.\d+\.(attention\.(to_q|to_k|to_v|to_out\.0)|feed_forward\.w[123])"))
        params = [p for p in tr.parameters() if p.requires_grad]
        for p in params:
            p.data = p.data.float()
        opt = torch.optim.AdamW(params, lr=1e-4)

        def step(i):
            gi = torch.Generator().manual_seed(100 + i)
            eps = torch.randn(x0.shape, generator=gi).to(device)
            sigma = torch.rand(args.batch, generator=gi).to(device)
            noisy = (1 - sigma.view(-1, 1, 1, 1)) * x0 + sigma.view(-1, 1, 1, 1) * eps
            with torch.autocast(device.type, dtype=dtype, enabled=cuda):
                out = tr(list(noisy.to(dtype).unsqueeze(2).unbind(0)), 1 - sigma, list(caps.unbind(0)), return_dict=False)[0]
            pred = torch.stack(out).squeeze(2).float()
            loss = torch.nn.functional.mse_loss(pred, x0 - eps)
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
    else:
        from difflora.config import JobConfig
        from difflora.methods.addift import addift_loss
        from difflora.methods.base import Batch, StepContext
        from difflora.methods.standard import denoising_loss
        from difflora.models.base import Conditioning
        from difflora.models.zimage.model import ZImageModel
        from difflora.models.zimage.transformer import fuse_attention
        from difflora.network.lora import LoRANetwork, NetworkSpec

        fuse_attention(tr)
        model = ZImageModel(tr, None, None, None, variant="turbo", source="bench")
        if c.startswith("fp8"):
            model.store_base_fp8()
        if c == "fp8_swap":
            tr.enable_gradient_checkpointing()
            model.enable_block_swap(20, device)
            model.to(device)
        net = LoRANetwork.create(model.lora_targets(), NetworkSpec(network_dim=args.rank, network_alpha=args.rank))
        net.to(device)
        net.apply_to()
        opt = torch.optim.AdamW(net.parameters(), lr=1e-4)
        mask = torch.ones(args.batch, args.caption_tokens, dtype=torch.bool, device=device)
        cond = Conditioning({"cap": caps, "cap_mask": mask})
        method = "addift" if c == "difflora_addift" else "standard"
        job = JobConfig.model_validate({"method": method, "output_dir": "unused",
                                        "datasets": [{"subsets": [{"image_dir": "unused"}]}]})
        loss_fn = addift_loss if method == "addift" else denoising_loss

        def step(i):
            gi = torch.Generator().manual_seed(100 + i)
            eps = torch.randn(x0.shape, generator=gi).to(device)
            t = model.objective.sample_timesteps(args.batch, gi, (lat, lat)).to(device)
            latents = {"x": x0, "after": x0 + 0.1} if method == "addift" else {"x": x0}
            batch = Batch(latents, {k: ["p"] * args.batch for k in latents}, eps, t, torch.ones(args.batch), step=i)
            ctx = StepContext(model, net, job, i, lambda prompts: cond[: len(prompts)])
            loss = loss_fn(ctx, batch).mean()
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)

    for i in range(args.warmup):
        step(i)
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    times, cpu = [], []
    for i in range(args.steps):
        w, p = time.perf_counter(), time.process_time()
        step(args.warmup + i)
        if cuda:
            torch.cuda.synchronize()
        times.append(time.perf_counter() - w)
        cpu.append(time.process_time() - p)
    peak = torch.cuda.max_memory_allocated() / 2**30 if cuda else 0.0
    print(json.dumps({"times": times, "cpu_times": cpu, "peak_gib": peak}))


def zimage_main(args) -> int:
    cuda = args.device.startswith("cuda")
    args.zimage_width = args.zimage_width or (3840 if cuda else 32)
    args.resolution = args.resolution or (1024 if cuda else 64)
    args.caption_tokens = args.caption_tokens or (128 if cuda else 32)
    if args.out == "bench/results/train_speed.json":
        args.out = "bench/results/train_speed_zimage.json"
    contenders = args.zimage_contenders or (list(CONTENDERS) if cuda else list(CONTENDERS[:3]))
    base = [sys.executable, str(Path(__file__).with_name("train_speed.py")), "--arch", "zimage", "--device", args.device,
            "--resolution", str(args.resolution), "--batch", str(args.batch), "--rank", str(args.rank),
            "--steps", str(args.steps), "--warmup", str(args.warmup), "--threads", str(args.threads),
            "--zimage-width", str(args.zimage_width), "--caption-tokens", str(args.caption_tokens)]
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads), PYTHONPATH=os.pathsep.join(
        [str(Path(__file__).resolve().parents[1] / "src"), os.environ.get("PYTHONPATH", "")]))
    results = {}
    for c in contenders:
        p = subprocess.run(base + ["--worker", c], capture_output=True, text=True, env=env)
        if p.returncode != 0:
            print(f"{c} failed:\n{p.stderr[-3000:]}", file=sys.stderr)
            results[c] = {"error": (p.stderr.strip().splitlines() or [f"exit {p.returncode}"])[-1]}
            continue
        r = json.loads(p.stdout.strip().splitlines()[-1])
        results[c] = {"median_step_s": statistics.median(r["times"]), "median_cpu_s": statistics.median(r["cpu_times"]),
                      "peak_gib": r["peak_gib"]}
    key = "median_step_s" if cuda else "median_cpu_s"
    print(f"\nZ-Image transformer {args.zimage_width} wide (30 layers + 2 + 2 refiners), {args.resolution}px, batch "
          f"{args.batch}, rank {args.rank}, {args.caption_tokens} caption tokens, {args.device}, "
          f"{'wall' if cuda else 'CPU'} time per step (median of {args.steps}):")
    ref = results.get("reference", {}).get(key)
    for c, r in results.items():
        if "error" in r:
            print(f"  {c:18s} failed: {r['error']}")
            continue
        ratio = f"  {r[key] / ref:.2f}x reference" if ref else ""
        mem = f"  peak {r['peak_gib']:.1f} GiB" if cuda else ""
        print(f"  {c:18s} {r[key]:.4f} s{ratio}{mem}")
    if cuda and args.zimage_width == 3840:
        print("  anchor: SimpleTuner, Z-Image Turbo bf16 on an H100: ~0.24 s/step at 21 GiB")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"args": {k: v for k, v in vars(args).items() if k != "func"},
                                          "results": results}, indent=1))
    return 0
