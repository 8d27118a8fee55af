"""The README's measured-comparison tables, regenerated from the quality suite in one command.

    python bench/quality_report.py [--section NAME ...] [--cached-only] [--threads 1] [--no-readme]

Each section is a set of `difflora eval` cells (task x variant x training seed x load weight)
cached under `bench/results/<section>/cells/`: a rerun trains only the cells that are missing
(a changed method default changes the cells' keys, so they are retrained). Writes
`bench/results/<section>/eval.json` and `eval.md` per section, `bench/results/quality_tables.md`,
and replaces the README between the `quality-tables` markers.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "src"))

from difflora.toy.evaluate import SUITES, evaluate, summarize, summary_table  # noqa: E402

M = 32  # held-out prompts per cell
# The copier (800 steps, ~4x an ADDifT cell) was measured on these tasks only; 30 steps only on the local
# test changes (it lost on colour changes on tune).
COPIER_TEST = ["eyes-rev", "smile-rev", "glasses", "style-rev"]
COPIER_TUNE = ["hair", "skin-rev", "glasses-rev"]
LOCAL_TEST = ["eyes-rev", "smile-rev", "glasses"]
# Other 50-step learning rates, screened on the tune changes where 50 steps at lr 6e-3 lost
COLOUR_SCREEN = ["style", "hair", "hair-any", "background"]
# Self-regularisation: tune changes whose pairs leave part of the image unchanged
SELFREG_TASKS = ["hair", "skin-rev", "glasses-rev"]
# Fewer-steps settings screened on the tune changes where 40-50 steps lost (colour, texture) and skin-rev
SCREEN = ["style", "hair", "hair-any", "background", "skin-rev"]
# name: (title, [(tasks, variants, training seeds, load weights)], text under the title)
SECTIONS: dict[str, tuple[str, list[tuple[list[str], list[str], list[int], list[float] | None]], str]] = {
    "suite_test": (
        "Test subset (fixed before tuning; reported once with the settings chosen on tune)",
        [(SUITES["test"], ["addift", "addift-100", "addift-tt", "addift-ttseq"], [0, 1], None),
         (SUITES["test"], ["addift-40-t700", "addift-50-lr6e-3"], [0, 1], None),
         (LOCAL_TEST, ["addift-30-lr1e-2"], [0, 1], None),
         (COPIER_TEST, ["copier"], [0], None)],
        "`addift`: the defaults (40 steps, lr 6e-3, timesteps \"auto\": 700-1000 for a change over at least a fifth "
        "of the image, else 500-1000); `addift-100`: the first defaults (100 steps, lr 3e-3, 500-1000); `addift-tt`: "
        "those with TrainTrain's shipped timestep sequence (`replicate_traintrain_timesteps = true`); "
        "`addift-ttseq`: the defaults with TrainTrain's sequence in the same window (the schedule alone); "
        "`addift-40-t700`: 40 steps, lr 6e-3 at 700-1000 on every task; `addift-50-lr6e-3`: 50 steps at lr 6e-3 "
        "(500-1000); `addift-30-lr1e-2`: 30 steps at lr 1e-2, only on the local changes; `copier`: its defaults "
        "(800 steps), on the tasks it was measured on.",
    ),
    "suite_tune": (
        "Tune subset (where the defaults were chosen), training seed 0",
        [(SUITES["tune"], ["addift"], [0], None),
         (SUITES["tune"], ["addift-100"], [0], [1.0, 0.5]),
         (SUITES["tune"], ["addift-tt", "addift-ttseq", "addift-40-t700", "addift-50-lr6e-3", "addift-30-lr1e-2"],
          [0], None),
         (SUITES["tune"], ["addift-m0.5-50-lr4e-3", "addift-m0.5-40"], [0], None),
         (SCREEN, ["addift-lp4-40"], [0], None),
         (COLOUR_SCREEN, ["addift-50-lr1e-2"], [0], None),
         (["hair", "hair-any"], ["addift-50"], [0], None),
         (SELFREG_TASKS, ["addift-selfreg10"], [0], None),
         (["eyes", "hair"], ["addift-avg"], [0], [1.0, 2.0, 4.0]),
         (COPIER_TUNE, ["copier"], [0], None)],
        "`addift`: the defaults (40 steps, lr 6e-3, timesteps \"auto\"); `addift-100`: the first defaults (100 steps, "
        "lr 3e-3, 500-1000), also loaded at weight 0.5 (`@0.5`); `addift-tt`: those with TrainTrain's timestep "
        "sequence; `addift-ttseq`: the defaults with TrainTrain's sequence; `addift-40-t700`: 40 steps, lr 6e-3, "
        "700-1000 on every task; `addift-50-lr6e-3`, "
        "`addift-30-lr1e-2`: fewer steps at a higher learning rate (500-1000); `addift-m0.5-*`: multiplier 0.5 "
        "(weight 1 = 2x the trained shift instead of 4x); `addift-lp4-40`: LoRA+ (lora_up at 4x the lr), 40 steps; "
        "`addift-50-lr1e-2`, `addift-50`: 50 steps at lr 1e-2 and 3e-3; `addift-selfreg10`: the first defaults with "
        "`self_reg_weight = 10`; `addift-avg`: one ADDifT (the defaults) per pair, the 8 LoRAs averaged, loaded at 1, 2 "
        "and 4; `copier`: its defaults, on the tasks it was measured on.",
    ),
}
SECTIONS["suite_selfreg"] = (
    "Self-regularisation (seed 003's \"next step\"), tune tasks whose pairs leave part of the image unchanged",
    [(SELFREG_TASKS, ["addift-100"], [0], [1.0, 0.5]),
     (SELFREG_TASKS, ["addift-selfreg10", "addift-tt"], [0], None),
     (COPIER_TUNE, ["copier"], [0], None)],
    "`addift-selfreg10`: `self_reg_weight = 10` on the first defaults (100 steps, lr 3e-3; at weight 1 the term "
    "changed results by a point or two); `addift-100 @0.5`: the same without the term loaded at half weight, for a "
    "comparison at equal edit success; the peers `addift-tt` (TrainTrain's timestep sequence) and `copier`.",
)
# cells shared with another section's folder
CELLS_FROM = {"suite_selfreg": "suite_tune"}
START, END = "<!-- quality-tables:start -->", "<!-- quality-tables:end -->"


BARS = {"edit_success": ("edit", 0.90), "reverse_success": ("reverse", 0.80), "preservation": ("preservation", 0.95)}
MISSES_FOR = {"suite_test": ["addift", "addift-100", "addift-40-t700"]}  # sections that list each missed bar's measured detail


def _pooled(results, key: str) -> str:
    """A per-start-value rate pooled over the cells (training seeds): share of all images from that start."""
    n: dict[str, int] = {}
    hits: dict[str, float] = {}
    for r in results:
        for value, s in r.by_start.items():
            if s[key] is not None:
                n[value] = n.get(value, 0) + s["n"]
                hits[value] = hits.get(value, 0.0) + s["n"] * s[key]
    return " ".join(f"{v} {hits[v] / n[v]:.0%} ({n[v]})" for v in n)


def misses_table(results, labels: list[str]) -> str:
    """Each (variant, task) under a bar, with what the cells measured about it: the rate per start value
    (pooled over training seeds; image counts in brackets) and which attributes the +w images changed."""
    rows = []
    for label in labels:
        by_task: dict[str, list] = {}
        for r in results:
            if r.method == label and r.weight == 1.0:
                by_task.setdefault(r.task, []).append(r)
        for task, rs in by_task.items():
            means = {k: sum(getattr(r, k) for r in rs) / len(rs) for k in BARS}
            missed = [f"{name} {means[k]:.0%}" for k, (name, bar) in BARS.items() if means[k] < bar]
            if not missed:
                continue
            changed = {}
            for r in rs:
                for a, share in r.extra.get("changed_by_plus", {}).items():
                    changed[a] = changed.get(a, 0.0) + (share or 0.0) / len(rs)
            drift = ", ".join(f"{a} {v:.0%}" for a, v in sorted(changed.items(), key=lambda x: -x[1]) if v > 0) or "none"
            rows.append(f"| {label} | {task} | {', '.join(missed)} | {_pooled(rs, 'edit')} | "
                        f"{_pooled(rs, 'reverse')} | {drift} |")
    if not rows:
        return ""
    return ("Bars missed (edit ≥ 90%, reverse ≥ 80%, preservation ≥ 95%; task means over the training seeds), "
            "with the rates per start value of the 0 image, pooled over the seeds (images in brackets), and the "
            "attributes the +w image changed besides the task's own:\n\n"
            "| method | task | missed | edit by start value | reverse by start value | other attributes changed at +w |\n"
            "|---|---|---|---|---|---|\n" + "\n".join(rows) + "\n")


def run_section(name: str, cached_only: bool) -> str:
    title, runs, text = SECTIONS[name]
    out = ROOT / "bench" / "results" / CELLS_FROM.get(name, name)
    results = []
    for tasks, variants, seeds, weights in runs:
        results += evaluate(tasks, variants, [8], out, seed=0, m=M, train_seeds=seeds, weights=weights,
                            cached_only=cached_only, write_summary=False)
    from difflora.fileio import write_json_atomic, write_text_atomic
    from difflora.toy.evaluate import markdown_table
    from dataclasses import asdict

    summary = summarize(results)
    table = summary_table(summary)
    if name not in CELLS_FROM:
        write_json_atomic(out / "eval.json", {"cells": [asdict(r) for r in results], "summary": summary})
        write_text_atomic(out / "eval.md", table + "\n" + markdown_table(results))
    misses = misses_table(results, MISSES_FOR[name]) if name in MISSES_FOR else ""
    return (f"#### {title}\n\n{text}\n\n{table}\n" + (f"{misses}\n" if misses else "")
            + f"(`bench/results/{CELLS_FROM.get(name, name)}/`: every cell's JSON, per-start-value rates)\n")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--section", action="append", choices=list(SECTIONS))
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--no-readme", action="store_true")
    ap.add_argument("--cached-only", action="store_true", help="tables from the cells already measured; train nothing")
    args = ap.parse_args()
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    parts = [run_section(s, args.cached_only) for s in (args.section or list(SECTIONS))]
    body = "\n".join(parts)
    (ROOT / "bench" / "results" / "quality_tables.md").write_text(body, encoding="utf-8")
    if not args.no_readme and not args.section:
        readme = ROOT / "README.md"
        text = readme.read_text(encoding="utf-8")
        if START in text and END in text:
            head, rest = text.split(START, 1)
            _, tail = rest.split(END, 1)
            readme.write_text(f"{head}{START}\n{body}{END}{tail}", encoding="utf-8")
    print(body)
    return 0


if __name__ == "__main__":
    sys.exit(main())
