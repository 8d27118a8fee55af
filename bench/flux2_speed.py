"""FLUX.2 training step time and peak memory (`bench/train_speed.py --arch flux2 [--variant ...]`).

    CPU (small):  python bench/train_speed.py --arch flux2 --variant klein-4b --threads 1
    GPU (whole):  python bench/train_speed.py --arch flux2 --variant klein-4b --device cuda
The GPU command is the whole measurement: the variant's real transformer (klein-4B 3072 wide, 5 + 20 blocks;
klein-9B 4096, 8 + 24; dev 6144, 8 + 48) at 1024x1024, batch 1, 512 text tokens, bf16, every contender below,
3 warm-up + 10 timed steps, peak memory of the training steps only. On a CPU the real block layout runs at
128 wide (one head of 128) at 64 px with 32 text tokens. Ratios use wall time on CUDA and CPU time on the CPU.

Weights are random (no download), drawn once per name in sorted order; latents and text embeddings are
random tensors of the cached shapes (both sides cache them).

Contenders, each in its own process, same weights, batch, rank, AdamW lr 1e-4:
  reference          diffusers' examples/dreambooth/train_dreambooth_lora_flux2(_klein).py step: peft LoRA on
                     Flux2Transformer2DModel with its default targets (attn.to_q/k/v, attn.to_out.0,
                     attn.to_qkv_mlp_proj, single attn.to_out), σ uniform over the shifted scheduler sigmas,
                     dev's guidance 1.0, loss on ε - x0;
  difflora_standard  difflora's standard loss (methods/standard.py) on the kohya modules covering the same
                     Linears (img_attn_qkv fused = to_q/k/v, img_attn_proj, linear1, linear2);
  difflora_addift    ADDifT's loss on the same modules;
and on CUDA the low-VRAM settings of difflora_standard: fp8 (fp8_base), fp8_ckpt (+ gradient checkpointing),
fp8_swap (+ blocks_to_swap, musubi's maximum for the variant).
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

# the script's default: image-stream attention, the single blocks' fused projection and, by full name, their out
# projection (a bare "attn.to_out" would also match the double blocks' to_out ModuleList)
REFERENCE_TARGETS = ["to_k", "to_q", "to_v", "to_out.0", "to_qkv_mlp_proj"]
DIFFLORA_TARGETS = ["_img_attn_qkv", "_img_attn_proj", "_linear1", "_linear2"]
FLUX2_CONTENDERS = ("reference", "difflora_standard", "difflora_addift", "fp8", "fp8_ckpt", "fp8_swap")
MAX_SWAP = {"dev": 29, "klein-4b": 13, "klein-9b": 16}  # musubi docs/flux_2.md, with fp8


def _config(args) -> dict:
    from difflora.models.flux2.variants import HEAD_DIM, SIZES

    s = SIZES[args.variant]
    width = args.flux2_width or s.hidden
    return dict(patch_size=1, in_channels=128, out_channels=None, num_layers=s.double, num_single_layers=s.single,
                attention_head_dim=HEAD_DIM, num_attention_heads=width // HEAD_DIM, joint_attention_dim=s.context_dim,
                timestep_guidance_channels=256, mlp_ratio=3.0, axes_dims_rope=[32, 32, 32, 32], rope_theta=2000,
                eps=1e-6, guidance_embeds=s.guidance_embeds)


def _diffusers_transformer(args, device, dtype):
    """diffusers' Flux2Transformer2DModel with random weights, drawn name by name from one seeded generator."""
    import torch
    from diffusers import Flux2Transformer2DModel

    with torch.device("meta"):
        tr = Flux2Transformer2DModel(**_config(args))
    tr.to_empty(device=device)
    draw_on = "cuda" if torch.cuda.is_available() else "cpu"
    g = torch.Generator(device=draw_on).manual_seed(0)
    with torch.no_grad():
        for name, p in sorted(tr.named_parameters()):
            if p.dim() >= 2:
                p.copy_(torch.randn(p.shape, generator=g, device=draw_on) * 0.02)
            else:
                p.fill_(1.0)  # the RMSNorm scales (no biases in FLUX.2)
    return tr.to(dtype)


def _inputs(args, device, dtype):
    import torch

    g = torch.Generator().manual_seed(1)
    lat = args.resolution // 16
    ctx = _config(args)["joint_attention_dim"]
    x0 = torch.randn(args.batch, 128, lat, lat, generator=g).to(device, dtype)
    after = torch.randn(args.batch, 128, lat, lat, generator=g).to(device, dtype)
    txt = torch.randn(args.batch, args.text_tokens, ctx, generator=g).to(device, dtype)
    return x0, after, txt


def reference_step_fn(args, device, dtype):
    import torch
    import torch.nn.functional as F
    from peft import LoraConfig

    from difflora.models.flux2.model import text_ids, token_ids

    tr = _diffusers_transformer(args, device, dtype).requires_grad_(False)
    single_out = [f"single_transformer_blocks.{i}.attn.to_out" for i in range(len(tr.single_transformer_blocks))]
    tr.add_adapter(LoraConfig(r=args.rank, lora_alpha=args.rank, init_lora_weights="gaussian",
                              target_modules=REFERENCE_TARGETS + single_out))
    params = [p for p in tr.parameters() if p.requires_grad]
    for p in params:  # the script keeps trainable LoRA weights in fp32 under bf16 mixed precision
        p.data = p.data.float()
    opt = torch.optim.AdamW(params, lr=1e-4, weight_decay=1e-4)
    x0, _, txt = _inputs(args, device, dtype)
    b, c, h, w = x0.shape
    img, tids = token_ids(b, h, w, 0.0, device), text_ids(b, txt.shape[1], device)
    table = torch.linspace(1, 1 / 1000, 1000)
    table = 3.0 * table / (1 + 2.0 * table)  # the script's FlowMatchEulerDiscreteScheduler(shift=3) sigmas
    guidance = torch.full((b,), 1.0, device=device) if tr.config.guidance_embeds else None

    def step():
        noise = torch.randn_like(x0)
        sig = table[(torch.rand(b) * 1000).long()].to(device, dtype).view(-1, 1, 1, 1)
        noisy = ((1 - sig) * x0 + sig * noise).flatten(2).transpose(1, 2)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=dtype == torch.bfloat16):
            pred = tr(hidden_states=noisy, encoder_hidden_states=txt, timestep=sig.flatten(), img_ids=img,
                      txt_ids=tids, guidance=guidance, return_dict=False)[0]
        loss = F.mse_loss(pred.transpose(1, 2).reshape(b, c, h, w).float(), (noise - x0).float())
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad()

    return step


def difflora_step_fn(args, device, dtype, method: str, fp8=False, ckpt=False, swap=0):
    import torch
    from types import SimpleNamespace

    from difflora.methods.addift import AddiftOptions, addift_loss
    from difflora.methods.base import Batch, StepContext
    from difflora.methods.standard import denoising_loss
    from difflora.models.base import Conditioning
    from difflora.models.flow_matching import FlowMatchOptions
    from difflora.models.flux2 import names
    from difflora.models.flux2.files import build_transformer
    from difflora.models.flux2.low_vram import enable_block_swap
    from difflora.models.flux2.model import Flux2Model, Flux2Options
    from difflora.models.flux2.variants import SIZES
    from difflora.network.lora import LoRANetwork, NetworkSpec

    ref = _diffusers_transformer(args, "cpu" if swap else device, dtype)
    tr = build_transformer(_config(args), names.diffusers_to_fused(ref.state_dict()), dtype)
    del ref
    options = Flux2Options(flow=FlowMatchOptions("sigma", 1.0, 3.0, "raw"))
    model = Flux2Model(tr, None, None, None, SIZES[args.variant], options=options)
    model.freeze()
    if fp8:
        model.store_base_fp8()
    model.transformer.to(device)
    if ckpt or swap:
        model.transformer.enable_gradient_checkpointing()
    if swap:
        model.block_swap = enable_block_swap(model.transformer, swap, torch.device(device))
    net = LoRANetwork.create(model.lora_targets(), NetworkSpec(network_dim=args.rank, network_alpha=args.rank,
                                                               train_text_encoder=False,
                                                               only_if_contains=tuple(DIFFLORA_TARGETS)))
    net.to(device).apply_to()
    net.train()
    opt = torch.optim.AdamW(net.parameters(), lr=1e-4, weight_decay=1e-4)
    x0, after, txt = _inputs(args, device, dtype)
    cond = Conditioning({"txt": txt})
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


def add_flux2_arguments(ap) -> None:
    ap.add_argument("--variant", choices=["klein-4b", "klein-9b", "dev"], default="klein-4b",
                    help="--arch flux2: which FLUX.2 (real block counts; default klein-4b)")
    ap.add_argument("--flux2-contenders", nargs="+", choices=FLUX2_CONTENDERS, default=None,
                    help="--arch flux2: default reference, difflora_standard, difflora_addift (+ fp8 settings on CUDA)")
    ap.add_argument("--flux2-width", type=int, default=None, help="--arch flux2: hidden width (default real on CUDA, "
                                                                  "128 on CPU)")
    ap.add_argument("--text-tokens", type=int, default=None, help="--arch flux2: text length (512 CUDA, 32 CPU)")


def flux2_worker(args) -> int:
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
                                swap=MAX_SWAP[args.variant] if c == "fp8_swap" else 0)
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


def flux2_main(args) -> int:
    import torch

    cuda = args.device.startswith("cuda")
    if args.flux2_width is None and not cuda:
        args.flux2_width = 128
    if args.resolution is None:
        args.resolution = 1024 if cuda else 64
    if args.text_tokens is None:
        args.text_tokens = 512 if cuda else 32
    if args.out == "bench/results/train_speed.json":
        args.out = f"bench/results/train_speed_flux2_{args.variant}.json"
    contenders = args.flux2_contenders or (list(FLUX2_CONTENDERS) if cuda else
                                           ["reference", "difflora_standard", "difflora_addift"])
    base = [sys.executable, str(Path(__file__).with_name("train_speed.py")), "--arch", "flux2", "--variant",
            args.variant, "--device", args.device, "--resolution", str(args.resolution), "--batch", str(args.batch),
            "--rank", str(args.rank), "--steps", str(args.steps), "--warmup", str(args.warmup), "--threads",
            str(args.threads), "--text-tokens", str(args.text_tokens)]
    if args.flux2_width:
        base += ["--flux2-width", str(args.flux2_width)]
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
    key = "median_step_s" if cuda else "median_cpu_s"  # CPU time: contenders run one after another
    ratios = {}
    for num, den in (("difflora_standard", "reference"), ("difflora_addift", "reference"),
                     ("difflora_addift", "difflora_standard")):
        if num in ok and den in ok:
            ratios[f"{num}_time / {den}_time"] = ok[num][key] / ok[den][key]
    report = {"arch": "flux2", "variant": args.variant, "device": args.device,
              "gpu": torch.cuda.get_device_name() if cuda else None, "width": args.flux2_width or "real",
              "resolution": args.resolution, "text_tokens": args.text_tokens, "batch": args.batch, "rank": args.rank,
              "threads": args.threads, "ratios_of": "wall time" if cuda else "CPU time", "summary": results,
              "ratios": ratios}
    from difflora.fileio import write_json_atomic

    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    write_json_atomic(args.out, report)
    for k, v in ratios.items():
        print(f"{k}: {v:.3f}")
    print(f"written {args.out}")
    return 0 if ok else 1
