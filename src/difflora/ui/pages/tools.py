"""Tools: merge, svd-merge, resize, extract and inspect, run as the CLI with the CLI's checks."""

from __future__ import annotations

from ...errors import UserError
from ..subcommand import run_cli


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
        return gr.update(choices=ctx.ws.files(".safetensors"))

    def runner(tool, names):
        def go(*values):
            try:
                text = run_cli(tool_argv(ctx, tool, dict(zip(names, values))), ctx.ws.root)
            except UserError as e:
                return f"**Refused:** {e}"
            return f"```\n{text}\n```"
        return go

    with gr.Tab("Merge"):
        m_loras = gr.Dropdown(label="LoRAs", multiselect=True, choices=ctx.ws.files(".safetensors"), elem_id="tool-merge-loras")
        with gr.Row():
            m_ratios = gr.Textbox(label="ratios (one per LoRA)", placeholder="1 -1", elem_id="tool-merge-ratios")
            m_model = gr.Textbox(label="merge into model (blank: LoRA + LoRA)", elem_id="tool-merge-model")
            m_mode = gr.Dropdown(label="mode", choices=["exact", "kohya"], value="exact")
            m_save = gr.Textbox(label="save to", value="tools/merged.safetensors", elem_id="tool-merge-save")
        m_go = gr.Button("Merge", variant="primary", elem_id="tool-merge-go")
        m_out = gr.Markdown(elem_id="tool-merge-out")
        m_go.click(runner("merge", ["loras", "ratios", "model", "mode", "save_to"]),
                   [m_loras, m_ratios, m_model, m_mode, m_save], m_out)
        m_loras.focus(loras, None, m_loras)
    with gr.Tab("SVD merge"):
        s_loras = gr.Dropdown(label="LoRAs", multiselect=True, choices=ctx.ws.files(".safetensors"))
        with gr.Row():
            s_ratios = gr.Textbox(label="ratios", placeholder="0.6 0.4")
            s_rank = gr.Number(label="new rank", value=4, precision=0)
            s_save = gr.Textbox(label="save to", value="tools/svd_merged.safetensors")
        s_go = gr.Button("SVD merge", variant="primary")
        s_out = gr.Markdown()
        s_go.click(runner("svd-merge", ["loras", "ratios", "new_rank", "save_to"]), [s_loras, s_ratios, s_rank, s_save],
                   s_out)
        s_loras.focus(loras, None, s_loras)
    with gr.Tab("Resize"):
        with gr.Row():
            r_lora = gr.Dropdown(label="LoRA", choices=ctx.ws.files(".safetensors"), allow_custom_value=True)
            r_rank = gr.Number(label="new rank", value=2, precision=0)
            r_dyn = gr.Dropdown(label="dynamic", choices=["", "sv_ratio", "sv_fro", "sv_cumulative"], value="")
            r_param = gr.Number(label="param", value=0.9)
            r_save = gr.Textbox(label="save to", value="tools/resized.safetensors")
        r_go = gr.Button("Resize", variant="primary")
        r_out = gr.Markdown()
        r_go.click(runner("resize", ["lora", "new_rank", "dynamic", "param", "save_to"]),
                   [r_lora, r_rank, r_dyn, r_param, r_save], r_out)
        r_lora.focus(loras, None, r_lora)
    with gr.Tab("Extract"):
        with gr.Row():
            e_org = gr.Textbox(label="original model")
            e_tuned = gr.Textbox(label="tuned model")
            e_dim = gr.Number(label="dim", value=4, precision=0)
            e_save = gr.Textbox(label="save to", value="tools/extracted.safetensors")
        e_go = gr.Button("Extract", variant="primary")
        e_out = gr.Markdown()
        e_go.click(runner("extract", ["model_org", "model_tuned", "dim", "save_to"]), [e_org, e_tuned, e_dim, e_save],
                   e_out)
    with gr.Tab("Inspect"):
        i_lora = gr.Dropdown(label="LoRA", choices=ctx.ws.files(".safetensors"), allow_custom_value=True,
                             elem_id="tool-inspect-lora")
        i_go = gr.Button("Inspect", variant="primary", elem_id="tool-inspect-go")
        i_out = gr.Markdown(elem_id="tool-inspect-out")
        i_go.click(runner("inspect", ["lora"]), [i_lora], i_out)
        i_lora.focus(loras, None, i_lora)
