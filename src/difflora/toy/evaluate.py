"""`difflora eval`: train every difference method on a toy task and score it with the judge.

For a task (one attribute changed, e.g. eyes open -> closed) and N pairs, each method is trained
at its documented defaults on the same N procedural pairs. Then M held-out (prompt, seed)
generations (captions of attribute combinations never seen by the base model, with the task's
attribute left out so the base model draws it freely) are made at multipliers -1, 0 and +1 and
judged:
- edit success: share of +1 images whose attribute takes the "after" value;
- reverse success: share of -1 images whose attribute takes the "before" value;
- preservation: share of +1 images whose every other judged attribute equals the multiplier-0
  image of the same seed;
- outside change: mean |pixel change| between +1 and 0 outside the attribute's region (local
  attributes: eyes, mouth, glasses; the whole image for global ones);
- training steps and wall seconds.
"""

from __future__ import annotations

import contextlib
import io
import logging
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

from . import faces

log = logging.getLogger(__name__)

TASKS: dict[str, tuple[str, str, str]] = {
    "eyes": ("eyes", "open", "closed"),
    "smile": ("mouth", "smiling", "neutral"),
    "glasses": ("glasses", "none", "glasses"),
    "style": ("style", "flat", "detailed"),
    "hair": ("hair", "black", "red"),
}

# Method rows of the comparison: (label, job keys). Everything else is the method's defaults.
METHOD_ROWS: dict[str, dict] = {
    "addift": {"method": "addift"},
    "slider": {"method": "slider"},
    "copier": {"method": "copier"},
    "differential": {"method": "differential"},
    "copier-avg": {"method": "copier", "per_pair_average": True},
    "standard": {"method": "standard"},
}


@dataclass
class TaskResult:
    task: str
    method: str
    n_pairs: int
    edit_success: float
    reverse_success: float
    base_after_rate: float
    preservation: float
    preservation_minus: float
    outside_change: float
    train_steps: int
    train_seconds: float
    extra: dict = field(default_factory=dict)


def write_pairs(folder: Path, task: str, n: int, seed: int) -> None:
    """N procedural pairs for a task, in difflora's pair layout (NAME.png / NAME_after.png + captions)."""
    attribute, before, after = TASKS[task]
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng([seed, 31, n])
    for i in range(n):
        base = faces.sample_attributes(rng, held_out=False)
        face_seed = int(rng.integers(0, 2**31 - 1))
        ab, aa, x, y = faces.make_pair(face_seed, attribute, before, after, base=base)
        Image.fromarray(x).save(folder / f"{i:03d}.png")
        Image.fromarray(y).save(folder / f"{i:03d}_after.png")
        (folder / f"{i:03d}.txt").write_text(faces.caption(ab), encoding="utf-8")
        (folder / f"{i:03d}_after.txt").write_text(faces.caption(aa), encoding="utf-8")


def write_after_images(folder: Path, pairs: Path) -> None:
    """The 'after' halves as a kohya dataset (for the standard-LoRA baseline)."""
    sub = folder / "1_face"
    sub.mkdir(parents=True, exist_ok=True)
    for p in sorted(pairs.glob("*_after.png")):
        stem = p.stem[: -len("_after")]
        (sub / f"{stem}.png").write_bytes(p.read_bytes())
        (sub / f"{stem}.txt").write_text((pairs / f"{stem}_after.txt").read_text(encoding="utf-8"), encoding="utf-8")


def eval_prompts(task: str, m: int, seed: int) -> list[str]:
    """Held-out combinations with the task's attribute left out of the caption."""
    attribute = TASKS[task][0]
    combos = faces.held_out_combinations()
    rng = np.random.default_rng([seed, 53])
    picks = [combos[i] for i in rng.choice(len(combos), size=m, replace=m > len(combos))]
    keep = [a for a in faces.CAPTION_ORDER if a != attribute]
    return [faces.caption(c, include=keep) for c in picks]


def region_mask(attribute: str) -> np.ndarray | None:
    """Where an attribute can be drawn, over all face layouts (None for global attributes)."""
    if attribute not in faces.LOCAL_ATTRIBUTES:
        return None
    mask = np.zeros((faces.SIZE, faces.SIZE), bool)
    for s in range(400):
        mask |= faces.regions(s)[attribute]
    return mask


def score(model, lora_path: Path, task: str, m: int, seed: int, judge, steps: int = 20, cfg: float = 4.0):
    """Judge M generations at -1, 0, +1; returns (metrics, images by multiplier)."""
    from ..generate import GenerationRequest, generate
    from ..network.apply import network_from_file

    attribute, before, after = TASKS[task]
    prompts = eval_prompts(task, m, seed)
    seeds = [seed * 7919 + i for i in range(m)]
    net = network_from_file(model, lora_path, 1.0)
    mults = (-1.0, 0.0, 1.0)
    req = GenerationRequest(prompts=[p for mu in mults for p in prompts], seeds=seeds * 3, steps=steps, cfg=cfg)
    req.multipliers = {0: [mu for mu in mults for _ in prompts]}
    images = generate(model, [net], req)
    net.remove()
    if images[0].shape[0] != faces.SIZE:  # test-sized models: score at the face world's size
        images = [np.asarray(Image.fromarray(im).resize((faces.SIZE, faces.SIZE), Image.BILINEAR)) for im in images]
    minus, zero, plus = images[:m], images[m:2 * m], images[2 * m:]
    j_minus, j_zero, j_plus = judge.predict(minus), judge.predict(zero), judge.predict(plus)
    others = [a for a in faces.CAPTION_ORDER if a != attribute]
    region = region_mask(attribute)
    outside = ~region if region is not None else np.ones((faces.SIZE, faces.SIZE), bool)
    change = [np.abs(p.astype(np.float32) - z.astype(np.float32)).mean(axis=2)[outside].mean() / 255
              for p, z in zip(plus, zero)]
    metrics = {
        "edit_success": float(np.mean([j[attribute] == after for j in j_plus])),
        "reverse_success": float(np.mean([j[attribute] == before for j in j_minus])),
        "base_after_rate": float(np.mean([j[attribute] == after for j in j_zero])),
        "preservation": float(np.mean([all(p[a] == z[a] for a in others) for p, z in zip(j_plus, j_zero)])),
        "preservation_minus": float(np.mean([all(p[a] == z[a] for a in others) for p, z in zip(j_minus, j_zero)])),
        "outside_change": float(np.mean(change)),
    }
    # Which attributes a LoRA disturbs, for diagnosing a low preservation score.
    metrics["extra"] = {"changed_by_plus": {a: float(np.mean([p[a] != z[a] for p, z in zip(j_plus, j_zero)]))
                                            for a in others}}
    return metrics, {"-1": minus, "0": zero, "+1": plus}


def eval_job(task: str, method: str, n_pairs: int, work: Path, model_path, seed: int,
             overrides: list[str] | None = None):
    """The validated job one method trains for one task (`overrides`: --set KEY=VALUE strings)."""
    from pydantic import ValidationError

    from ..config import JobConfig, format_errors, apply_method_defaults, apply_overrides

    keys = dict(METHOD_ROWS[method])
    job_data = {"output_dir": str(work / "out"), "output_name": f"{task}_{n_pairs}_{method}", "log_with": "none",
                "seed": seed, "overwrite": True, "model": str(model_path) if model_path else None}
    if keys["method"] == "standard":
        job_data["train_data_dir"] = str(work / f"after_{task}_{n_pairs}")
    else:
        job_data["datasets"] = [{"subsets": [{"image_dir": str(work / f"pairs_{task}_{n_pairs}"),
                                              "caption_extension": ".txt"}]}]
    job_data["train_batch_size"] = min(n_pairs, 4)
    job_data.update(keys)
    apply_overrides(job_data, overrides or [])
    try:
        return apply_method_defaults(JobConfig.model_validate(job_data))
    except ValidationError as e:
        raise format_errors(e, "", "--set") from None


def run_one(task: str, method: str, n_pairs: int, work: Path, model_path, seed: int, m: int, judge,
            overrides: list[str] | None = None, model=None):
    from ..models import load_model
    from ..train.loop import train

    pairs = work / f"pairs_{task}_{n_pairs}"
    if not pairs.exists():
        write_pairs(pairs, task, n_pairs, seed)
    if METHOD_ROWS[method]["method"] == "standard":
        data = work / f"after_{task}_{n_pairs}"
        if not data.exists():
            write_after_images(data, pairs)
    job = eval_job(task, method, n_pairs, work, model_path, seed, overrides)
    t0 = time.time()
    with contextlib.redirect_stderr(io.StringIO()):
        path = train(job)
    seconds = time.time() - t0
    from ..network.files import read_metadata_only

    steps = int(read_metadata_only(path).get("ss_steps", 0))
    model = model or load_model(model_path)
    metrics, images = score(model, path, task, m, seed, judge)
    return TaskResult(task, method, n_pairs, train_steps=steps, train_seconds=round(seconds, 2), **metrics), images


def markdown_table(results: list[TaskResult]) -> str:
    head = ("| task | pairs | method | edit +1 | reverse -1 | base rate | preservation | outside change | "
            "steps | train s |\n|---|---|---|---|---|---|---|---|---|---|\n")
    rows = [f"| {r.task} | {r.n_pairs} | {r.method} | {r.edit_success:.0%} | {r.reverse_success:.0%} | "
            f"{r.base_after_rate:.0%} | {r.preservation:.0%} | {r.outside_change:.4f} | {r.train_steps} | "
            f"{r.train_seconds:.1f} |" for r in results]
    return head + "\n".join(rows) + "\n"


def evaluate(tasks: list[str], methods: list[str], pair_counts: list[int], out: Path, model_path=None, seed: int = 0,
             m: int = 64, overrides: list[str] | None = None) -> list[TaskResult]:
    from ..fileio import write_json_atomic, write_text_atomic
    from ..generate import make_grid
    from ..models import load_model
    from .judge import load_judge

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    judge = load_judge()
    model = load_model(model_path)
    results: list[TaskResult] = []
    with tempfile.TemporaryDirectory(prefix="difflora-eval-") as tmp:
        for task in tasks:
            for n in pair_counts:
                rows, labels = [], []
                for method in methods:
                    if method == "copier-avg" and n == 1:
                        continue  # averaging one pair is the copier itself
                    log.info("eval: %s, %d pair(s), %s", task, n, method)
                    r, images = run_one(task, method, n, Path(tmp), model_path, seed, m, judge, overrides, model)
                    results.append(r)
                    log.info("  edit %.0f%%  reverse %.0f%%  preservation %.0f%%  %d steps  %.1f s", 100 * r.edit_success,
                             100 * r.reverse_success, 100 * r.preservation, r.train_steps, r.train_seconds)
                    for i in range(3):
                        rows.append([images["-1"][i], images["0"][i], images["+1"][i]])
                        labels.append(f"{method} #{i}")
                    write_json_atomic(out / "eval.json", [r.__dict__ for r in results])
                make_grid(rows, ["-1", "0", "+1"], labels, scale=2).save(out / f"eval_{task}_{n}pairs.png")
    write_text_atomic(out / "eval.md", markdown_table(results))
    return results
