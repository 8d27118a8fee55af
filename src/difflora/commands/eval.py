"""`difflora eval`: the measured comparison of the difference methods on toy tasks."""

from __future__ import annotations


def register(sub) -> None:
    from ..toy.evaluate import METHOD_ROWS, TASKS

    p = sub.add_parser("eval", help="train each difference method on toy tasks and score them with the judge",
                       description="For each task (one attribute changed) and pair count, train every method at its "
                                   "documented defaults and score held-out generations at multipliers -1/0/+1: edit "
                                   "success, reverse success, preservation, change outside the region, steps and "
                                   "seconds. Writes eval.json, eval.md and grids.")
    p.add_argument("--all", action="store_true", help="every task, every method, 1 and 8 pairs")
    p.add_argument("--task", action="append", choices=list(TASKS), help="task (repeatable; default eyes)")
    p.add_argument("--method", action="append", choices=list(METHOD_ROWS), help="method (repeatable; default all)")
    p.add_argument("--pairs", default="1,8", help="comma-separated pair counts (default 1,8)")
    p.add_argument("--m", type=int, default=64, help="held-out generations per method (default 64)")
    p.add_argument("--model", default=None, help="base model (default: the embedded toy model)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a job key for every method (TOML value; dotted keys reach tables: "
                        "slider.captions='own')")
    p.add_argument("--out", default="eval_results")
    p.set_defaults(func=run)


def run(args) -> int:
    from pathlib import Path

    from .. import validate
    from ..errors import UserError
    from ..toy.evaluate import METHOD_ROWS, TASKS, eval_job, evaluate, markdown_table

    tasks = list(TASKS) if args.all else (args.task or ["eyes"])
    methods = list(METHOD_ROWS) if args.all or not args.method else args.method
    try:
        pairs = [int(x) for x in args.pairs.split(",") if x.strip()]
    except ValueError:
        raise UserError(f"--pairs takes comma-separated integers, got {args.pairs!r}") from None
    if not pairs:
        raise UserError("--pairs needs at least one pair count")
    for n in pairs:
        validate.at_least(n, 1, "--pairs")
    validate.at_least(args.m, 1, "--m")
    validate.seed(args.seed)
    validate.output_folder(args.out, "--out")
    overrides = args.overrides
    for method in methods:  # a bad --set stops here, before minutes of training
        eval_job(tasks[0], method, pairs[0] if pairs else 1, Path(args.out), args.model, args.seed, overrides)
    results = evaluate(tasks, methods, pairs, args.out, model_path=args.model, seed=args.seed, m=args.m,
                       overrides=overrides)
    print(markdown_table(results))
    print(f"wrote {args.out}/eval.json, eval.md and grids")
    return 0
