"""Sample images during training (kohya's sample_prompts), written to <output_dir>/sample/.

Without `sample_sweep`: one image per prompt, the LoRA at the prompt's --m multiplier (default 1).
An edit model's prompt edits its `--ci` control images; for a method trained on controls (the edit methods,
addift.control) a prompt without one edits a pair's "before" image (and its NAME_ref1.png, ...): prompt i the i-th
pair, held-out pairs first.
With `sample_sweep = [-1, 0, 1]`: one grid per sampling step, a row per prompt and a column per
multiplier ("weight -1 / 0 / +1"), titled with the LoRA's name and the step.
"""

from __future__ import annotations

import contextlib
from pathlib import Path

import torch

from ..network.lora import LoRANetwork
from .events import EventBus, SampleWritten

GRID_TILE = 128  # small samples are upscaled to at least this many pixels in a grid, so they can be seen


def sample_control_paths(run, prompts) -> list[list[Path] | None]:
    """Each prompt's control image files or None: its `--ci` files, else for a method trained on controls the i-th
    pair's before image and references, held-out pairs first."""
    pairs = [it for it in run.data.validation_items + run.data.unique_items() if it.is_pair] \
        if run.method.samples_take_control() else []
    out = []
    for i, sp in enumerate(prompts):
        named = sp.extra.get("controls")
        pair = pairs[i % len(pairs)] if pairs else None
        paths = named or ([pair.path, *pair.ref_paths] if pair is not None else None)
        out.append([Path(p) for p in paths] if paths else None)
    return out


class Samples:
    def __init__(self, run, prompts, events: EventBus):
        self.run = run
        self.prompts = prompts
        self.events = events
        for sp in prompts:  # a sampler the family cannot use stops the run before its first step
            run.model.check_sampler(sp.sampler or run.job.sample_sampler or run.model.default_sampler)
        from ..generate import control_images

        self.control_paths = sample_control_paths(run, prompts)
        # read now (PIL, as the family's pipeline resizes them): a bad control image stops the run before step 1
        self.controls = [control_images(run.model, paths, f"sample prompt {sp.prompt!r} (--ci)") if paths else None
                         for sp, paths in zip(prompts, self.control_paths)]

    @contextlib.contextmanager
    def _sampling(self, networks: list[LoRANetwork]):
        """Networks in eval mode and (sample_without_presets) presets unfused; all restored afterwards."""
        from ..generate import lora_multipliers

        run, job = self.run, self.run.job
        training = [n.training for n in networks]
        if job.sample_without_presets:
            for p in run.presets:
                p.unfuse()
        try:
            with lora_multipliers(networks):
                yield [n.eval() for n in networks]
        finally:
            if job.sample_without_presets:
                for p, spec in zip(run.presets, job.preset_loras):
                    p.fuse(spec.multiplier)
            for n, t in zip(networks, training):
                n.train(t)

    @torch.no_grad()
    def write(self, networks: list[LoRANetwork], step: int) -> list[Path]:
        """Samples with networks[0] at each prompt's multiplier (or the sweep's), the others as they are."""
        from ..generate import GenerationRequest, generate, parameters_text, save_png, with_family_defaults

        run, job = self.run, self.run.job
        sweep = job.sample_sweep
        paths, rows = [], []
        with self._sampling(networks):
            for i, sp in enumerate(self.prompts):
                seed = sp.seed if sp.seed is not None else job.seed + i
                multipliers = list(sweep) if sweep else [sp.extra.get("multiplier", 1.0)]
                k = len(multipliers)
                req = with_family_defaults(run.model, GenerationRequest(
                    prompts=[sp.prompt] * k, seeds=[seed] * k, negative=[sp.negative] * k, steps=sp.steps,
                    sampler=sp.sampler or job.sample_sampler, cfg=sp.cfg, width=sp.width, height=sp.height,
                    multipliers={0: multipliers}, controls=[self.controls[i]] * k if self.controls[i] else None))
                images = generate(run.model, networks[:1], req)
                if sweep:
                    rows.append(images)
                    continue
                params = parameters_text(sp.prompt, sp.negative, req.steps, req.sampler, req.cfg, seed,
                                         (images[0].shape[1], images[0].shape[0]), Path(run.model.source).name,
                                         [(job.output_name, multipliers[0])])
                path = run.out_dir / "sample" / f"{job.output_name}_{step:06d}_{i:02d}.png"
                save_png(images[0], path, params)
                paths.append(path)
        if sweep and rows:
            paths.append(self._save_grid(rows, sweep, step))
        # the UI draws each row's control at its left (one entry per prompt = per grid row or per image)
        control = [[str(p) for p in ps] if ps else None for ps in self.control_paths]
        self.events.emit(SampleWritten(step=step, paths=[str(p) for p in paths],
                                       control=control if any(control) else None))
        return paths

    def _save_grid(self, rows, sweep: list[float], step: int) -> Path:
        from ..generate import make_grid, save_png, weight_label

        job = self.run.job
        title = f"{job.output_name} at step {step}"
        row_labels = None
        if len(self.prompts) == 1:
            title = f"{self.prompts[0].prompt} | {title}"
        else:
            row_labels = [p.prompt if len(p.prompt) <= 32 else p.prompt[:29] + "..." for p in self.prompts]
        scale = max(1, GRID_TILE // rows[0][0].shape[1])
        grid = make_grid(rows, col_labels=[weight_label(m) for m in sweep], row_labels=row_labels, scale=scale,
                         title=title)
        path = self.run.out_dir / "sample" / f"{job.output_name}_{step:06d}_sweep.png"
        save_png(grid, path, info={"lora": job.output_name, "step": step, "multipliers": list(sweep),
                                   "prompts": [p.prompt for p in self.prompts]})
        return path

    def write_result(self, final: dict[str, torch.Tensor], stage_networks: list[LoRANetwork], step: int) -> None:
        """Samples of the finished LoRA (the file the user gets), the stages' own networks off."""
        with contextlib.ExitStack() as scope:
            from ..generate import lora_multipliers

            scope.enter_context(lora_multipliers(stage_networks, {i: 0.0 for i in range(len(stage_networks))}))
            result = LoRANetwork.from_weights(self.run.model.lora_targets(conv=True), final).to(self.run.device)
            result.apply_to()
            scope.callback(result.remove)
            self.write([result], step)
