"""`difflora eval`: train difference methods on toy tasks and score them with the judge.

A task changes one attribute (eyes open -> closed, background blue -> green, any hair -> red).
For a task, N procedural pairs are drawn (pair seed), a method variant is trained on them
(training seed), and M held-out (prompt, seed) generations (prompt seed: captions of attribute
combinations the base model never saw, with the task's attribute left out so the base model draws
it freely) are made at load weights -w, 0 and +w (w = 1 unless the variant says otherwise) and judged:
- edit success: share of +w images whose attribute takes the "after" value;
- edit from before: the same among images whose 0 image shows a "before" value;
- reverse success: share of -w images whose attribute takes a "before" value;
- reverse from after: the same among images whose 0 image shows the "after" value;
- preservation: share of +w images whose every other judged attribute equals the 0 image's;
- outside change: mean |pixel change| between +w and 0 outside the attribute's region (local
  attributes: eyes, mouth, glasses; the whole image for global ones);
- by start value: edit and reverse success grouped by the value the 0 image shows;
- training steps and wall seconds.

Edit variants (the edit methods, ADDifT with addift.control) run on a world whose model edits (the flow
world, toy/worlds.py) and are scored from M held-out "before" images instead (`score_edit`): the pair's
instruction with the image as control, at 0 (the base edit model) and +w, and for the variants that reverse
(edit-slider, addift.control) from the same faces' "after" images at -w:
- edit success: share of +w outputs whose attribute takes the "after" value (base rate: the same at 0);
- reverse success: share of -w outputs from "after" images whose attribute takes a "before" value;
- preservation: share of outputs whose every other judged attribute equals the input image's;
- outside change: mean |pixel change| between the +w output and the input outside the attribute's region.

Each (world, task, variant, pairs, seeds, prompts) cell is cached as one JSON file under
`<out>/cells/`, so a rerun of a suite computes only what is missing.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import logging
import math
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import NamedTuple

import numpy as np
from PIL import Image

from . import faces

log = logging.getLogger(__name__)


class Task(NamedTuple):
    attribute: str
    before: str  # "*": every value but `after` (pairs start from each in turn)
    after: str


TASKS: dict[str, Task] = {
    # local changes, both directions
    "eyes": Task("eyes", "open", "closed"),
    "eyes-rev": Task("eyes", "closed", "open"),
    "smile": Task("mouth", "smiling", "neutral"),
    "smile-rev": Task("mouth", "neutral", "smiling"),
    "glasses": Task("glasses", "none", "glasses"),
    "glasses-rev": Task("glasses", "glasses", "none"),
    # a global texture change
    "style": Task("style", "flat", "detailed"),
    "style-rev": Task("style", "detailed", "flat"),
    # global colour changes (hair: 4 values, background: 4, skin: 3)
    "hair": Task("hair", "black", "red"),
    "hair-rev": Task("hair", "red", "black"),
    "hair-any": Task("hair", "*", "red"),
    "background": Task("background", "blue", "green"),
    "background-rev": Task("background", "green", "blue"),
    "background-any": Task("background", "*", "green"),
    "skin": Task("skin", "light", "dark"),
    "skin-rev": Task("skin", "dark", "light"),
}

# Fixed on 2026-12-02 before the first tuning run (bench/README.md): defaults are chosen on "tune";
# "test" is reported once with them. Each kind of change (local, texture, colour, multi-valued
# start, reversed) is in both.
SUITES: dict[str, list[str]] = {
    "tune": ["eyes", "smile", "glasses-rev", "style", "hair", "background", "skin-rev", "hair-any"],
    "test": ["eyes-rev", "smile-rev", "glasses", "style-rev", "hair-rev", "background-rev", "skin",
             "background-any"],
    "ci": ["eyes"],
}


@dataclass(frozen=True)
class Variant:
    """A method with settings, under its own label (tables, file names, cache keys)."""

    keys: dict  # job keys (nested tables as dicts); everything else is the method's defaults
    weight: float = 1.0  # load weight of the LoRA at evaluation: images at -w, 0, +w
    note: str = ""


def _addift(steps: int, lr: float, note: str, keys: dict | None = None, **table) -> Variant:
    """An ADDifT variant with its steps, learning rate and timestep window written out (500-1000
    unless given), so its meaning and its cells stay put when the method's defaults move."""
    return Variant({"method": "addift", "max_train_steps": steps, "learning_rate": lr, **(keys or {}),
                    "addift": {"min_timestep": 500, "max_timestep": 1000, **table}}, note=note)


VARIANTS: dict[str, Variant] = {
    "addift": Variant({"method": "addift"}, note="defaults"),
    # the defaults chosen first (milestone 1), kept as a row
    "addift-100": _addift(100, 3e-3, "100 steps, lr 3e-3, timesteps 500-1000"),
    # TrainTrain-replication: its shipped timestep sequence over its window, at the first defaults' steps and lr
    "addift-tt": _addift(100, 3e-3, "TrainTrain's shipped timestep sequence (replicate_traintrain_timesteps)",
                         replicate_traintrain_timesteps=True),
    "addift-50-lr6e-3": _addift(50, 6e-3, "50 steps, lr 6e-3"),
    "addift-50": _addift(50, 3e-3, "50 steps, lr 3e-3"),
    "addift-50-lr1e-2": _addift(50, 1e-2, "50 steps, lr 1e-2"),
    "addift-30-lr1e-2": _addift(30, 1e-2, "30 steps, lr 1e-2"),
    # the defaults with TrainTrain's fixed timestep sequence inside the same window (a schedule-only comparison)
    "addift-ttseq": Variant({"method": "addift", "addift": {"replicate_traintrain_timesteps": True}},
                            note="the defaults with TrainTrain's timestep sequence"),
    "addift-40-t700": Variant({"method": "addift", "max_train_steps": 40, "learning_rate": 6e-3,
                               "addift": {"min_timestep": 700, "max_timestep": 1000}},
                              note="40 steps, lr 6e-3, timesteps 700-1000"),
    "addift-m0.5-50-lr4e-3": _addift(50, 4e-3, "multiplier 0.5, 50 steps, lr 4e-3", multiplier=0.5),
    "addift-m0.5-40": _addift(40, 3e-3, "multiplier 0.5, 40 steps, lr 3e-3", multiplier=0.5),
    "addift-lp4-40": _addift(40, 3e-3, "LoRA+ ratio 4, 40 steps, lr 3e-3", {"loraplus_lr_ratio": 4.0}),
    "addift-selfreg10": _addift(100, 3e-3, "self_reg_weight 10 (100 steps, lr 3e-3)", self_reg_weight=10.0),
    "addift-avg": Variant({"method": "addift", "per_pair_average": True}, note="one ADDifT per pair, averaged"),
    "slider": Variant({"method": "slider"}),
    "copier": Variant({"method": "copier"}),
    "copier-avg": Variant({"method": "copier", "per_pair_average": True}, note="one copier per pair, averaged"),
    "differential": Variant({"method": "differential"}),
    "standard": Variant({"method": "standard"}),
}
# Variants for a world whose model edits (toy/worlds.py): the pair's "before" image is the control.
EDIT_VARIANTS: dict[str, Variant] = {
    "edit": Variant({"method": "edit"}, note="edit LoRA: before as control, after as target"),
    "edit-slider": Variant({"method": "edit-slider"}, note="edit slider: +1 edits, -1 reverses"),
    "addift-control": Variant({"method": "addift", "addift": {"control": True}},
                              note="ADDifT for edit models (both passes conditioned on the before image)"),
}
# The rows every suite table carries (difflora's ADDifT and its peers); a world that edits adds EDIT_ROWS.
PEER_ROWS = ["addift", "addift-tt", "copier"]
EDIT_ROWS = ["edit", "edit-slider"]
# Back-compatible name: label -> job keys.
METHOD_ROWS = {k: v.keys for k, v in VARIANTS.items()}


def before_values(task: Task) -> tuple[str, ...]:
    values = faces.ATTRIBUTES[task.attribute]
    return tuple(v for v in values if v != task.after) if task.before == "*" else (task.before,)


@dataclass
class TaskResult:
    task: str
    method: str  # the variant's label
    n_pairs: int
    edit_success: float
    reverse_success: float
    base_after_rate: float
    preservation: float
    preservation_minus: float
    outside_change: float
    train_steps: int
    train_seconds: float
    edit_from_before: float | None = None
    reverse_from_after: float | None = None
    by_start: dict = field(default_factory=dict)
    weight: float = 1.0
    train_seed: int = 0
    pair_seed: int = 0
    prompt_seed: int = 0
    m: int = 0
    overrides: list = field(default_factory=list)
    extra: dict = field(default_factory=dict)
    world: str = "sd"


def write_pairs(folder: Path, task: str, n: int, seed: int) -> None:
    """N procedural pairs for a task, in difflora's pair layout (NAME.png / NAME_after.png + captions).
    The faces depend on (seed, n) only, so every task sees the same faces; a "*" start cycles
    through the other values."""
    t = TASKS[task]
    starts = before_values(t)
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng([seed, 31, n])
    for i in range(n):
        base = faces.sample_attributes(rng, held_out=False)
        face_seed = int(rng.integers(0, 2**31 - 1))
        ab, aa, x, y = faces.make_pair(face_seed, t.attribute, starts[i % len(starts)], t.after, base=base)
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
    attribute = TASKS[task].attribute
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


def _share(flags) -> float | None:
    flags = list(flags)
    return float(np.mean(flags)) if flags else None


def judged_metrics(task: str, j_minus: list[dict], j_zero: list[dict], j_plus: list[dict]) -> dict:
    """Success and preservation rates from judged -w / 0 / +w images of the same seeds."""
    t = TASKS[task]
    attribute, after, befores = t.attribute, t.after, before_values(t)
    others = [a for a in faces.CAPTION_ORDER if a != attribute]
    triples = list(zip(j_minus, j_zero, j_plus))
    by_start = {}
    for v in faces.ATTRIBUTES[attribute]:
        group = [(mi, pl) for mi, z, pl in triples if z[attribute] == v]
        if group:
            by_start[v] = {"n": len(group), "edit": _share(pl[attribute] == after for _, pl in group),
                           "reverse": _share(mi[attribute] in befores for mi, _ in group)}
    return {
        "edit_success": _share(p[attribute] == after for p in j_plus),
        "edit_from_before": _share(p[attribute] == after for _, z, p in triples if z[attribute] in befores),
        "reverse_success": _share(mi[attribute] in befores for mi in j_minus),
        "reverse_from_after": _share(mi[attribute] in befores for mi, z, _ in triples if z[attribute] == after),
        "base_after_rate": _share(z[attribute] == after for z in j_zero),
        "preservation": _share(all(p[a] == z[a] for a in others) for p, z in zip(j_plus, j_zero)),
        "preservation_minus": _share(all(mi[a] == z[a] for a in others) for mi, z in zip(j_minus, j_zero)),
        "by_start": by_start,
        # Which attributes a LoRA disturbs, for diagnosing a low preservation score.
        "extra": {"changed_by_plus": {a: _share(p[a] != z[a] for p, z in zip(j_plus, j_zero)) for a in others}},
    }


def score(model, lora_path: Path, task: str, m: int, seed: int, judge, steps: int = 20, cfg: float = 4.0,
          weight: float = 1.0):
    """Judge M generations at -weight, 0, +weight; returns (metrics, images by multiplier)."""
    from tqdm import tqdm

    from ..generate import GenerationRequest, generate, progress_total
    from ..network.apply import network_from_file

    prompts = eval_prompts(task, m, seed)
    seeds = [seed * 7919 + i for i in range(m)]
    net = network_from_file(model, lora_path, 1.0)
    mults = (-weight, 0.0, weight)
    req = GenerationRequest(prompts=[p for mu in mults for p in prompts], seeds=seeds * 3, steps=steps, cfg=cfg)
    req.multipliers = {0: [mu for mu in mults for _ in prompts]}
    with tqdm(total=progress_total(req), desc=f"{task}: generating {3 * m} images", unit="step",
              dynamic_ncols=True, disable=None, leave=False) as bar:
        images = generate(model, [net], req, progress=bar)
    net.remove()
    if images[0].shape[0] != faces.SIZE:  # test-sized models: score at the face world's size
        images = [np.asarray(Image.fromarray(im).resize((faces.SIZE, faces.SIZE), Image.BILINEAR)) for im in images]
    minus, zero, plus = images[:m], images[m:2 * m], images[2 * m:]
    judged = []
    for part in tqdm((minus, zero, plus), desc=f"{task}: judging at -{weight:g} / 0 / +{weight:g}", unit="set",
                     dynamic_ncols=True, disable=None, leave=False):
        judged.append(judge.predict(part))
    metrics = judged_metrics(task, *judged)
    region = region_mask(TASKS[task].attribute)
    outside = ~region if region is not None else np.ones((faces.SIZE, faces.SIZE), bool)
    change = [np.abs(p.astype(np.float32) - z.astype(np.float32)).mean(axis=2)[outside].mean() / 255
              for p, z in zip(plus, zero)]
    metrics["outside_change"] = float(np.mean(change))
    return metrics, {"-1": minus, "0": zero, "+1": plus}


def edit_inputs(task: str, m: int, seed: int) -> list[tuple[dict, dict, np.ndarray, np.ndarray]]:
    """M held-out faces (evaluation render seeds, never a training pair's) as (before attributes, after attributes,
    before image, after image); a "*" start cycles through the other values."""
    from .judge import EVAL_SEED_BASE

    t = TASKS[task]
    starts = before_values(t)
    rng = np.random.default_rng([seed, 59])
    return [faces.make_pair(EVAL_SEED_BASE + 7919 * seed + i, t.attribute, starts[i % len(starts)], t.after, rng=rng)
            for i in range(m)]


def score_edit(model, lora_path: Path, task: str, m: int, seed: int, judge, steps: int = 20, cfg: float = 4.0,
               weight: float = 1.0, reverse: bool = False):
    """Edit metrics (module docstring) of an edit LoRA on M held-out "before" images (and, with `reverse`, their
    "after" images at -weight); returns (metrics, images by multiplier)."""
    from tqdm import tqdm

    from ..data.images import resize_and_crop
    from ..generate import GenerationRequest, generate, progress_total
    from ..network.apply import network_from_file
    from .flow_model import instruction

    t = TASKS[task]
    attribute, befores = t.attribute, before_values(t)
    others = [a for a in faces.CAPTION_ORDER if a != attribute]
    inputs = edit_inputs(task, m, seed)
    before = [p[2] for p in inputs]
    after = [p[3] for p in inputs]
    runs = [(0.0, before), (weight, before)] + ([(-weight, after)] if reverse else [])

    def as_control(image):  # as generate --control sizes it
        return [resize_and_crop(Image.fromarray(image), model.control_size(image.shape[1], image.shape[0]))]

    prompt = instruction(attribute, t.after)
    req = GenerationRequest(prompts=[prompt] * (m * len(runs)), seeds=[seed * 7919 + i for i in range(m)] * len(runs),
                            steps=steps, cfg=cfg, controls=[as_control(im) for _, ims in runs for im in ims])
    req.multipliers = {0: [mu for mu, _ in runs for _ in range(m)]}
    net = network_from_file(model, lora_path, 1.0)
    try:
        with tqdm(total=progress_total(req), desc=f"{task}: editing {len(req.prompts)} images", unit="step",
                  dynamic_ncols=True, disable=None, leave=False) as bar:
            images = generate(model, [net], req, progress=bar)
    finally:
        net.remove()
    if images[0].shape[0] != faces.SIZE:
        images = [np.asarray(Image.fromarray(im).resize((faces.SIZE, faces.SIZE), Image.BILINEAR)) for im in images]
    parts = [images[k * m:(k + 1) * m] for k in range(len(runs))]
    j_before, j_zero, j_plus = judge.predict(before), judge.predict(parts[0]), judge.predict(parts[1])
    j_after, j_minus = (judge.predict(after), judge.predict(parts[2])) if reverse else ([], [])

    def kept(outs, ins):
        return _share(all(o[a] == i[a] for a in others) for o, i in zip(outs, ins))

    region = region_mask(attribute)
    outside = ~region if region is not None else np.ones((faces.SIZE, faces.SIZE), bool)
    by_start = {}
    for v in befores:
        idx = [i for i, p in enumerate(inputs) if p[0][attribute] == v]
        by_start[v] = {"n": len(idx), "edit": _share(j_plus[i][attribute] == t.after for i in idx),
                       "reverse": _share(j_minus[i][attribute] == v for i in idx) if reverse else None}
    metrics = {
        "edit_success": _share(p[attribute] == t.after for p in j_plus),
        "edit_from_before": _share(p[attribute] == t.after for p, i in zip(j_plus, j_before)
                                   if i[attribute] in befores),
        "reverse_success": _share(mi[attribute] in befores for mi in j_minus) if reverse else None,
        "reverse_from_after": _share(mi[attribute] in befores for mi, i in zip(j_minus, j_after)
                                     if i[attribute] == t.after) if reverse else None,
        "base_after_rate": _share(z[attribute] == t.after for z in j_zero),
        "preservation": kept(j_plus, j_before),
        "preservation_minus": kept(j_minus, j_after) if reverse else None,
        "outside_change": float(np.mean([np.abs(o.astype(np.float32) - i.astype(np.float32)).mean(axis=2)[outside]
                                         .mean() / 255 for o, i in zip(parts[1], before)])),
        "by_start": by_start,
        "extra": {"protocol": "edit", "base_preservation": kept(j_zero, j_before),
                  "changed_by_plus": {a: _share(p[a] != i[a] for p, i in zip(j_plus, j_before)) for a in others}},
    }
    return metrics, {"-1": parts[2] if reverse else after, "0": parts[0], "+1": parts[1]}


def _variant(label: str) -> Variant:
    variant = VARIANTS.get(label) or EDIT_VARIANTS.get(label)
    if variant is None:
        from ..errors import UserError

        raise UserError(f"unknown eval method {label!r}", hint=f"choose from {', '.join([*VARIANTS, *EDIT_VARIANTS])}")
    return variant


def is_edit_variant(label: str) -> bool:
    """Whether the variant conditions on a control image (scored by `score_edit`)."""
    return label in EDIT_VARIANTS


def _trains_on_pairs(label: str) -> bool:
    """Whether the variant's method learns from pairs (the others get the 'after' images as a plain dataset)."""
    from ..methods import METHODS

    return METHODS[_variant(label).keys["method"]].needs_pairs


def _merge(into: dict, keys: dict) -> dict:
    for k, v in keys.items():
        into[k] = _merge(dict(into.get(k, {})), v) if isinstance(v, dict) else v
    return into


def eval_job(task: str, method: str, n_pairs: int, work: Path, model_path, seed: int,
             overrides: list[str] | None = None):
    """The validated job one variant trains for one task (`seed`: the training seed; `overrides`:
    --set KEY=VALUE strings, applied after the variant's own keys)."""
    from pydantic import ValidationError

    from ..config import JobConfig, format_errors, apply_method_defaults, apply_overrides

    keys = _variant(method).keys
    job_data = {"output_dir": str(work / "out"), "output_name": f"{task}_{n_pairs}_{method}", "log_with": "none",
                "seed": seed, "overwrite": True, "model": str(model_path) if model_path else None}
    if is_edit_variant(method):  # the flow world's edit training's wording (toy/flow_model.py)
        from .flow_model import instruction

        job_data["edit_instruction"] = instruction(TASKS[task].attribute, TASKS[task].after)
    if not _trains_on_pairs(method):  # the standard-LoRA baseline: the 'after' halves alone
        job_data["train_data_dir"] = str(work / f"after_{task}_{n_pairs}")
    else:
        job_data["datasets"] = [{"subsets": [{"image_dir": str(work / f"pairs_{task}_{n_pairs}"),
                                              "caption_extension": ".txt"}]}]
    job_data["train_batch_size"] = min(n_pairs, 4)
    _merge(job_data, keys)
    apply_overrides(job_data, overrides or [])
    try:
        return apply_method_defaults(JobConfig.model_validate(job_data))
    except ValidationError as e:
        raise format_errors(e, "", "--set") from None


def _flat(data: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in data.items():
        if isinstance(v, dict):
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


# not part of what a cell trains: where it goes, and how previews would be drawn (sample_sampler's default became
# "the family's own", None, which for the toy U-Net is the baseline's ddim)
_UNKEYED = {"output_dir", "output_name", "datasets", "train_data_dir", "model", "seed", "sample_sampler"}
_BASELINE = Path(__file__).resolve().parent.parent / "assets" / "eval_baseline.json"


def _plain_settings() -> dict:
    """A plain job's flat settings: the baseline's values, and today's defaults for keys added since."""
    from ..config import JobConfig

    plain = _flat(JobConfig.model_validate({"train_data_dir": "."}).model_dump(mode="json"))
    return {**plain, **json.loads(_BASELINE.read_text(encoding="utf-8"))}


@dataclass(frozen=True)
class Cell:
    """One measurement: a variant trained on a task's pairs with given seeds, scored on M prompts."""

    task: str
    label: str
    n_pairs: int
    train_seed: int = 0
    pair_seed: int = 0
    prompt_seed: int = 0
    m: int = 64
    overrides: tuple[str, ...] = ()
    weight: float | None = None  # None: the variant's weight
    world: str = "sd"  # toy/worlds.py

    def settings(self) -> str:
        """The resolved training settings that differ from a plain job's as of the suite's first
        cells (`assets/eval_baseline.json`, method tables included), without paths and seeds: a
        default changed since then changes them (so its cells are retrained), a new option at its
        default does not."""
        job = eval_job(self.task, self.label, self.n_pairs, Path("."), None, 0, list(self.overrides))
        plain = _plain_settings()
        from ..methods import METHODS

        others = set(METHODS) - {job.method}  # another method's table does not shape this training
        own = {k: v for k, v in _flat(job.model_dump(mode="json")).items()
               if k.split(".")[0] not in _UNKEYED | others and (k not in plain or plain[k] != v)}
        if own.get("addift.min_timestep") == "auto":  # the rule's constants shape the training too
            from ..methods.addift import GLOBAL_COVERAGE, GLOBAL_MIN_TIMESTEP, LOCAL_MIN_TIMESTEP

            own["addift.min_timestep"] = f"auto {LOCAL_MIN_TIMESTEP}/{GLOBAL_MIN_TIMESTEP} at {GLOBAL_COVERAGE:g}"
        return json.dumps(own, sort_keys=True, default=str)

    @property
    def load_weight(self) -> float:
        return _variant(self.label).weight if self.weight is None else self.weight

    def key(self) -> str:
        digest = hashlib.sha256(self.settings().encode()).hexdigest()[:8]
        w = "" if self.load_weight == _variant(self.label).weight else f"_w{self.load_weight:g}"
        world = "" if self.world == "sd" else f"{self.world}_"
        return (f"{world}{self.task}_{self.label}{w}_p{self.n_pairs}_t{self.train_seed}_s{self.pair_seed}"
                f"_e{self.prompt_seed}_m{self.m}_{digest}")


def train_one(task: str, method: str, n_pairs: int, work: Path, model_path, seed: int,
              overrides: list[str] | None = None, pair_seed: int | None = None) -> tuple[Path, int, float]:
    """Train one variant on one task's pairs: (LoRA file, steps, wall seconds)."""
    from ..network.files import read_metadata_only
    from ..train.loop import train

    pairs = work / f"pairs_{task}_{n_pairs}"
    if not pairs.exists():
        write_pairs(pairs, task, n_pairs, seed if pair_seed is None else pair_seed)
    if not _trains_on_pairs(method):
        data = work / f"after_{task}_{n_pairs}"
        if not data.exists():
            write_after_images(data, pairs)
    job = eval_job(task, method, n_pairs, work, model_path, seed, overrides)
    t0 = time.time()
    with contextlib.redirect_stderr(io.StringIO()):
        path = train(job)
    seconds = time.time() - t0
    return path, int(read_metadata_only(path).get("ss_steps", 0)), round(seconds, 2)


def run_one(task: str, method: str, n_pairs: int, work: Path, model_path, seed: int, m: int, judge,
            overrides: list[str] | None = None, model=None, pair_seed: int | None = None,
            prompt_seed: int | None = None, weight: float | None = None):
    """Train one variant on one task and score it (seeds default to `seed`)."""
    cell = Cell(task, method, n_pairs, seed, seed if pair_seed is None else pair_seed,
                seed if prompt_seed is None else prompt_seed, m, tuple(overrides or ()), weight)
    path, steps, seconds = train_one(task, method, n_pairs, work, model_path, seed, overrides, cell.pair_seed)
    return _scored(cell, path, steps, seconds, model_path, judge, model)


def _scored(cell: "Cell", lora: Path, steps: int, seconds: float, model_path, judge, model):
    from ..methods import METHODS
    from ..models import load_model

    model = model or load_model(model_path)
    if is_edit_variant(cell.label):
        metrics, images = score_edit(model, lora, cell.task, cell.m, cell.prompt_seed, judge, weight=cell.load_weight,
                                     reverse=METHODS[_variant(cell.label).keys["method"]].trains_both_directions)
    else:
        metrics, images = score(model, lora, cell.task, cell.m, cell.prompt_seed, judge, weight=cell.load_weight)
    result = TaskResult(cell.task, cell.label, cell.n_pairs, train_steps=steps, train_seconds=seconds,
                        weight=cell.load_weight, train_seed=cell.train_seed, pair_seed=cell.pair_seed,
                        prompt_seed=cell.prompt_seed, m=cell.m, overrides=list(cell.overrides), world=cell.world,
                        **metrics)
    return result, images


def run_cells(cells: list["Cell"], cache: Path, model_path, judge, model, grids: bool = False,
              cached_only: bool = False, keep_loras: bool = False) -> list[TaskResult]:
    """Cells that differ only in load weight: cached results, the rest from one training, then cached
    (`cached_only`: only the cached ones; `keep_loras`: the trained LoRA kept as <first cell's key>.safetensors)."""
    from ..fileio import write_json_atomic
    from ..generate import make_grid

    results: dict[int, TaskResult] = {}
    for i, cell in enumerate(cells):
        path = cache / f"{cell.key()}.json"
        if path.exists():
            data = json.loads(path.read_text(encoding="utf-8"))
            if "reverse_from_after" not in data:  # cells measured before the field existed
                data["reverse_from_after"] = data["by_start"].get(TASKS[cell.task].after, {}).get("reverse")
            results[i] = TaskResult(**data)
    todo = [i for i in range(len(cells)) if i not in results]
    if todo and not cached_only:
        c0 = cells[todo[0]]
        log.info("eval: %s, %s, %d pair(s), training seed %d", c0.task, c0.label, c0.n_pairs, c0.train_seed)
        cache.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(prefix="difflora-eval-") as tmp:
            lora, steps, seconds = train_one(c0.task, c0.label, c0.n_pairs, Path(tmp), model_path, c0.train_seed,
                                             list(c0.overrides), c0.pair_seed)
            if keep_loras:
                from ..fileio import atomic_path

                with atomic_path(cache / f"{c0.key()}.safetensors") as kept:
                    shutil.copyfile(lora, kept)
            for i in todo:
                r, images = _scored(cells[i], lora, steps, seconds, model_path, judge, model)
                log.info("  weight %g: edit %s  reverse %s  preservation %s  %d steps  %.1f s", r.weight,
                         _pct(r.edit_success), _pct(r.reverse_success), _pct(r.preservation), r.train_steps,
                         r.train_seconds)
                write_json_atomic(cache / f"{cells[i].key()}.json", asdict(r))
                if grids:
                    rows = [[images["-1"][k], images["0"][k], images["+1"][k]] for k in range(min(4, cells[i].m))]
                    w = f"{r.weight:g}"
                    make_grid(rows, [f"-{w}", "0", f"+{w}"], [f"#{k}" for k in range(len(rows))], scale=2).save(
                        cache / f"{cells[i].key()}.png")
                results[i] = r
    return [results[i] for i in range(len(cells)) if i in results]


def _pct(x: float | None) -> str:
    return "–" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.0%}"


def _start_text(r: TaskResult) -> str:
    return " ".join(f"{v}:{_pct(s['edit'])}" for v, s in r.by_start.items())


def markdown_table(results: list[TaskResult]) -> str:
    """One row per cell."""
    head = ("| task | pairs | method | seed | edit +w | from before | reverse -w | base rate | preservation | "
            "outside change | steps | train s | edit by start value |\n"
            "|---|---|---|---|---|---|---|---|---|---|---|---|---|\n")
    rows = [f"| {r.task} | {r.n_pairs} | {_label(r)} | {r.train_seed} | {_pct(r.edit_success)} | "
            f"{_pct(r.edit_from_before)} | {_pct(r.reverse_success)} | {_pct(r.base_after_rate)} | "
            f"{_pct(r.preservation)} | {r.outside_change:.4f} | {r.train_steps} | {r.train_seconds:.1f} | "
            f"{_start_text(r)} |" for r in results]
    return head + "\n".join(rows) + "\n"


def _label(r: TaskResult) -> str:
    w = "" if r.weight == VARIANTS.get(r.method, Variant({})).weight else f" @{r.weight:g}"
    return r.method + w


def _mean(xs) -> float:
    xs = [x for x in xs if x is not None]
    return float(np.mean(xs)) if xs else float("nan")


def summarize(results: list[TaskResult]) -> dict:
    """Per (variant, pairs): each task's mean over training seeds, then the mean and the worst task."""
    metrics = ("edit_success", "edit_from_before", "reverse_success", "reverse_from_after", "preservation",
               "outside_change",
               "train_seconds", "train_steps")
    cells: dict[tuple, dict[str, list[TaskResult]]] = {}
    for r in results:
        cells.setdefault((_label(r), r.n_pairs), {}).setdefault(r.task, []).append(r)
    out = {}
    for (label, n), tasks in cells.items():
        per_task = {t: {k: _mean(getattr(r, k) for r in rs) for k in metrics} | {"seeds": sorted(r.train_seed for r in rs)}
                    for t, rs in tasks.items()}
        summary = {k: _mean(v[k] for v in per_task.values()) for k in metrics}
        for k in ("edit_success", "reverse_success", "preservation"):
            worst = min(per_task, key=lambda t: per_task[t][k])
            summary[f"worst_{k}"] = {"task": worst, "value": per_task[worst][k]}
        out[f"{label} ({n} pairs)"] = {"label": label, "n_pairs": n, "tasks": per_task, "summary": summary}
    return out


def summary_table(summary: dict) -> str:
    """Mean and worst task per variant, then each task's seed-mean per variant."""
    head = ("| method | pairs | tasks | seeds | mean edit | worst edit | mean reverse | worst reverse | "
            "mean preservation | worst preservation | edit from before | reverse from after | "
            "mean outside change | mean train s |\n"
            "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|\n")
    rows = []
    for s in summary.values():
        m = s["summary"]
        seeds = sorted({x for t in s["tasks"].values() for x in t["seeds"]})
        w = {k: m[f"worst_{k}"] for k in ("edit_success", "reverse_success", "preservation")}
        rows.append(f"| {s['label']} | {s['n_pairs']} | {len(s['tasks'])} | {','.join(map(str, seeds))} | "
                    f"{_pct(m['edit_success'])} | {_pct(w['edit_success']['value'])} ({w['edit_success']['task']}) | "
                    f"{_pct(m['reverse_success'])} | {_pct(w['reverse_success']['value'])} "
                    f"({w['reverse_success']['task']}) | {_pct(m['preservation'])} | "
                    f"{_pct(w['preservation']['value'])} ({w['preservation']['task']}) | "
                    f"{_pct(m['edit_from_before'])} | {_pct(m['reverse_from_after'])} | {m['outside_change']:.4f} | "
                    f"{m['train_seconds']:.1f} |")
    tasks = sorted({t for s in summary.values() for t in s["tasks"]}, key=lambda t: list(TASKS).index(t))
    grid_head = "| method | " + " | ".join(tasks) + " |\n|---|" + "---|" * len(tasks) + "\n"
    grid = []
    for s in summary.values():
        cells = []
        for t in tasks:
            v = s["tasks"].get(t)
            cells.append("–" if v is None else f"{_pct(v['edit_success'])} / {_pct(v['reverse_success'])} / "
                                              f"{_pct(v['preservation'])} / {v['outside_change']:.3f}")
        grid.append(f"| {s['label']} ({s['n_pairs']}) | " + " | ".join(cells) + " |")
    return (head + "\n".join(rows) + "\n\nPer task (mean over training seeds): edit / reverse / preservation / outside change\n\n"
            + grid_head + "\n".join(grid) + "\n")


def evaluate(tasks: list[str], methods: list[str], pair_counts: list[int], out: Path, model_path=None, seed: int = 0,
             m: int = 64, overrides: list[str] | None = None, train_seeds: list[int] | None = None,
             pair_seed: int | None = None, prompt_seed: int | None = None, weights: list[float] | None = None,
             grids: bool = False, cached_only: bool = False, write_summary: bool = True,
             keep_loras: bool = False, world: str = "sd") -> list[TaskResult]:
    """Every (task, pairs, variant, training seed, load weight) cell, cached under out/cells (one
    training serves every weight) on `world`'s model (`model_path`: None for the sd world's embedded one);
    writes eval.json (cells and summary) and eval.md (summary and
    per-cell tables) unless `write_summary` is false (a caller that reports several runs together)."""
    from ..fileio import write_json_atomic, write_text_atomic
    from ..models import load_model
    from .judge import load_judge

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    judge = None if cached_only else load_judge()
    model = None if cached_only else load_model(model_path)
    train_seeds = train_seeds or [seed]
    results: list[TaskResult] = []
    for task in tasks:
        for n in pair_counts:
            for method in methods:
                if method.endswith("-avg") and n == 1:
                    continue  # averaging one pair is the method itself
                for ts in train_seeds:
                    cells = [Cell(task, method, n, ts, seed if pair_seed is None else pair_seed,
                                  seed if prompt_seed is None else prompt_seed, m, tuple(overrides or ()), w, world)
                             for w in (weights or [None])]
                    results += run_cells(cells, out / "cells", model_path, judge, model, grids=grids,
                                         keep_loras=keep_loras,
                                         cached_only=cached_only)
                    if write_summary:
                        write_json_atomic(out / "eval.json", {"world": world, "cells": [asdict(r) for r in results],
                                                              "summary": summarize(results)})
    if write_summary:
        write_text_atomic(out / "eval.md", summary_table(summarize(results)) + "\n" + markdown_table(results))
    return results
