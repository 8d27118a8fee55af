"""FLUX.1-dev training step time and peak memory (`bench/train_speed.py --arch flux`).

    CPU (small):  python bench/train_speed.py --arch flux --threads 1
    GPU (whole):  python bench/train_speed.py --arch flux --device cuda
The GPU command is the whole measurement in one go: FLUX.1-dev at 1024x1024, batch 1, every contender
below (bf16, fp8_base, fp8_base + checkpointing, fp8_base + blocks_to_swap), 3 warm-up + 10 timed steps,
peak memory of the training steps only (reset after set-up). Ratios use wall time on CUDA and CPU time
(process time) on the CPU: contenders run one after another, so a shared CPU's load would enter wall times.

The real FLUX.1-dev transformer (3072 wide, 24 heads, 19 double + 38 single blocks) is built on
the meta device and materialised on the target device with random weights (no download). On a
CPU the block counts default to 1 + 1 (the real blocks, fewer of them) and the size to 128 px
with 64 T5 tokens; on CUDA to the whole model at 1024 px with 512 tokens. Latents and text
embeddings are random tensors of the cached shapes (both sides cache them).

Contenders, each in its own process (so peak memory is its own), same weights, batch, rank,
optimizer (AdamW, lr 1e-4), bf16 on CUDA / fp32 on CPU:
  reference         diffusers' examples/dreambooth/train_dreambooth_lora_flux.py step: peft LoRA on
                    FluxTransformer2DModel's attn.to_q/k/v/out.0, add_q/k/v_proj, to_add_out, ff.net.*,
                    ff_context.net.* (its default targets), uniform σ, guidance 3.5, loss on ε - x0;
  difflora_standard difflora's standard flow-matching loss (methods/standard.py) on kohya's modules that
                    cover the same Linears (img/txt attn qkv + proj, img/txt mlp, single linear1);
  difflora_addift   ADDifT's loss (methods/addift.py) on the same modules (a frozen pass + a LoRA pass);
and the low-VRAM settings of difflora_standard (CUDA): fp8 (fp8_base), fp8_ckpt (+ gradient
checkpointing), fp8_swap (+ blocks_to_swap 20 + checkpointing).
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

REFERENCE_TARGETS = ["attn.to_k", "attn.to_q", "attn.to_v", "attn.to_out.0", "attn.add_k_proj", "attn.add_q_proj",
                     "attn.add_v_proj", "attn.to_add_out", "ff.net.0.proj", "ff.net.2", "ff_context.net.0.proj",
                     "ff_context.net.2"]
DIFFLORA_TARGETS = ["_attn_qkv", "_attn_proj", "_mlp_", "_linear1"]
FLUX_CONTENDERS = ("reference", "difflora_standard", "difflora_addift", "fp8", "fp8_ckpt", "fp8_swap")


def _params(args):
    from difflora.models.flux.transformer import FLUX_DEV, FluxParams

    d = FLUX_DEV.to_dict()
    d.update(depth=args.flux_double, depth_single_blocks=args.flux_single)
    return FluxParams(**d)


def _materialise(module, device, seed: int = 0):
    """Random weights, identical for every contender: drawn tensor by tensor in name order from one seeded
    generator, on CUDA when there is one (12 billion CPU draws would take minutes per contender)."""
    import torch

    module.to_empty(device=device)
    draw_on = "cuda" if torch.cuda.is_available() else "cpu"
    g = torch.Generator(device=draw_on).manual_seed(seed)
    with torch.no_grad():
        for name, p in sorted(module.named_parameters()):
            if p.dim() >= 2:
                p.copy_((torch.randn(p.shape, generator=g, device=draw_on) * 0.02).to(p.dtype))
            elif name.endswith(("scale", "norm_q.weight", "norm_k.weight", "norm_added_q.weight", "norm_added_k.weight")):
                p.fill_(1.0)
            else:
                p.zero_()
    return module


def _inputs(args, device, dtype):
    import torch

    g = torch.Generator().manual_seed(1)
    lat = args.resolution // 8
    x0 = torch.randn(args.batch, 16, lat, lat, generator=g).to(device, dtype)
    after = torch.randn(args.batch, 16, lat, lat, generator=g).to(device, dtype)
    t5 = torch.randn(args.batch, args.t5_tokens, 4096, generator=g).to(device, dtype)
    pooled = torch.randn(args.batch, 768, generator=g).to(device, dtype)
    return x0, after, t5, pooled


def _bfl_transformer(args, device, dtype):
    import torch

    from difflora.models.flux.transformer import FluxTransformer

    with torch.device("meta"):
        tr = FluxTransformer(_params(args))
    return _materialise(tr.to(dtype), device)


def reference_step_fn(args, device, dtype):
    import torch
    import torch.nn.functional as F
    from diffusers import FluxTransformer2DModel
    from peft import LoraConfig

    from difflora.models.flux.model import image_ids, pack_latents, unpack_latents
    from difflora.models.flux.convert import bfl_to_diffusers, diffusers_config_from_params

    cfg = diffusers_config_from_params(_params(args))
    cfg.pop("_class_name")
    with torch.device("meta"):
        tr = FluxTransformer2DModel(**cfg)
    tr.to_empty(device=device)
    tr.load_state_dict(bfl_to_diffusers(_bfl_transformer(args, "cpu", dtype).state_dict(), _params(args)))
    tr.to(device, dtype).requires_grad_(False)
    tr.add_adapter(LoraConfig(r=args.rank, lora_alpha=args.rank, init_lora_weights="gaussian",
                              target_modules=REFERENCE_TARGETS))
    params = [p for p in tr.parameters() if p.requires_grad]
    for p in params:  # the script keeps trainable LoRA weights in fp32 under bf16 mixed precision
        p.data = p.data.float()
    opt = torch.optim.AdamW(params, lr=1e-4, weight_decay=1e-4)
    x0, _, t5, pooled = _inputs(args, device, dtype)
    b, _, h, w = x0.shape
    img_ids = image_ids(1, h, w, device)[0]
    txt_ids = torch.zeros(t5.shape[1], 3, device=device)
    sigmas_table = torch.linspace(1, 1 / 1000, 1000)
    shift = 3.0
    sigmas_table = shift * sigmas_table / (1 + (shift - 1) * sigmas_table)
    guidance = torch.full((b,), 3.5, device=device)

    def step():
        noise = torch.randn_like(x0)
        idx = (torch.rand(b) * 1000).long()  # weighting_scheme "none": uniform u
        sig = sigmas_table[idx].to(device, dtype).view(-1, 1, 1, 1)
        noisy = (1 - sig) * x0 + sig * noise
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=dtype == torch.bfloat16):
            pred = tr(pack_latents(noisy), t5, pooled, sig.flatten(), img_ids, txt_ids, guidance,
                      return_dict=False)[0]
        loss = F.mse_loss(unpack_latents(pred, h, w).float(), (noise - x0).float())
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad()

    return step


def difflora_step_fn(args, device, dtype, method: str, fp8=False, ckpt=False, swap=0):
    import torch
    from types import SimpleNamespace

    from difflora.methods.addift import AddiftOptions
    from difflora.methods.addift import addift_loss
    from difflora.methods.base import Batch, StepContext
    from difflora.methods.standard import denoising_loss
    from difflora.models.base import Conditioning
    from difflora.models.flow_matching import FlowMatchOptions
    from difflora.models.flux.model import FluxModel, FluxOptions
    from difflora.models.low_vram import enable_block_swap
    from difflora.network.lora import LoRANetwork, NetworkSpec

    tr = _bfl_transformer(args, "cpu" if swap else device, dtype)
    options = FluxOptions(flow=FlowMatchOptions(timestep_sampling="sigma", model_prediction_type="raw"))
    model = FluxModel(tr, None, None, None, None, None, options=options)
    model.freeze()
    if fp8:
        model.store_base_fp8()
    if swap:
        model.transformer.to(device)  # then the swapped blocks go back to the CPU
    if ckpt or swap:
        model.enable_gradient_checkpointing()
    if swap:
        enable_block_swap(model.transformer, swap, torch.device(device))
    net = LoRANetwork.create(model.lora_targets(), NetworkSpec(network_dim=args.rank, network_alpha=args.rank,
                                                               train_text_encoder=False,
                                                               only_if_contains=tuple(DIFFLORA_TARGETS)))
    net.to(device).apply_to()
    net.train()
    opt = torch.optim.AdamW(net.parameters(), lr=1e-4, weight_decay=1e-4)
    x0, after, t5, pooled = _inputs(args, device, dtype)
    cond = Conditioning({"pooled": pooled, "t5": t5, "t5_mask": torch.ones(t5.shape[:2], device=device)})
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
        batch = Batch({"x": x0, "after": after}, {"x": [""] * b, "after": [""] * b}, noise, t, torch.ones(b, device=device),
                      step=state["step"])
        ctx.step = state["step"]
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=dtype == torch.bfloat16):
            loss = loss_fn(ctx, batch).mean()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(list(net.parameters()), 1.0)
        opt.step()
        opt.zero_grad()
        state["step"] += 1

    return step


def add_flux_arguments(ap) -> None:
    ap.add_argument("--flux-contenders", nargs="+", choices=FLUX_CONTENDERS, default=None,
                    help="--arch flux: default reference, difflora_standard, difflora_addift (+ fp8 settings on CUDA)")
    ap.add_argument("--flux-double", type=int, default=None, help="--arch flux: double blocks (default 19 CUDA, 1 CPU)")
    ap.add_argument("--flux-single", type=int, default=None, help="--arch flux: single blocks (default 38 CUDA, 1 CPU)")
    ap.add_argument("--t5-tokens", type=int, default=None, help="--arch flux: T5 length (default 512 CUDA, 64 CPU)")


def flux_worker(args) -> int:
    import torch

    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    c = args.worker
    if c == "reference":
        step = reference_step_fn(args, device, dtype)
    elif c in ("difflora_standard", "difflora_addift"):
        step = difflora_step_fn(args, device, dtype, c.split("_", 1)[1])
    else:
        step = difflora_step_fn(args, device, dtype, "standard", fp8=True, ckpt=c in ("fp8_ckpt", "fp8_swap"),
                                swap=min(20, args.flux_double + args.flux_single - 1) if c == "fp8_swap" else 0)
    times, cpu_times = [], []
    if device.type == "cuda":  # the training peak, not the set-up's (fp8: the bf16 weights before conversion)
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


def flux_main(args) -> int:
    import torch

    cuda = args.device.startswith("cuda")
    if args.flux_double is None:
        args.flux_double, args.flux_single = (19, 38) if cuda else (1, 1)
    if args.resolution is None:
        args.resolution = 1024 if cuda else 128
    if args.t5_tokens is None:
        args.t5_tokens = 512 if cuda else 64
    if args.out == "bench/results/train_speed.json":
        args.out = "bench/results/train_speed_flux.json"
    contenders = args.flux_contenders or (list(FLUX_CONTENDERS) if cuda else ["reference", "difflora_standard", "difflora_addift"])
    if not cuda and any(c.startswith("fp8") for c in contenders):
        print("note: fp8 settings run on CPU too, but their memory numbers only mean something on CUDA", file=sys.stderr)
    results = {}
    base = [sys.executable, str(Path(__file__).with_name("train_speed.py")), "--arch", "flux", "--device", args.device,
            "--resolution", str(args.resolution), "--batch", str(args.batch), "--rank", str(args.rank),
            "--steps", str(args.steps), "--warmup", str(args.warmup), "--threads", str(args.threads),
            "--flux-double", str(args.flux_double), "--flux-single", str(args.flux_single),
            "--t5-tokens", str(args.t5_tokens)]
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads), PYTHONPATH=os.pathsep.join(
        [str(Path(__file__).resolve().parents[1] / "src"), os.environ.get("PYTHONPATH", "")]))
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
    # The contenders run one after another, so on a shared CPU their wall times also measure the neighbours'
    # load; CPU time (process time) does not, and is what the CPU ratios use. On CUDA: wall time.
    key = "median_step_s" if cuda else "median_cpu_s"
    ratios = {}
    for num, den in (("difflora_standard", "reference"), ("difflora_addift", "reference"),
                     ("difflora_addift", "difflora_standard")):
        if num in ok and den in ok:
            ratios[f"{num}_time / {den}_time"] = ok[num][key] / ok[den][key]
    report = {"arch": "flux", "device": args.device, "gpu": torch.cuda.get_device_name() if cuda else None,
              "double_blocks": args.flux_double, "single_blocks": args.flux_single, "resolution": args.resolution,
              "t5_tokens": args.t5_tokens, "batch": args.batch, "rank": args.rank, "threads": args.threads,
              "ratios_of": "wall time" if cuda else "CPU time", "summary": results, "ratios": ratios}
    from difflora.fileio import write_json_atomic

    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    write_json_atomic(args.out, report)
    for k, v in ratios.items():
        print(f"{k}: {v:.3f}")
    if cuda and "fp8_ckpt" in ok:  # the target: fp8_base + cached text encoders + checkpointing, batch 1
        peak = ok["fp8_ckpt"]["peak_gb"]
        print(f"FLUX target fp8_ckpt peak <= 24 GB at batch {args.batch}: {peak:.1f} GB, "
              f"{'met' if peak <= 24 else 'MISSED'}")
    print(f"written {args.out}")
    return 0 if ok else 1
