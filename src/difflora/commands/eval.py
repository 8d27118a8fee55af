"""`difflora eval`: the measured comparison of the difference methods on toy tasks."""

from __future__ import annotations


def register(sub) -> None:
    from ..toy.evaluate import EDIT_VARIANTS, SUITES, TASKS, VARIANTS
    from ..toy.worlds import WORLDS

    p = sub.add_parser("eval", help="train each difference method on toy tasks and score them with the judge",
                       description="For each task (one attribute changed) and pair count, train every method variant "
                                   "and score held-out generations at multipliers -w/0/+w: edit success (also per "
                                   "start value), reverse success, preservation, change outside the region, steps and "
                                   "seconds. Cells are cached under OUT/cells, so a rerun only adds what is missing. "
                                   "Writes eval.json (cells and the mean/worst-task summary) and eval.md.")
    p.add_argument("--world", choices=list(WORLDS), default="sd",
                   help="base model: sd (the embedded SD1-architecture U-Net) or flow (the Z-Image flow-matching DiT "
                        "that also edits: the edit variants run there, scored from held-out 'before' images)")
    p.add_argument("--all", action="store_true", help="every task, every method, 1 and 8 pairs")
    p.add_argument("--suite", choices=list(SUITES),
                   help="a fixed task list (tune, test: see bench/README.md; ci: the smallest); with no --method "
                        "the peer rows addift, addift-tt and copier (on the flow world also edit and edit-slider), "
                        "training seeds 0 and 1, 8 pairs")
    p.add_argument("--task", action="append", choices=list(TASKS), help="task (repeatable; default eyes)")
    p.add_argument("--method", action="append", choices=[*VARIANTS, *EDIT_VARIANTS],
                   help="method variant (repeatable; default all): " + "; ".join(
                       f"{k} ({v.note})" if v.note else k for k, v in {**VARIANTS, **EDIT_VARIANTS}.items()))
    p.add_argument("--pairs", default=None, help="comma-separated pair counts (default 1,8; 8 with --suite)")
    p.add_argument("--m", type=int, default=None, help="held-out generations per cell (default 64; 32 with --suite)")
    p.add_argument("--model", default=None, help="base model folder (default: the world's shipped model)")
    p.add_argument("--seed", type=int, default=0, help="pair and prompt seed, and the training seed by default")
    p.add_argument("--train-seeds", default=None, help="comma-separated training seeds (default: --seed; 0,1 with "
                                                         "--suite)")
    p.add_argument("--pair-seed", type=int, default=None, help="seed of the training pairs (default --seed)")
    p.add_argument("--prompt-seed", type=int, default=None, help="seed of the held-out prompts (default --seed)")
    p.add_argument("--weights", default=None,
                   help="comma-separated load weights w of the LoRA, each scored from one training (default: the "
                        "variant's, 1)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a job key for every method (TOML value; dotted keys reach tables: "
                        "slider.captions='own')")
    p.add_argument("--grids", action="store_true", help="also write a -w/0/+w image grid per cell")
    p.add_argument("--keep-loras", action="store_true", help="keep each trained LoRA in OUT/cells/ (<cell>.safetensors)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--out", default="eval_results")
    p.set_defaults(func=run)


def _ints(text: str, flag: str) -> list[int]:
    from ..errors import UserError

    try:
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise UserError(f"{flag} takes comma-separated integers, got {text!r}") from None


def run(args) -> int:
    import math
    from pathlib import Path

    from .. import validate
    from ..errors import UserError
    from ..toy.evaluate import EDIT_ROWS, EDIT_VARIANTS, PEER_ROWS, SUITES, TASKS, VARIANTS, eval_job, evaluate, \
        is_edit_variant, markdown_table, summarize, summary_table
    from ..toy.worlds import WORLDS

    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    world = WORLDS[args.world]
    every = [*VARIANTS, *EDIT_VARIANTS] if world.edits else list(VARIANTS)
    if args.suite:
        tasks = SUITES[args.suite]
        methods = args.method or (PEER_ROWS + EDIT_ROWS if world.edits else PEER_ROWS)
    else:
        tasks = list(TASKS) if args.all else (args.task or ["eyes"])
        methods = every if args.all or not args.method else args.method
    refused = [m for m in methods if is_edit_variant(m) and not world.edits]
    if refused:
        raise UserError(f"--method {refused[0]} needs a base model that edits (--world flow); the {world.name} "
                        "world's does not")
    model_path = world.model_path(args.model)
    pairs = _ints(args.pairs or ("8" if args.suite else "1,8"), "--pairs")
    train_seeds = _ints(args.train_seeds or ("0,1" if args.suite else str(args.seed)), "--train-seeds")
    m = args.m if args.m is not None else (32 if args.suite else 64)
    try:
        weights = [float(x) for x in args.weights.split(",") if x.strip()] if args.weights else None
    except ValueError:
        raise UserError(f"--weights takes comma-separated numbers, got {args.weights!r}") from None
    if not pairs:
        raise UserError("--pairs needs at least one pair count")
    for n in pairs:
        validate.at_least(n, 1, "--pairs")
    validate.at_least(m, 1, "--m")
    validate.seed(args.seed)
    validate.output_folder(args.out, "--out")
    if weights is not None and not all(math.isfinite(w) for w in weights):
        raise UserError(f"--weights takes finite numbers, got {args.weights!r}")
    overrides = args.overrides
    for method in methods:  # a bad --set stops here, before minutes of training
        eval_job(tasks[0], method, pairs[0] if pairs else 1, Path(args.out), model_path, args.seed, overrides)
    results = evaluate(tasks, methods, pairs, args.out, model_path=model_path, seed=args.seed, m=m, world=world.name,
                       overrides=overrides, train_seeds=train_seeds, pair_seed=args.pair_seed,
                       prompt_seed=args.prompt_seed, weights=weights,
                       grids=args.grids, keep_loras=args.keep_loras)
    print(summary_table(summarize(results)))
    print(markdown_table(results))
    print(f"wrote {args.out}/eval.json, eval.md and cells/")
    return 0
