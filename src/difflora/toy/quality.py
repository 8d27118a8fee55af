"""How well a base model follows the face-world prompts, judged by the attribute judge."""

from __future__ import annotations

import itertools

import numpy as np

from . import faces


def held_out_prompts(n: int, seed: int = 0) -> tuple[list[str], list[dict[str, str]]]:
    """n full captions of attribute combinations that never appear in the base model's training set."""
    combos = faces.held_out_combinations()
    rng = np.random.default_rng([seed, 77])
    order = [combos[i] for i in rng.permutation(len(combos))]
    chosen = list(itertools.islice(itertools.cycle(order), n))
    return [faces.caption(c) for c in chosen], chosen


def base_model_quality(model, n: int = 256, steps: int = 20, sampler: str = "ddim", cfg: float = 4.0,
                       seed: int = 0, judge=None, return_images: bool = False, diversity: bool = True) -> dict:
    """Per-attribute accuracy of n held-out prompts' images; with `diversity`, also how much 4 seeds of one
    prompt differ (8 prompts: 32 more generations)."""
    from ..generate import GenerationRequest, generate
    from .judge import load_judge

    judge = judge or load_judge()
    prompts, combos = held_out_prompts(n, seed)
    seeds = [seed * 100_003 + i for i in range(n)]
    images = generate(model, [], GenerationRequest(prompts=prompts, seeds=seeds, steps=steps, sampler=sampler, cfg=cfg))
    judged = judge.predict(images)
    accuracy = {a: float(np.mean([j[a] == c[a] for j, c in zip(judged, combos)])) for a in faces.CAPTION_ORDER}
    result = {
        "n": n, "steps": steps, "sampler": sampler, "cfg": cfg,
        "accuracy": accuracy, "min_accuracy": min(accuracy.values()),
        "all_correct": float(np.mean([all(j[a] == c[a] for a in faces.CAPTION_ORDER) for j, c in zip(judged, combos)])),
    }
    if return_images:
        result["images"] = images
    if not diversity:
        return result
    # Diversity: the same prompt with different seeds should give visibly different faces.
    div_prompts = prompts[:8]
    div = generate(model, [], GenerationRequest(prompts=[p for p in div_prompts for _ in range(4)],
                                                seeds=[seed + 5000 + k for _ in div_prompts for k in range(4)],
                                                steps=steps, sampler=sampler, cfg=cfg))
    dists = []
    for i in range(len(div_prompts)):
        group = [d.astype(np.float32) / 255 for d in div[4 * i:4 * i + 4]]
        dists += [np.abs(a - b).mean() for a, b in itertools.combinations(group, 2)]
    result["seed_diversity_mean_abs_diff"] = float(np.mean(dists))
    result["seed_diversity_min_abs_diff"] = float(np.min(dists))
    if return_images:
        result["div_images"] = div
    return result
