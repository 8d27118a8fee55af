"""Tools: merge, svd-merge, resize, extract and inspect, run as the CLI with the CLI's checks.

An existing output is replaced only with "overwrite" ticked; a resize to a rank at or above the
file's says which rank it wrote; a merge whose result is zero everywhere says so.
"""

from __future__ import annotations

import json

from ...errors import UserError
from ..pickers import lora_choices, model_choices, refresh_on_focus
from ..subcommand import run_cli

WRITING = ("merge", "svd-merge", "resize", "extract")


def refuse_overwrite(ctx, save_to: str, overwrite: bool) -> None:
    path = ctx.ws.resolve(save_to or "", "save to")
    if path.exists() and not overwrite:
        raise UserError(f"{ctx.ws.relative(path)} exists; tick 'overwrite' to replace it, or choose another name")


def file_rank(ctx, lora: str) -> int:
    """The largest rank of a LoRA file's modules, read by `difflora inspect`."""
    info = json.loads(run_cli(["inspect", str(ctx.ws.resolve(lora, "LoRA")), "--json"], ctx.ws.root))
    return max(r for block in info["blocks"].values() for r in block["rank"])


def is_zero(path) -> bool:
    """Every module's effective delta is zero up to rounding (e.g. a LoRA merged with its negative): below 1e-5
    of what its factors could add up to (the delta of their absolute values)."""
    from ...network.adapters import group_modules, module_dense
    from ...network.files import load_lora

    lora = load_lora(path)
    for cls, parts in group_modules(lora.tensors, str(path)).values():
        if "dora_scale" in parts:
            return False  # a DoRA module rescales the base weight: never a zero change
        bound = float(module_dense(cls, {k: v.abs() for k, v in parts.items()}).abs().max())
        if float(module_dense(cls, parts).abs().max()) > 1e-5 * bound:
            return False
    return True


def notes_after(ctx, tool: str, f: dict, rank_before: int | None) -> list[str]:
    notes = []
    if tool == "resize" and rank_before is not None and int(f["new_rank"]) >= rank_before and not f.get("dynamic"):
        notes.append(f"the file's rank is {rank_before}: asking for {int(f['new_rank'])} wrote rank {rank_before} "
                     "(a resize never adds rank)")
    if tool in ("merge", "svd-merge") and is_zero(ctx.ws.resolve(f["save_to"], "save to")):
        notes.append("the merged LoRA is zero everywhere: the inputs cancel at these ratios")
    return notes


def _numbers(text: str, what: str) -> list[str]:
    values = [v for v in text.replace(",", " ").split() if v]
    try:
        [float(v) for v in values]
    except ValueError:
        raise UserError(f"{what}: numbers separated by spaces or commas, got {text!r}") from None
    return values


def tool_argv(ctx, tool: str, f: dict) -> list[str]:
    """The CLI arguments for a tool form; every path resolved inside the workspace."""
    r = ctx.ws.resolve
    if tool == "inspect":
        return ["inspect", str(r(f["lora"], "LoRA"))]
    out = ["--save-to", str(r(f["save_to"], "save to"))]
    if tool in ("merge", "svd-merge"):
        models = [str(r(m, "LoRA")) for m in f["loras"] or []]
        if not models:
            raise UserError("choose the LoRAs to merge")
        argv = [tool, "--models", *models]
        ratios = _numbers(f.get("ratios") or "", "ratios")
        if ratios:
            argv += ["--ratios", *ratios]
        if tool == "merge":
            if (f.get("model") or "").strip():
                argv += ["--model", str(r(f["model"], "model"))]
            argv += ["--mode", f.get("mode") or "exact"]
        else:
            argv += ["--new-rank", str(int(f["new_rank"]))]
        return argv + out
    if tool == "resize":
        argv = ["resize", "--model", str(r(f["lora"], "LoRA")), "--new-rank", str(int(f["new_rank"]))]
        if f.get("dynamic"):
            argv += ["--dynamic", f["dynamic"], "--param", str(float(f["param"]))]
        return argv + out
    if tool == "extract":
        return ["extract", "--model-org", str(r(f["model_org"], "model-org")), "--model-tuned",
                str(r(f["model_tuned"], "model-tuned")), "--dim", str(int(f["dim"]))] + out
    raise UserError(f"unknown tool {tool}")


def build(ctx) -> None:
    import gradio as gr

    def loras():
        return lora_choices(ctx.ws)

    def models():
        return model_choices(ctx.ws)

    def runner(tool, names):
        def go(*values, progress=gr.Progress()):
            f = dict(zip(names, values))
            try:
                progress(0.05, desc=f"{tool}: checking")
                if tool in WRITING:
                    refuse_overwrite(ctx, f["save_to"], f.get("overwrite", False))
                rank_before = file_rank(ctx, f["lora"]) if tool == "resize" else None
                progress(0.2, desc=f"{tool}: running")
                text = run_cli(tool_argv(ctx, tool, f), ctx.ws.root)
                progress(0.95, desc=f"{tool}: checking the result")
                notes = notes_after(ctx, tool, f, rank_before) if tool in WRITING else []
            except UserError as e:
                return f"**Refused:** {e}"
            return "".join(f"**Warning:** {n}  \n" for n in notes) + f"```\n{text}\n```"
        return go

    def overwrite_box(elem_id):
        return gr.Checkbox(label="overwrite", value=False, info="replace the file if it exists", elem_id=elem_id)

    with gr.Tab("Merge"):
        m_loras = gr.Dropdown(label="LoRAs", multiselect=True, choices=lora_choices(ctx.ws), elem_id="tool-merge-loras")
        with gr.Row():
            m_ratios = gr.Textbox(label="ratios (one per LoRA)", placeholder="1 -1", elem_id="tool-merge-ratios")
            m_model = gr.Dropdown(label="merge into model (blank: LoRA + LoRA)", choices=model_choices(ctx.ws),
                                  value="", allow_custom_value=True, elem_id="tool-merge-model")
            m_mode = gr.Dropdown(label="mode", choices=["exact", "kohya"], value="exact")
            m_save = gr.Textbox(label="save to", value="tools/merged.safetensors", elem_id="tool-merge-save")
            m_over = overwrite_box("tool-merge-overwrite")
        m_go = gr.Button("Merge", variant="primary", elem_id="tool-merge-go")
        m_out = gr.Markdown(elem_id="tool-merge-out")
        m_go.click(runner("merge", ["loras", "ratios", "model", "mode", "save_to", "overwrite"]),
                   [m_loras, m_ratios, m_model, m_mode, m_save, m_over], m_out)
        refresh_on_focus(m_loras, loras)
        refresh_on_focus(m_model, models)
    with gr.Tab("SVD merge"):
        s_loras = gr.Dropdown(label="LoRAs", multiselect=True, choices=lora_choices(ctx.ws))
        with gr.Row():
            s_ratios = gr.Textbox(label="ratios", placeholder="0.6 0.4")
            s_rank = gr.Number(label="new rank", value=4, precision=0)
            s_save = gr.Textbox(label="save to", value="tools/svd_merged.safetensors")
            s_over = overwrite_box("tool-svd-overwrite")
        s_go = gr.Button("SVD merge", variant="primary")
        s_out = gr.Markdown()
        s_go.click(runner("svd-merge", ["loras", "ratios", "new_rank", "save_to", "overwrite"]),
                   [s_loras, s_ratios, s_rank, s_save, s_over], s_out)
        refresh_on_focus(s_loras, loras)
    with gr.Tab("Resize"):
        with gr.Row():
            r_lora = gr.Dropdown(label="LoRA", choices=lora_choices(ctx.ws), allow_custom_value=True,
                                 elem_id="tool-resize-lora")
            r_rank = gr.Number(label="new rank", value=2, precision=0, elem_id="tool-resize-rank")
            r_dyn = gr.Dropdown(label="dynamic", choices=["", "sv_ratio", "sv_fro", "sv_cumulative"], value="")
            r_param = gr.Number(label="param", value=0.9)
            r_save = gr.Textbox(label="save to", value="tools/resized.safetensors", elem_id="tool-resize-save")
            r_over = overwrite_box("tool-resize-overwrite")
        r_go = gr.Button("Resize", variant="primary", elem_id="tool-resize-go")
        r_out = gr.Markdown(elem_id="tool-resize-out")
        r_go.click(runner("resize", ["lora", "new_rank", "dynamic", "param", "save_to", "overwrite"]),
                   [r_lora, r_rank, r_dyn, r_param, r_save, r_over], r_out)
        refresh_on_focus(r_lora, loras)
    with gr.Tab("Extract"):
        with gr.Row():
            e_org = gr.Dropdown(label="original model", choices=model_choices(ctx.ws), allow_custom_value=True)
            e_tuned = gr.Dropdown(label="tuned model", choices=model_choices(ctx.ws), allow_custom_value=True)
            e_dim = gr.Number(label="dim", value=4, precision=0)
            e_save = gr.Textbox(label="save to", value="tools/extracted.safetensors")
            e_over = overwrite_box("tool-extract-overwrite")
        e_go = gr.Button("Extract", variant="primary")
        e_out = gr.Markdown()
        e_go.click(runner("extract", ["model_org", "model_tuned", "dim", "save_to", "overwrite"]),
                   [e_org, e_tuned, e_dim, e_save, e_over], e_out)
        for picker in (e_org, e_tuned):
            refresh_on_focus(picker, models)
    with gr.Tab("Inspect"):
        i_lora = gr.Dropdown(label="LoRA", choices=lora_choices(ctx.ws), allow_custom_value=True,
                             elem_id="tool-inspect-lora")
        i_go = gr.Button("Inspect", variant="primary", elem_id="tool-inspect-go")
        i_out = gr.Markdown(elem_id="tool-inspect-out")
        i_go.click(runner("inspect", ["lora"]), [i_lora], i_out)
        refresh_on_focus(i_lora, loras)
