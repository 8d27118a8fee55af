"""`difflora train JOB.toml`: train a LoRA with any method."""

from __future__ import annotations


def register(sub) -> None:
    p = sub.add_parser("train", help="train a LoRA from a job TOML (standard, copier, addift, slider, differential)",
                       description="Train a LoRA. The job TOML uses kohya's option names; the dataset part follows "
                                   "kohya's [general]/[[datasets]]/[[datasets.subsets]] layout (inline or via "
                                   "dataset_config). Several processes: `accelerate launch --multi_gpu --num_processes N` or `torchrun --nproc_per_node N` (one per GPU; gloo on CPUs).")
    p.add_argument("job", nargs="?", help="job TOML file")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config key (TOML value; dotted keys reach tables: addift.multiplier=0.5)")
    p.add_argument("--resume", nargs="?", const="auto", default=None, metavar="STATE_DIR",
                   help="continue from a saved training state (default: <output_dir>/<output_name>-state)")
    p.add_argument("--events", default=None, metavar="FILE",
                   help="append progress events (steps, losses, saves, end) to FILE, one JSON object per line")
    p.add_argument("--ignore-lock", action="store_true", help="start even if another run holds the output lock")
    p.add_argument("--help-keys", action="store_true",
                   help="list every job key with its default, level and meaning, and exit (with --method: its defaults)")
    p.add_argument("--method", default=None, help="with --help-keys: show this method's table and defaults")
    p.add_argument("--restrict-paths", default=None, metavar="DIR",
                   help="refuse a job whose files or folders resolve outside DIR (for configs served by a UI)")
    p.add_argument("--allow-path", action="append", default=[], metavar="DIR",
                   help="with --restrict-paths: inputs (models, data, weights) may also lie in DIR (repeatable)")
    p.set_defaults(func=run)


def key_rows(method: str | None = None) -> list[tuple[str, str, str, str]]:
    """(key, default, level, description) for every job key; defaults are the method's when given."""
    from pydantic import BaseModel

    from ..config import JobConfig, SubsetConfig
    from ..config_help import describe
    from ..methods import METHODS

    from ..models.registry import option_tables

    defaults = dict(METHODS[method].defaults) if method else {}
    rows: list[tuple[str, str, str, str]] = []
    owners: dict[str, list[str]] = {}  # a model family's key -> the families that honour it
    for plugin, table in option_tables():
        for key in table.model_fields:
            owners.setdefault(key, []).append(plugin.title)
    family_rows: list[tuple[str, str, str, str]] = []

    def show(value) -> str:
        return "(unset)" if value is None else repr(value)

    subset_only = {k: f for k, f in SubsetConfig.model_fields.items() if k not in JobConfig.model_fields}
    dataset_keys = set(SubsetConfig.model_fields) | {"resolution", "batch_size", "enable_bucket", "min_bucket_reso",
                                                     "max_bucket_reso", "bucket_reso_steps", "bucket_no_upscale"}
    for name, field in JobConfig.model_fields.items():
        default = field.default
        if name == "method" and method:
            default = method
        if name in METHODS and isinstance(default, BaseModel):  # a method's table
            if method and name != method:
                continue
            rows.append((f"[{name}]", "", f"[{name}]", describe(name, field)))
            for sub, sub_field in type(default).model_fields.items():
                rows.append((f"  {sub}", show(sub_field.default), f"[{name}]", describe(f"{name}.{sub}", sub_field)))
            continue
        if isinstance(default, BaseModel) or name == "datasets":  # [general] / [[datasets]]: their keys are listed
            rows.append((f"[{name}]" if name == "general" else "[[datasets]]", "", "job", describe(name, field)))
            continue
        if name in owners:
            family_rows.append((name, show(default), f"job ({' / '.join(owners[name])})", describe(name, field)))
            continue
        level = "job, [general], [[datasets]]" if name in dataset_keys else "job"
        if name in SubsetConfig.model_fields:
            level += ", [[datasets.subsets]]"
        rows.append((name, show(defaults.get(name, default)), level, describe(name, field)))
    for name, field in subset_only.items():
        rows.append((name, "(required)" if field.is_required() else show(field.default), "[[datasets.subsets]]",
                     describe(name, field)))
    return rows + sorted(family_rows, key=lambda r: r[2])  # grouped by the families that honour them


def help_keys(method: str | None = None) -> str:
    rows = key_rows(method)
    widths = [max(len(r[i]) for r in rows) for i in range(3)]
    head = f"job keys{f' with the defaults of method {method!r}' if method else ''} (key, default, where it goes, what it does):"
    return head + "\n" + "\n".join(f"{k:<{widths[0]}}  {d:<{min(widths[1], 24)}}  {lv:<{widths[2]}}  {desc}".rstrip()
                                      for k, d, lv, desc in rows)


def run(args) -> int:
    from ..config import load_job
    from ..errors import UserError
    from ..train.loop import train

    if args.method is not None:
        from ..methods import METHODS

        if args.method not in METHODS:
            raise UserError(f"unknown method {args.method!r}; choose one of: {', '.join(METHODS)}")
        if not args.help_keys:
            raise UserError("--method goes with --help-keys (in a job, set method = \"...\")")
    if args.help_keys:
        print(help_keys(args.method))
        return 0
    if not args.job:
        raise UserError("give a job TOML file (see examples/ and `difflora train --help-keys`)")
    if args.allow_path and not args.restrict_paths:
        raise UserError("--allow-path goes with --restrict-paths DIR")
    policy = None
    if args.restrict_paths:
        from ..pathpolicy import PathPolicy

        policy = PathPolicy(args.restrict_paths, args.allow_path)
    job = load_job(args.job, args.overrides, restrict_paths_to=policy)  # validated once, before any process starts
    from ..train.distributed import check_launch, quiet_other_processes

    check_launch()
    quiet_other_processes()
    listeners = []
    if args.events:
        from ..train.listeners import JsonLines

        listeners.append(JsonLines(args.events))
    path = train(job, resume=args.resume, ignore_lock=args.ignore_lock, listeners=listeners)
    if path is not None:
        print(f"saved {path}")
    return 0
