"""`difflora merge | svd-merge | extract | resize`: the LoRA tools, kohya-compatible files in and out."""

from __future__ import annotations

import argparse

from .. import validate
from ..fileio import refuse_overwriting_inputs

PRECISIONS = ("float", "fp16", "bf16")


def _clamp_options(p, default_note: str) -> None:
    g = p.add_mutually_exclusive_group()
    g.add_argument("--clamp-quantile", type=float, default=None, metavar="Q",
                   help=f"clamp both factors to ±the Q quantile of their values, as kohya does with 0.99 "
                        f"({default_note})")
    g.add_argument("--no-clamp", action="store_true", help="no clamping (the default): the best rank-k approximation")


def register(sub) -> None:
    # ---------------------------------------------------------------- merge
    p = sub.add_parser(
        "merge", help="merge LoRAs into a model, or into one LoRA",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description=(
            "Merge LoRA files into a model (with --model), or into one LoRA file.\n\n"
            "Into a model: W += ratio * dW for every module (Linear, 1x1 and 3x3 conv, text encoder too;\n"
            "LoRA/LoCon, LoHa, LoKr and DoRA). A diffusers folder gives a folder, a single file a single\n"
            ".safetensors.\n\n"
            "LoRA + LoRA:\n"
            "  --mode exact (default)  ranks concatenated; the result is exactly sum(ratio_i * dW_i),\n"
            "                          for any ranks and alphas.\n"
            "  --mode kohya            kohya merge_lora.py: factors scaled by sqrt(alpha_i/base_alpha)*ratio_i\n"
            "                          and summed (equal ranks needed); the ratio acts squared and cross\n"
            "                          terms appear. --concat concatenates ranks instead (alpha = base_alpha).\n"
            "--shuffle permutes the rank axis (seeded by --seed); the delta is unchanged."),
    )
    p.add_argument("--model", "--sd-model", dest="model", default=None,
                   help="base model (diffusers folder or single file) to merge into; omit for LoRA + LoRA")
    p.add_argument("--models", nargs="+", required=True, help="LoRA files (kohya or peft layout)")
    p.add_argument("--ratios", nargs="+", type=float, default=None, help="one per LoRA file (default: 1 each)")
    p.add_argument("--save-to", required=True, help="output (.safetensors file, or a folder for a folder model)")
    p.add_argument("--mode", choices=("exact", "kohya"), default="exact", help="LoRA + LoRA arithmetic (default exact)")
    p.add_argument("--concat", action="store_true", help="kohya mode: concatenate ranks instead of summing factors")
    p.add_argument("--shuffle", action="store_true", help="permute each module's rank axis (delta unchanged)")
    p.add_argument("--seed", type=int, default=0, help="seed for --shuffle (default 0)")
    p.add_argument("--precision", choices=PRECISIONS, default="float",
                   help="dtype the model is loaded and merged in (default float; LoRA maths is always float32)")
    p.add_argument("--save-precision", choices=PRECISIONS, default=None, help="dtype written (default: --precision)")
    p.add_argument("--allow-pickle", action="store_true", help="allow a pickle-based model checkpoint (.ckpt)")
    p.set_defaults(func=run_merge)

    # ---------------------------------------------------------------- svd-merge
    p = sub.add_parser(
        "svd-merge", help="merge LoRAs of any ranks into one LoRA of a chosen rank",
        description=("Sum ratio_i * dW_i per module and bring it to --new-rank with an SVD computed from the "
                     "factors (equal to the SVD of the dense sum). Ratios act linearly; alpha = rank. Exact "
                     "(no clamp) by default, at the real rank where the inputs' total rank is lower; "
                     "--clamp-quantile 0.99 reproduces kohya svd_merge_lora.py exactly (dense SVD, rank padded, "
                     "signed-quantile clamp). LoHa, LoKr and DoRA inputs enter through their dense deltas: the "
                     "output is a LoRA of the chosen rank."),
    )
    p.add_argument("--models", nargs="+", required=True, help="LoRA files (kohya, LyCORIS or peft layout)")
    p.add_argument("--ratios", nargs="+", type=float, default=None, help="one per LoRA file (default: 1 each)")
    p.add_argument("--new-rank", type=int, default=4, help="output rank (default 4)")
    p.add_argument("--new-conv-rank", type=int, default=None, help="output rank of 3x3 convs (default: --new-rank)")
    p.add_argument("--save-to", required=True, help="output .safetensors")
    p.add_argument("--save-precision", choices=PRECISIONS, default=None, help="dtype written (default float)")
    p.add_argument("--device", default="cpu", help="cpu or cuda (default cpu)")
    _base_model_option(p)
    _clamp_options(p, "kohya's svd_merge_lora.py always does; off by default here")
    p.set_defaults(func=run_svd_merge)

    # ---------------------------------------------------------------- extract
    p = sub.add_parser(
        "extract", help="extract a LoRA from the difference of two models",
        description=("A LoRA approximating (tuned - original) on the kohya target modules, by truncated SVD per "
                     "module; alpha = rank. As kohya: if no text-encoder weight differs by more than --min-diff, "
                     "the text encoder is left out. No clamp by default; --clamp-quantile 0.99 is kohya's default."),
    )
    p.add_argument("--model-org", required=True, help="original model (diffusers folder or single file)")
    p.add_argument("--model-tuned", required=True, help="fine-tuned model of the same architecture")
    p.add_argument("--dim", type=int, default=4, help="rank (default 4)")
    p.add_argument("--conv-dim", type=int, default=None, help="rank of 3x3 convs; omit for no 3x3 conv modules")
    p.add_argument("--min-diff", type=float, default=0.01,
                   help="text encoder counts as unchanged when max |diff| <= this (default 0.01)")
    p.add_argument("--save-to", default=None, help="output .safetensors (default <tuned>-extracted-r<dim>.safetensors)")
    p.add_argument("--device", default="cpu", help="SVD device, cpu or cuda (default cpu)")
    p.add_argument("--load-precision", choices=PRECISIONS, default=None, help="dtype to load the models in (default float)")
    p.add_argument("--save-precision", choices=PRECISIONS, default=None, help="dtype written (default float)")
    p.add_argument("--allow-pickle", action="store_true", help="allow pickle-based model checkpoints (.ckpt)")
    _clamp_options(p, "kohya's extract default is 0.99; off by default here")
    p.set_defaults(func=run_extract)

    # ---------------------------------------------------------------- resize
    p = sub.add_parser(
        "resize", help="resize a LoRA to a lower rank, keeping its strength",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description=(
            "SVD of each module's up @ down; keep k directions; new alpha = alpha/rank * k (strength kept).\n"
            "--dynamic picks k per module (capped by --new-rank / --new-conv-rank):\n"
            "  sv_ratio x       keep singular values with S[0]/S_i below x\n"
            "  sv_cumulative x  keep a fraction x of sum(S)\n"
            "  sv_fro x         keep a fraction x of the Frobenius norm\n"
            "--dynamic-rule kohya (default) reproduces resize_lora.py literally, which keeps one direction\n"
            "more than the target needs (sv_cumulative/sv_fro add 1 twice); --dynamic-rule minimal keeps\n"
            "the smallest rank that meets the target."),
    )
    p.add_argument("--model", required=True, help="input LoRA (kohya, LyCORIS or peft layout)")
    p.add_argument("--save-to", required=True, help="output .safetensors")
    p.add_argument("--new-rank", type=int, default=4, help="rank, or the cap for --dynamic (default 4)")
    p.add_argument("--new-conv-rank", type=int, default=None, help="same for 3x3 convs (default: --new-rank)")
    p.add_argument("--dynamic", "--dynamic-method", dest="dynamic", choices=("sv_ratio", "sv_fro", "sv_cumulative"),
                   default=None, help="choose the rank per module from its singular values")
    p.add_argument("--param", "--dynamic-param", dest="param", type=float, default=None, help="the --dynamic rule's parameter")
    p.add_argument("--dynamic-rule", choices=("kohya", "minimal"), default="kohya",
                   help="kohya's rank rule (default) or the smallest rank meeting the target")
    p.add_argument("--verbose", dest="print_stats", action="store_true",
                   help="print retained sum(S), Frobenius norm and S[0]/S[k-1] per module, and the average")
    p.add_argument("--save-precision", choices=PRECISIONS, default=None, help="dtype written (default float)")
    p.add_argument("--device", default="cpu", help="cpu or cuda (default cpu)")
    _base_model_option(p)
    p.set_defaults(func=run_resize)


def _base_model_option(p) -> None:
    p.add_argument("--base-model", default=None,
                   help="the base model the LoRAs are for: needed for DoRA inputs (their delta depends on the base "
                        "weights) and for LoHa/LoKr convs (their files flatten the kernel)")
    p.add_argument("--allow-pickle", action="store_true", help="allow a pickle-based --base-model checkpoint (.ckpt)")


def _clamp(args) -> float | None:
    return None if args.no_clamp else args.clamp_quantile


def _check_output(save_to, inputs) -> None:
    """--save-to can be written and is none of the inputs (nor inside an input folder)."""
    refuse_overwriting_inputs(save_to, inputs)
    validate.output_file(save_to, "--save-to")


def run_merge(args) -> int:
    from ..tools.merge import merge_files

    validate.seed(args.seed)
    if args.model is None:
        _check_output(args.save_to, args.models)
    else:  # the merged model may be a folder; merge_files checks its form
        validate.path_text(args.save_to, "--save-to")
        refuse_overwriting_inputs(args.save_to, [args.model, *args.models])

    info = merge_files(args.models, args.ratios, args.save_to, model=args.model, mode=args.mode, concat=args.concat,
                       shuffle=args.shuffle, seed=args.seed, precision=args.precision,
                       save_precision=args.save_precision, allow_pickle=args.allow_pickle)
    if "form" in info:
        print(f"merged {info['modules']} LoRA module(s) into the model; saved {info['form']} {info['output']}")
    else:
        print(f"saved {info['output']}: {info['modules']} modules, dim {info['network_dim']}, "
              f"alpha {info['network_alpha']} ({args.mode}{' concat' if args.concat else ''})")
    return 0


def run_svd_merge(args) -> int:
    from ..tools.svd_merge import svd_merge_files

    _check_output(args.save_to, args.models)

    info = svd_merge_files(args.models, args.ratios, args.save_to, new_rank=args.new_rank,
                           new_conv_rank=args.new_conv_rank, clamp_quantile=_clamp(args), device=args.device,
                           save_precision=args.save_precision, model=args.base_model, allow_pickle=args.allow_pickle)
    real = (f" ({len(info['below_asked_rank'])} module(s) below the asked rank: the inputs' total rank is lower)"
            if info["below_asked_rank"] else "")
    print(f"saved {info['output']}: {info['modules']} modules, dim {info['network_dim']}, alpha {info['network_alpha']}"
          f"{real}")
    return 0


def run_extract(args) -> int:
    from ..tools.extract import extract_files

    validate.finite(args.min_diff, "--min-diff")
    if args.min_diff < 0:
        raise validate.UserError(f"--min-diff must be 0 or more, got {args.min_diff}")
    if args.save_to is not None:
        _check_output(args.save_to, [args.model_org, args.model_tuned])

    info = extract_files(args.model_org, args.model_tuned, args.save_to, dim=args.dim, conv_dim=args.conv_dim,
                         clamp_quantile=_clamp(args), min_diff=args.min_diff, device=args.device,
                         load_precision=args.load_precision, save_precision=args.save_precision,
                         allow_pickle=args.allow_pickle)
    te = " (text encoder unchanged, left out)" if info["text_encoder_dropped"] else ""
    print(f"saved {info['output']}: {info['modules']} modules, dim {info['network_dim']}{te}")
    return 0


def run_resize(args) -> int:
    from ..tools.resize import format_stats, resize_file

    _check_output(args.save_to, [args.model])

    info, stats = resize_file(args.model, args.save_to, new_rank=args.new_rank, new_conv_rank=args.new_conv_rank,
                              dynamic=args.dynamic, param=args.param, rule=args.dynamic_rule, device=args.device,
                              save_precision=args.save_precision, base_model=args.base_model,
                              allow_pickle=args.allow_pickle)
    if args.print_stats:
        print(format_stats(stats))
    retained = (f"; Frobenius norm retained: mean {info['mean_fro_retained']:.1%}, lowest {info['min_fro_retained']:.1%}"
                if "mean_fro_retained" in info else "")
    print(f"saved {info['output']}: {info['modules']} modules, dim {info['network_dim']}, alpha {info['network_alpha']}"
          f"{retained}")
    return 0
