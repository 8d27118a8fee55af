"""Evaluate (embedded world): queue `difflora eval` for a task and method; its progress, table, before/after
grids and trained LoRA show here (and on Runs). The LoRA is kept (`--keep-loras`), so it can be compared."""

from __future__ import annotations

from ...errors import UserError
from ..runs import Run, log_tail, new_run_id, status_text
from . import QUIET


def build(ctx):
    """The page; returns (its run picker, the picker's update on page load: the newest evaluation)."""
    import gradio as gr

    from ...toy.evaluate import METHOD_ROWS, TASKS

    gr.Markdown("Trains the method at its defaults on procedural pairs of the task, then judges held-out generations "
                "at multipliers -1, 0, +1 (edit success, reverse success, preservation). Runs in the queue; the "
                "table and the before/after grids appear here and on the Runs page.")
    with gr.Row():
        task = gr.Dropdown(label="task", choices=list(TASKS), value="eyes", elem_id="eval-task")
        method = gr.Dropdown(label="method", choices=list(METHOD_ROWS), value="addift", elem_id="eval-method")
        pairs = gr.Number(label="pairs", value=4, precision=0, elem_id="eval-pairs")
        m = gr.Number(label="judged generations", value=16, precision=0, elem_id="eval-m")
    go = gr.Button("Queue evaluation", variant="primary", elem_id="eval-go")
    message = gr.Markdown(elem_id="eval-message")
    pick = gr.Dropdown(label="evaluation run", choices=[], elem_id="eval-pick")
    state = gr.Markdown(elem_id="eval-progress")
    table = gr.Markdown(elem_id="eval-table")
    grids = gr.Gallery(label="before/after grids", columns=1, height="auto", object_fit="contain", elem_id="eval-grids")

    def choices():
        return [r.id for r in ctx.store.all() if r.kind == "eval"]

    def on_go(t, me, n, k):
        try:
            if int(n or 0) < 1 or int(k or 0) < 1:
                raise UserError("pairs and judged generations must be at least 1")
            run_id = new_run_id(f"eval-{t}-{me}")
            folder = ctx.store.folder(run_id)
            argv = ["eval", "--task", t, "--method", me, "--pairs", str(int(n)), "--m", str(int(k)),
                    "--out", str(folder / "results"), "--grids", "--keep-loras"]
            ctx.runner.submit(Run(run_id, "eval", f"eval {t} {me}", argv,
                                  info={"expected_result": str(folder / "results")}))
        except UserError as e:
            return f"**Refused:** {e}", gr.update()
        return f"Queued `{run_id}`.", gr.update(choices=choices(), value=run_id)

    def show(run_id):
        if not run_id:
            return "", "", []
        try:
            run = ctx.store.get(run_id)
        except UserError as e:
            return f"**{e}**", "", []
        folder = ctx.store.folder(run_id) / "results"
        md = folder / "eval.md"
        text = md.read_text(encoding="utf-8") if md.is_file() else ""
        # the log's last line is tqdm's bar with its ETA while it trains and judges
        last = (log_tail(ctx.store.folder(run_id) / "log.txt", 1) or [""])[-1]
        kept = sorted(folder.glob("cells/*.safetensors"))
        state_text = (f"**{status_text(ctx.store.all(), run)}**" + (f": {run.error}" if run.error else "")
                      + (f"  \n`{last.strip()}`" if run.status in ("running", "stopping") and last else "")
                      + "".join(f"  \nLoRA kept: `{ctx.ws.relative(p)}`" for p in kept))
        return state_text, text, [(str(p), p.stem) for p in sorted(folder.glob("cells/*.png"))]

    def on_load():
        runs = choices()
        return gr.update(choices=runs, value=runs[0] if runs else None)

    go.click(on_go, [task, method, pairs, m], [message, pick])
    pick.change(show, pick, [state, table, grids], **QUIET)
    pick.focus(lambda: gr.update(choices=choices()), None, pick, **QUIET)

    def tick(run_id, before):
        """The evaluation as `show` reads it, sent only when it changed since this tab last showed it."""
        now = show(run_id)
        return (gr.skip(), gr.skip(), gr.skip(), before) if now == before else (*now, now)

    shown = gr.State(None)  # per browser tab
    gr.Timer(2.0).tick(tick, [pick, shown], [state, table, grids, shown], **QUIET)
    return pick, on_load
