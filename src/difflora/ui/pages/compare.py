"""Compare: a base model and one or more LoRAs, one prompt and seed, a multiplier sweep each, side by side."""

from __future__ import annotations

import time
import uuid
from pathlib import Path

from ...errors import UserError
from ..pickers import lora_choices, model_choices, refresh_on_focus
from ..subcommand import run_cli
from ..workspace import safe_name


def compare(ctx, model: str, loras: list[str], prompt: str, seed: int, sweep: str, n_images: int,
            steps: int, cfg: float, progress=lambda fraction, desc: None) -> list[tuple[str, str]]:
    if not loras:
        raise UserError("choose at least one LoRA")
    if not prompt.strip():
        raise UserError("give a prompt")
    out = ctx.ws.root / "compare" / (time.strftime("%Y%m%d-%H%M%S") + "-" + uuid.uuid4().hex[:4])
    base = ["--model", str(ctx.ws.resolve(model, "model", role="read"))] if model.strip() else []
    grids = []
    for i, lora in enumerate(loras):
        progress(i / len(loras), f"LoRA {i + 1} of {len(loras)}: {Path(lora).stem}")
        path = ctx.ws.resolve(lora, "LoRA")
        folder = out / safe_name(Path(lora).stem)
        run_cli(["generate", *base, "--lora", f"{path}:1", "--sweep", sweep, "--prompt", prompt, "--seed", str(int(seed)),
                 "--n-images", str(int(n_images)), "--steps", str(int(steps)), "--cfg", str(cfg), "--out", str(folder)],
                ctx.ws.root)
        grids.append((str(folder / "000_grid.png"), ctx.ws.relative(path)))
    return grids


def build(ctx) -> None:
    import gradio as gr

    with gr.Row():
        model = gr.Dropdown(label="base model", choices=model_choices(ctx.ws), value="", allow_custom_value=True,
                            elem_id="cmp-model")
        loras = gr.Dropdown(label="LoRAs (by run and name)", choices=lora_choices(ctx.ws), multiselect=True,
                            elem_id="cmp-loras")
    with gr.Row():
        prompt = gr.Textbox(label="prompt", value="a face", elem_id="cmp-prompt")
        seed = gr.Number(label="seed", value=1, precision=0, elem_id="cmp-seed")
        sweep = gr.Textbox(label="multipliers", value="-1,0,1", elem_id="cmp-sweep")
        n_images = gr.Number(label="images (seeds)", value=2, precision=0, elem_id="cmp-n")
        steps = gr.Number(label="steps", value=20, precision=0, elem_id="cmp-steps")
        cfg = gr.Number(label="CFG", value=4.0, elem_id="cmp-cfg")
    go = gr.Button("Generate", variant="primary", elem_id="cmp-go")
    message = gr.Markdown(elem_id="cmp-message")
    grids = gr.Gallery(label="one grid per LoRA, side by side", columns=2, height="auto", object_fit="contain",
                       elem_id="cmp-grids")

    def on_go(m, ls, p, s, sw, n, st, c, progress=gr.Progress()):
        try:
            items = compare(ctx, m or "", ls or [], p or "", s or 0, sw or "-1,0,1", n or 1, st or 20, c or 4.0,
                            lambda fraction, desc: progress(fraction, desc=desc))
        except UserError as e:
            return [], f"**Refused:** {e}"
        return items, f"{len(items)} grid(s); rows are seeds, columns multipliers."

    go.click(on_go, [model, loras, prompt, seed, sweep, n_images, steps, cfg], [grids, message])
    refresh_on_focus(loras, lambda: lora_choices(ctx.ws))
    refresh_on_focus(model, lambda: model_choices(ctx.ws))
