"""`difflora generate`: txt2img with any number of LoRAs and multipliers, or a sweep grid."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from .. import validate
from ..errors import UserError

log = logging.getLogger(__name__)


def parse_lora_arg(text: str) -> tuple[str, float]:
    """'file.safetensors:0.8' -> (path, 0.8); a bare path means multiplier 1."""
    path, sep, mult = text.rpartition(":")
    if sep and path:
        try:
            return path, float(mult)
        except ValueError:
            pass
    return text, 1.0


def parse_sweep(text: str) -> list[float]:
    try:
        values = [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise UserError(f"--sweep takes comma-separated numbers, got {text!r}") from None
    if not values:
        raise UserError("--sweep needs at least one multiplier")
    for v in values:
        validate.finite(v, "--sweep multiplier")
    return values


def check_args(args) -> None:
    """Every option, before the model is loaded."""
    validate.at_least(args.steps, 1, "--steps")
    validate.at_least(args.n_images, 1, "--n-images")
    validate.seed(args.seed)
    validate.seed(args.seed + args.n_images - 1, "--seed + --n-images - 1")
    if args.cfg is not None:
        validate.finite(args.cfg, "--cfg")
    validate.image_size(args.width, "--width")
    validate.image_size(args.height, "--height")
    if args.sampler is not None:
        validate.sampler(args.sampler)
    if args.clip_skip is not None:
        validate.at_least(args.clip_skip, 1, "--clip-skip")
    validate.output_folder(args.out, "--out")


def add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=None, help="diffusers folder or .safetensors checkpoint (default: the embedded toy model)")
    p.add_argument("--allow-pickle", action="store_true", help="allow loading .ckpt/.pt pickle files (weights_only)")
    p.add_argument("--v-parameterization", action="store_true", help="the model predicts v (SD2 768-v)")
    p.add_argument("--clip-skip", type=int, default=None, help="use the n-th text encoder layer from the end (kohya)")
    from ..models.registry import FAMILIES

    meanings: dict[str, list[str]] = {}
    for plugin in FAMILIES:
        for key, text in plugin.generate_file_keys.items():
            meanings.setdefault(key, []).append(f"{plugin.title}: {text}")
    if meanings:
        group = p.add_argument_group("companion files of a single-file transformer (kohya's / musubi's names)")
        for key, texts in meanings.items():
            group.add_argument(_flag(key), dest=key, default=None, help="; ".join(texts))
    variants = {v: f"{meaning} ({plugin.title})" for plugin in FAMILIES for v, meaning in plugin.model_variants.items()}
    if variants:
        p.add_argument("--model-variant", choices=list(variants), default=None,
                       help="which model the weights are, where the files cannot tell: "
                            + ", ".join(f"{v}: {m}" for v, m in variants.items()) + " (default: what the files say)")
    for plugin in FAMILIES:
        plugin.add_generate_arguments(p)


def _flag(key: str) -> str:
    return "--" + key.replace("_", "-")


def load_model_from_args(args):
    from ..models import load_model
    from ..models.registry import FAMILIES

    given = vars(args)
    options = {k: given[k] for plugin in FAMILIES for k in plugin.generate_file_keys if given.get(k) is not None}
    options.update({k: v for plugin in FAMILIES for k, v in plugin.generate_options(args).items()})
    if given.get("model_variant") is not None:
        options["model_variant"] = given["model_variant"]
    model = load_model(args.model, allow_pickle=args.allow_pickle,
                       prediction_type="v_prediction" if args.v_parameterization else None, clip_skip=args.clip_skip,
                       options=options, key_label=_flag)
    model.check_complete()  # before any output folder exists
    return model


def register(sub) -> None:
    p = sub.add_parser("generate", help="generate images with LoRAs at chosen multipliers",
                       description="Text-to-image with a base model and LoRAs. PNGs carry their parameters. "
                                   "--sweep -1,0,1 writes one grid over the multipliers of the last --lora.")
    add_model_args(p)
    p.add_argument("--prompt", action="append", default=[], help="prompt (repeatable)")
    p.add_argument("--from-file", default=None, help="prompt file in kohya syntax (--n --w --h --d --l --s --ss)")
    p.add_argument("--negative", default="", help="negative prompt")
    p.add_argument("--lora", action="append", default=[], metavar="FILE[:MULT]", help="LoRA and multiplier, e.g. a.safetensors:0.8 (repeatable)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--n-images", type=int, default=1, help="images per prompt (seeds seed, seed+1, ...)")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--sampler", default=None, help="ddim, euler, euler_a, dpmsolver++, unipc, ... (kohya names; "
                   "default ddim; FLUX: euler or heun, default euler)")
    p.add_argument("--cfg", type=float, default=None, help="classifier-free guidance scale (default 7.5; FLUX: 1, "
                   "above 1 true CFG against --negative)")
    p.add_argument("--width", type=int, default=None)
    p.add_argument("--height", type=int, default=None)
    p.add_argument("--control", action="append", default=[], metavar="IMAGE",
                   help="edit models: the image to edit (repeatable where the model takes several reference images)")
    p.add_argument("--sweep", default=None, help="comma-separated multipliers for the last --lora, one grid")
    p.add_argument("--out", default="outputs", help="output folder")
    p.add_argument("--overwrite", action="store_true", help="replace images already in --out (refused otherwise)")
    p.set_defaults(func=run)


def image_name(prompt_index: int, seed: int, column: int | None, multiplier: float | None) -> str:
    """`000_7.png`, or in a sweep `000_7_c01_w-1.png`: the column index keeps names in multiplier order."""
    if multiplier is None:
        return f"{prompt_index:03d}_{seed}.png"
    return f"{prompt_index:03d}_{seed}_c{column:02d}_w{multiplier:+g}.png"


def run(args) -> int:
    from ..prompts import SamplePrompt, load_prompt_file
    from ..fileio import make_parent, refuse_overwriting_inputs
    from ..generate import (GenerationRequest, NonFiniteImage, control_images, generate, make_grid, parameters_text,
                            save_png, weight_label, with_family_defaults)
    from ..network.apply import network_from_file

    check_args(args)
    prompts = [SamplePrompt(prompt=p, negative=args.negative, seed=None, cfg=args.cfg, steps=args.steps) for p in args.prompt]
    if args.from_file:
        file_prompts = load_prompt_file(args.from_file)
        validate.sample_prompts(file_prompts, args.from_file, args.sampler)
        prompts += file_prompts
    if not prompts:
        raise UserError("give at least one --prompt or --from-file")
    loras = [parse_lora_arg(x) for x in args.lora]
    for path, mult in loras:
        validate.finite(mult, f"--lora {path}: multiplier")
    sweep = parse_sweep(args.sweep) if args.sweep else None
    if sweep and not loras:
        raise UserError("--sweep needs a --lora to sweep")
    columns = sorted(sweep) if sweep else [None]
    plan = []  # (prompt, seeds, file names per (seed, column)) decided before any work
    for pi, sp in enumerate(prompts):
        seeds = [(sp.seed if sp.seed is not None else args.seed) + k for k in range(args.n_images)]
        names = [image_name(pi, s, ci, c) for s in seeds for ci, c in enumerate(columns)]
        plan.append((pi, sp, seeds, names + ([f"{pi:03d}_grid.png"] if sweep else [])))
    out = Path(args.out)
    inputs = [args.from_file, args.model] + [path for path, _ in loras] + list(args.control)
    for _, _, _, names in plan:  # every file this run writes, against every file it reads
        for n in names:
            refuse_overwriting_inputs(out / n, inputs, "--out")
    existing = [out / n for _, _, _, names in plan for n in names if (out / n).exists()]
    if existing and not args.overwrite:
        raise UserError(f"{len(existing)} output image(s) already exist (first: {existing[0].name}); pass --overwrite "
                        "or choose another --out", path=out)
    model = load_model_from_args(args)
    validate.clip_skip(model, args.clip_skip)
    networks = [network_from_file(model, path, mult) for path, mult in loras]
    controls = control_images(model, args.control) if args.control else None
    prompt_controls = [control_images(model, sp.extra["controls"], f"{args.from_file} (--ci)")
                       if sp.extra.get("controls") else None for _, sp, _, _ in plan]  # a prompt's own, else --control
    make_parent(out / "x")
    model_name = Path(model.source).name
    written = 0
    from tqdm import tqdm

    bar = tqdm(total=sum(len(seeds) * len(columns) for _, _, seeds, _ in plan), desc="generate", unit="img",
               dynamic_ncols=True, disable=None)
    for pi, sp, seeds, names in plan:
        entries = [(s, c) for s in seeds for c in columns]
        req = GenerationRequest(
            prompts=[sp.prompt] * len(entries), seeds=[s for s, _ in entries], negative=[sp.negative] * len(entries),
            steps=sp.steps if args.from_file else args.steps, sampler=sp.sampler or args.sampler, cfg=sp.cfg,
            width=sp.width or args.width, height=sp.height or args.height,
            controls=[own] * len(entries) if (own := prompt_controls[pi] or controls) else None,
        )
        req = with_family_defaults(model, req)
        if sweep:
            req.multipliers[len(networks) - 1] = [c for _, c in entries]
        try:
            images = generate(model, networks, req)
        except NonFiniteImage as e:
            raise NonFiniteImage(e.message, path=loras[e.network][0] if e.network is not None else None) from None
        for (seed, col), img, name in zip(entries, images, names):
            used = [(p, (col if (sweep and i == len(loras) - 1) else m)) for i, (p, m) in enumerate(loras)]
            params = parameters_text(sp.prompt, sp.negative, req.steps, req.sampler, req.cfg, seed,
                                     (img.shape[1], img.shape[0]), model_name, used)
            save_png(img, out / name, params,
                     {"prompt": sp.prompt, "negative": sp.negative, "seed": seed, "steps": req.steps,
                      "sampler": req.sampler, "cfg": req.cfg, "loras": used, "model": model.source})
            written += 1
            bar.update(1)
        if sweep:
            rows = [images[r * len(columns):(r + 1) * len(columns)] for r in range(len(seeds))]
            lora_name = Path(loras[-1][0]).name
            grid = make_grid(rows, [weight_label(c) for c in columns], [f"seed {s}" for s in seeds],
                             scale=max(1, 256 // rows[0][0].shape[0]), title=f"{sp.prompt}  |  LoRA: {lora_name}")
            save_png(grid, out / names[-1], f"{sp.prompt}\nSweep: {args.sweep} on {lora_name}")
    bar.close()
    log.info("wrote %d image(s) to %s", written, out)
    print(f"wrote {written} image(s) to {out}")
    return 0
