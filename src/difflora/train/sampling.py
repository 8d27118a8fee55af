"""Sample images during training (kohya's sample_prompts), written to <output_dir>/sample/."""

from __future__ import annotations

from pathlib import Path

import torch

from ..network.lora import LoRANetwork
from .events import EventBus, SampleWritten


class Samples:
    def __init__(self, run, prompts, events: EventBus):
        self.run = run
        self.prompts = prompts
        self.events = events

    @torch.no_grad()
    def write(self, networks: list[LoRANetwork], step: int) -> list[Path]:
        """One image per prompt with networks[0] at the prompt's multiplier (default 1) and the rest as they are."""
        from ..generate import GenerationRequest, generate, parameters_text, save_png

        run, job = self.run, self.run.job
        training = [n.training for n in networks]
        multipliers = [[lora.multiplier for lora in n.loras()] for n in networks]
        for n in networks:
            n.eval()
        if job.sample_without_presets:
            for p in run.presets:
                p.unfuse()
        paths = []
        try:
            for i, sp in enumerate(self.prompts):
                seed = sp.seed if sp.seed is not None else job.seed + i
                req = GenerationRequest(prompts=[sp.prompt], seeds=[seed], negative=[sp.negative], steps=sp.steps,
                                        sampler=sp.sampler or job.sample_sampler, cfg=sp.cfg, width=sp.width,
                                        height=sp.height)
                mult = sp.extra.get("multiplier", 1.0)
                req.multipliers = {0: [mult]}
                img = generate(run.model, networks[:1], req)[0]
                params = parameters_text(sp.prompt, sp.negative, req.steps, req.sampler, req.cfg, seed,
                                         (img.shape[1], img.shape[0]), Path(run.model.source).name,
                                         [(job.output_name, mult)])
                path = run.out_dir / "sample" / f"{job.output_name}_{step:06d}_{i:02d}.png"
                save_png(img, path, params)
                paths.append(path)
        finally:
            if job.sample_without_presets:
                for p, spec in zip(run.presets, job.preset_loras):
                    p.fuse(spec.multiplier)
            for n, t, ms in zip(networks, training, multipliers):
                n.train(t)
                for lora, m in zip(n.loras(), ms):
                    lora.multiplier = m
        self.events.emit(SampleWritten(step=step, paths=[str(p) for p in paths]))
        return paths

    def write_result(self, final: dict[str, torch.Tensor], stage_networks: list[LoRANetwork], step: int) -> None:
        """Samples of the finished LoRA (the file the user gets), the stages' own networks off."""
        for net in stage_networks:
            net.set_multiplier(0.0)
        result = LoRANetwork.from_weights(self.run.model.lora_targets(conv=True), final).to(self.run.device).apply_to()
        try:
            self.write([result], step)
        finally:
            result.remove()
