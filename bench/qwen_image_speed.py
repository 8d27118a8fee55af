"""Qwen-Image training step time and peak memory (`bench/train_speed.py --arch qwen_image`).

    CPU (small):  python bench/train_speed.py --arch qwen_image --threads 1
    GPU (whole):  python bench/train_speed.py --arch qwen_image --device cuda
The GPU command is the whole measurement: the real Qwen-Image transformer (60 blocks, 3072 wide, 20.4 B parameters,
random weights built on the device) at 1024x1024, batch 1, 128 text tokens, 3 warm-up + 10 timed steps of each
contender, peak memory of the training steps only. Anchors printed with it: H100 bf16 with per-layer checkpointing
~1.2 s/step at 41 GiB (diffusers' README_qwen / musubi's table: 42 GB), musubi's fp8 + 16 swapped blocks: 24 GB.
On a CPU the width defaults to 128 (4 heads of 32; the real 60-block layout), 128 px, 32 text tokens; ratios use
CPU time (the contenders run one after another on a shared machine).

Contenders, each in its own process (same weights, batch, rank 16, AdamW lr 1e-4; bf16 on CUDA, fp32 on CPU):
  reference          diffusers' examples/dreambooth/train_dreambooth_lora_qwen_image.py step, written out: peft
                     LoRA on QwenImageTransformer2DModel's attn.to_q/k/v/to_out.0 (its default targets), σ drawn
                     uniformly from the scheduler's sigmas (weighting_scheme "none"), packed latents and img_shapes,
                     loss on ε - x0, grad clipping 1.0;
  difflora_standard  difflora's flow-matching loss (methods/standard.py) on the same 240 modules;
  difflora_addift    ADDifT's loss (methods/addift.py) on them (a frozen pass + a LoRA pass);
and on CUDA the settings of the issue's memory targets with difflora_standard on musubi's 840 modules:
  ckpt (bf16 + per-block checkpointing), fp8 (fp8_base + checkpointing), fp8_swap16 (+ blocks_to_swap 16),
  fp8_swap45 (+ blocks_to_swap 45).
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

REFERENCE_TARGETS = ["to_k", "to_q", "to_v", "to_out.0"]
DIFFLORA_TARGETS = ["_attn_to_q", "_attn_to_k", "_attn_to_v", "_attn_to_out_0"]  # the same Linears
QWEN_CONTENDERS = ("reference", "difflora_standard", "difflora_addift", "ckpt", "fp8", "fp8_swap16", "fp8_swap45")


def _config(args) -> dict:
    heads = args.qwen_width // 128 if args.qwen_width >= 1024 else args.qwen_width // 32
    head_dim = args.qwen_width // heads
    axes = (16, 56, 56) if head_dim == 128 else (head_dim // 8, 7 * head_dim // 16, 7 * head_dim // 16)
    return dict(patch_size=2, in_channels=64, out_channels=16, num_layers=args.qwen_blocks, attention_head_dim=head_dim,
                num_attention_heads=heads, joint_attention_dim=3584 if args.qwen_width == 3072 else args.qwen_width,
                axes_dims_rope=axes)


def _transformer(args, device, dtype):
    """Random weights, identical for every contender (one seeded generator, tensors in name order)."""
    import torch
    from diffusers import QwenImageTransformer2DModel

    from accelerate import init_empty_weights

    with init_empty_weights():  # parameters on meta; the RoPE tables are computed on the CPU
        tr = QwenImageTransformer2DModel(**_config(args))
    tr.to_empty(device=device)
    draw_on = "cuda" if torch.cuda.is_available() else "cpu"
    g = torch.Generator(device=draw_on).manual_seed(0)
    with torch.no_grad():
        for name, p in sorted(tr.named_parameters()):
            if p.dim() >= 2:
                p.copy_(torch.randn(p.shape, generator=g, device=draw_on) * 0.02)
            elif "norm" in name:
                p.fill_(1.0)
            else:
                p.zero_()
    return tr.to(device, dtype).requires_grad_(False)


def _inputs(args, device, dtype):
    import torch

    g = torch.Generator().manual_seed(1)
    lat = args.resolution // 8
    width = _config(args)["joint_attention_dim"]
    x0 = torch.randn(args.batch, 16, lat, lat, generator=g).to(device, dtype)
    after = torch.randn(args.batch, 16, lat, lat, generator=g).to(device, dtype)
    txt = torch.randn(args.batch, args.qwen_tokens, width, generator=g).to(device, dtype)
    return x0, after, txt


def reference_step_fn(args, device, dtype):
    import torch
    import torch.nn.functional as F
    from diffusers import FlowMatchEulerDiscreteScheduler
    from peft import LoraConfig

    from difflora.models.qwen_image.model import pack_latents, unpack_latents
    from difflora.models.qwen_image.tiny import SCHEDULER_CONFIG

    tr = _transformer(args, device, dtype)
    tr.add_adapter(LoraConfig(r=args.rank, lora_alpha=args.rank, init_lora_weights="gaussian",
                              target_modules=REFERENCE_TARGETS))
    if device.type == "cuda":
        tr.enable_gradient_checkpointing()  # the script's --gradient_checkpointing, as its README trains
    params = [p for p in tr.parameters() if p.requires_grad]
    for p in params:
        p.data = p.data.float()
    opt = torch.optim.AdamW(params, lr=1e-4, weight_decay=1e-4)
    sigmas_table = FlowMatchEulerDiscreteScheduler.from_config(SCHEDULER_CONFIG).sigmas
    x0, _, txt = _inputs(args, device, dtype)
    b, _, h, w = x0.shape
    mask = torch.ones(txt.shape[:2], device=device, dtype=torch.long)

    def step():
        noise = torch.randn_like(x0)
        idx = (torch.rand(b) * 1000).long()
        sig = sigmas_table[idx].to(device, dtype).view(-1, 1, 1, 1)
        noisy = (1 - sig) * x0 + sig * noise
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=dtype == torch.bfloat16):
            pred = tr(hidden_states=pack_latents(noisy), encoder_hidden_states=txt, encoder_hidden_states_mask=mask,
                      timestep=sig.flatten(), img_shapes=[[(1, h // 2, w // 2)]] * b, return_dict=False)[0]
        loss = F.mse_loss(unpack_latents(pred, h, w).float(), (noise - x0).float())
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad()

    return step


def difflora_step_fn(args, device, dtype, method: str, fp8=False, ckpt=False, swap=0, musubi_targets=False):
    from types import SimpleNamespace

    import torch

    from difflora.methods.addift import AddiftOptions, addift_loss
    from difflora.methods.base import Batch, StepContext
    from difflora.methods.standard import denoising_loss
    from difflora.models.base import Conditioning
    from difflora.models.qwen_image.model import QwenImageModel
    from difflora.network.lora import LoRANetwork, NetworkSpec

    tr = _transformer(args, device, dtype)
    model = QwenImageModel(tr, None, None, None, None)
    model.freeze()
    if fp8:
        model.store_base_fp8()
    if ckpt or swap:
        model.transformer.enable_gradient_checkpointing()
    if swap:
        model.enable_block_swap(swap, torch.device(device))
        model.to(device)
    net = LoRANetwork.create(model.lora_targets(), NetworkSpec(
        network_dim=args.rank, network_alpha=args.rank, train_text_encoder=False,
        only_if_contains=() if musubi_targets else tuple(DIFFLORA_TARGETS)))
    net.to(device).apply_to()
    net.train()
    opt = torch.optim.AdamW(net.parameters(), lr=1e-4, weight_decay=1e-4)
    x0, after, txt = _inputs(args, device, dtype)
    cond = Conditioning({"txt": txt, "txt_mask": torch.ones(txt.shape[:2], device=device, dtype=torch.long)})
    job = SimpleNamespace(addift=AddiftOptions(captions="empty"), min_snr_gamma=None)
    ctx = StepContext(model, net, job, 0, lambda captions: cond)
    loss_fn = denoising_loss if method == "standard" else addift_loss
    b = x0.shape[0]
    state = {"step": 0}

    def step():
        g = torch.Generator().manual_seed(state["step"])
        noise = torch.randn(x0.shape, generator=g).to(device, dtype)
        t = model.objective.sample_timesteps(b, g, x0.shape[-2:]).to(device)
        if method == "addift":
            t = 500 + torch.rand(b, generator=g).to(device) * 500
        batch = Batch({"x": x0, "after": after}, {"x": [""] * b, "after": [""] * b}, noise, t,
                      torch.ones(b, device=device), step=state["step"])
        ctx.step = state["step"]
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=dtype == torch.bfloat16):
            loss = loss_fn(ctx, batch).mean()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(list(net.parameters()), 1.0)
        opt.step()
        opt.zero_grad()
        state["step"] += 1

    return step


def add_qwen_arguments(ap) -> None:
    ap.add_argument("--qwen-contenders", nargs="+", choices=QWEN_CONTENDERS, default=None,
                    help="--arch qwen_image: default reference, difflora_standard, difflora_addift (+ memory settings "
                         "on CUDA)")
    ap.add_argument("--qwen-blocks", type=int, default=60, help="--arch qwen_image: transformer blocks (default 60)")
    ap.add_argument("--qwen-width", type=int, default=None, help="--arch qwen_image: width (default 3072 CUDA, 128 CPU)")
    ap.add_argument("--qwen-tokens", type=int, default=None, help="--arch qwen_image: text tokens (default 128 CUDA, "
                                                                  "32 CPU)")


def qwen_worker(args) -> int:
    import torch

    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    c = args.worker
    if c == "reference":
        step = reference_step_fn(args, device, dtype)
    elif c in ("difflora_standard", "difflora_addift"):
        step = difflora_step_fn(args, device, dtype, c.split("_", 1)[1], ckpt=device.type == "cuda")
    else:
        swap = {"fp8_swap16": 16, "fp8_swap45": 45}.get(c, 0)
        step = difflora_step_fn(args, device, dtype, "standard", fp8=c.startswith("fp8"), ckpt=True,
                                swap=min(swap, args.qwen_blocks - 1), musubi_targets=True)
    times, cpu_times = [], []
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    for i in range(args.warmup + args.steps):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0, c0 = time.perf_counter(), time.process_time()
        step()
        if device.type == "cuda":
            torch.cuda.synchronize()
        if i >= args.warmup:
            times.append(time.perf_counter() - t0)
            cpu_times.append(time.process_time() - c0)
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated() / 2**30
    else:
        import resource

        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    print(json.dumps({"contender": c, "times": times, "cpu_times": cpu_times, "peak_gb": peak}))
    return 0


def qwen_main(args) -> int:
    import torch

    cuda = args.device.startswith("cuda")
    args.qwen_width = args.qwen_width or (3072 if cuda else 128)
    args.qwen_tokens = args.qwen_tokens or (128 if cuda else 32)
    if args.resolution is None:
        args.resolution = 1024 if cuda else 128
    if args.out == "bench/results/train_speed.json":
        args.out = "bench/results/train_speed_qwen_image.json"
    contenders = args.qwen_contenders or (list(QWEN_CONTENDERS) if cuda else list(QWEN_CONTENDERS[:3]))
    base = [sys.executable, str(Path(__file__).with_name("train_speed.py")), "--arch", "qwen_image",
            "--device", args.device, "--resolution", str(args.resolution), "--batch", str(args.batch),
            "--rank", str(args.rank), "--steps", str(args.steps), "--warmup", str(args.warmup),
            "--threads", str(args.threads), "--qwen-blocks", str(args.qwen_blocks), "--qwen-width",
            str(args.qwen_width), "--qwen-tokens", str(args.qwen_tokens)]
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads), PYTHONPATH=os.pathsep.join(
        [str(Path(__file__).resolve().parents[1] / "src"), os.environ.get("PYTHONPATH", "")]))
    results = {}
    for c in contenders:
        p = subprocess.run(base + ["--worker", c], capture_output=True, text=True, env=env)
        if p.returncode != 0:
            print(f"{c} failed:\n{p.stderr[-3000:]}", file=sys.stderr)
            results[c] = {"error": p.stderr.strip().splitlines()[-1] if p.stderr.strip() else f"exit {p.returncode}"}
            continue
        r = json.loads(p.stdout.strip().splitlines()[-1])
        results[c] = {"median_step_s": statistics.median(r["times"]), "median_cpu_s": statistics.median(r["cpu_times"]),
                      "peak_gb": r["peak_gb"], "steps": len(r["times"])}
        print(f"{c}: {results[c]['median_step_s']:.3f} s/step ({results[c]['median_cpu_s']:.3f} s CPU), "
              f"peak {results[c]['peak_gb']:.2f} GB", file=sys.stderr)
    ok = {c: r for c, r in results.items() if "error" not in r}
    key = "median_step_s" if cuda else "median_cpu_s"
    ratios = {f"{n}_time / {d}_time": ok[n][key] / ok[d][key]
              for n, d in (("difflora_standard", "reference"), ("difflora_addift", "reference"),
                           ("difflora_addift", "difflora_standard")) if n in ok and d in ok}
    report = {"arch": "qwen_image", "device": args.device, "gpu": torch.cuda.get_device_name() if cuda else None,
              "blocks": args.qwen_blocks, "width": args.qwen_width, "text_tokens": args.qwen_tokens,
              "resolution": args.resolution, "batch": args.batch, "rank": args.rank, "threads": args.threads,
              "ratios_of": "wall time" if cuda else "CPU time", "summary": results, "ratios": ratios}
    from difflora.fileio import write_json_atomic

    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    write_json_atomic(args.out, report)
    for k, v in ratios.items():
        print(f"{k}: {v:.3f}")
    if cuda:
        print("anchors: H100 bf16 + per-layer checkpointing ~1.2 s/step at 41 GiB; fp8 + 16 swapped blocks: 24 GB "
              "(musubi); fp8 + 45 swapped: 12 GB")
        for c in ("ckpt", "fp8", "fp8_swap16", "fp8_swap45"):
            if c in ok:
                print(f"  {c}: {ok[c]['median_step_s']:.2f} s/step, peak {ok[c]['peak_gb']:.1f} GiB")
    print(f"written {args.out}")
    return 0 if ok else 1
