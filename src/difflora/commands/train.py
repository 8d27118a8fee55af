"""`difflora train JOB.toml`: train a LoRA with any method."""

from __future__ import annotations

import difflib


def register(sub) -> None:
    p = sub.add_parser("train", help="train a LoRA from a job TOML (standard, copier, addift, slider, differential)",
                       description="Train a LoRA. The job TOML uses kohya's option names; the dataset part follows "
                                   "kohya's [general]/[[datasets]]/[[datasets.subsets]] layout (inline or via "
                                   "dataset_config). Runs under `accelerate launch` for several processes.")
    p.add_argument("job", nargs="?", help="job TOML file")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config key (TOML value; dotted keys reach tables: addift.multiplier=0.5)")
    p.add_argument("--resume", nargs="?", const="auto", default=None, metavar="STATE_DIR",
                   help="continue from a saved training state (default: <output_dir>/<output_name>-state)")
    p.add_argument("--events", default=None, metavar="FILE",
                   help="append progress events (steps, losses, saves, end) to FILE, one JSON object per line")
    p.add_argument("--ignore-lock", action="store_true", help="start even if another run holds the output lock")
    p.add_argument("--help-keys", action="store_true", help="list every job key with its default and exit")
    p.add_argument("--restrict-paths", default=None, metavar="DIR",
                   help="refuse a job whose files or folders resolve outside DIR (for configs served by a UI)")
    p.set_defaults(func=run)


def help_keys() -> str:
    from ..config import JobConfig

    lines = []
    for name, field in JobConfig.model_fields.items():
        default = field.default
        if hasattr(default, "model_dump"):
            lines.append(f"[{name}]")
            for sub_name, sub_field in type(default).model_fields.items():
                lines.append(f"  {sub_name} = {sub_field.default!r}")
        else:
            lines.append(f"{name} = {default!r}")
    return "\n".join(lines)


def suggest(key: str) -> str:
    from ..config import JobConfig

    close = difflib.get_close_matches(key, list(JobConfig.model_fields), n=1)
    return f" (did you mean '{close[0]}'?)" if close else ""


def run(args) -> int:
    from ..config import load_job
    from ..errors import UserError
    from ..train.loop import train

    if args.help_keys:
        print(help_keys())
        return 0
    if not args.job:
        raise UserError("give a job TOML file (see examples/ and `difflora train --help-keys`)")
    job = load_job(args.job, args.overrides, restrict_paths_to=args.restrict_paths)  # validated once, before any process starts
    from ..train.launch import requested_processes, run_ranks

    n = requested_processes()
    if n > 1:
        import sys

        return run_ranks(n, sys.argv[1:])
    listeners = []
    if args.events:
        from ..train.listeners import JsonLines

        listeners.append(JsonLines(args.events))
    path = train(job, resume=args.resume, ignore_lock=args.ignore_lock, listeners=listeners)
    if path is not None:
        print(f"saved {path}")
    return 0
