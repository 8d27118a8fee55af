"""Runs: every run in the workspace with its job, status, curves, outputs and samples; re-open, clone, continue.

The table is read from the run registry on page load and every few seconds (never kept from when
the app was built), so a finished run reads "finished" in every tab and after a server restart.
"""

import time
import tomllib
from dataclasses import dataclass

from ...errors import UserError
from .. import jobform as J
from ..progress import GALLERY_HEIGHT, curve_frame, file_stamp, read_events, summarize
from ..runs import status_text
from . import QUIET
from .live import resume_message, sampling_grids


@dataclass
class RunsPage:
    table: object
    pick: object
    open_live: object
    clone: object
    extend: object
    more_steps: object
    on_load: object  # () -> (table rows, the pick's choices)


def table_rows(ctx) -> list[list]:
    rows = []
    runs = ctx.store.all()
    for r in runs:
        p = summarize(read_events(ctx.store.folder(r.id) / "events.jsonl")) if r.kind == "train" else None
        last_loss = f"{p.loss[-1][1]:.4f}" if p and p.loss else ""
        steps = f"{p.global_step}/{p.total_steps}" if p and p.total_steps else ""
        rows.append([r.id, r.kind, status_text(runs, r), time.strftime("%Y-%m-%d %H:%M", time.localtime(r.created)), steps,
                     last_loss, ctx.ws.relative(r.result) if r.result else "", r.error or ""])
    return rows


HEADERS = ["run", "kind", "status", "created", "steps", "last loss", "result", "error"]


def build(ctx) -> RunsPage:
    import gradio as gr

    refresh = gr.Button("Refresh", elem_id="runs-refresh")
    table = gr.Dataframe(headers=HEADERS, value=[], interactive=False, wrap=True, elem_id="runs-table")
    with gr.Row():
        pick = gr.Dropdown(label="run", choices=[], elem_id="runs-pick", scale=4)
        open_live = gr.Button("Open in Live run", elem_id="runs-open", scale=1)
        clone = gr.Button("Clone job into Train", elem_id="runs-clone", scale=1)
        resume = gr.Button("Resume", elem_id="runs-resume", scale=1)
    with gr.Row():
        more_steps = gr.Number(label="more steps", value=40, precision=0, minimum=1, elem_id="runs-more-steps",
                               info="continue a finished run: its LoRA is the starting point (network_weights)")
        extend = gr.Button("Continue into Train", elem_id="runs-continue")
    message = gr.Markdown(elem_id="runs-message")
    with gr.Row():
        job = gr.Code(label="job", language=None, interactive=False, elem_id="runs-job")
        with gr.Column():
            details = gr.Markdown(elem_id="runs-details")
            loss_plot = gr.LinePlot(x="step", y="loss", title="loss", elem_id="runs-loss", height=220)
    samples = gr.Gallery(label="samples (newest first); click one to see it whole", columns=2,
                         height=GALLERY_HEIGHT,
                         object_fit="contain", elem_id="runs-samples")
    outputs = gr.File(label="outputs", file_count="multiple", interactive=False, elem_id="runs-outputs")

    def on_refresh():
        return table_rows(ctx), gr.update(choices=[r.id for r in ctx.store.all()])

    def on_pick(run_id):
        if not run_id:
            return "", "", None, [], None
        try:
            run = ctx.store.get(run_id)
        except UserError as e:
            return "", f"**{e}**", None, [], None
        folder = ctx.store.folder(run_id)
        job_path = folder / "job.toml"
        job_text = job_path.read_text(encoding="utf-8") if job_path.is_file() else " ".join(run.argv)
        p = summarize(read_events(folder / "events.jsonl"))
        files = sorted(str(f) for f in folder.rglob("*") if f.is_file() and f.suffix in (".safetensors", ".md", ".json")
                       and "-state" not in str(f.parent) and f.name != "run.json")
        grids = sampling_grids(ctx, run, p)
        if run.kind == "eval":
            grids += [(str(f), f.name) for f in sorted(folder.glob("results/*.png"))]
        md = (f"**{run.id}** · {run.kind} · **{run.status}**  \ncommand: `difflora {' '.join(run.argv)}`  \n"
              f"attempts: {run.attempts}" + (f"  \nresult: `{ctx.ws.relative(run.result)}`" if run.result else "")
              + (f"  \nerror: {run.error}" if run.error else ""))
        table_md = folder / "results" / "eval.md"
        if table_md.is_file():
            md += "\n\n" + table_md.read_text(encoding="utf-8")
        return job_text, md, curve_frame(p.loss, "loss"), grids, files or None

    refresh.click(on_refresh, None, [table, pick], **QUIET)
    def tick(shown):
        """The table, sent only when a run's record or progress changed since this page last showed it."""
        now = tuple((p.parent.name, p.name, file_stamp(p))
                    for p in sorted([*ctx.store.dir.glob("*/run.json"), *ctx.store.dir.glob("*/events.jsonl")]))
        return (gr.skip(), shown) if now == shown else (table_rows(ctx), now)

    shown = gr.State(None)
    gr.Timer(3.0).tick(tick, shown, [table, shown], **QUIET)
    pick.change(on_pick, pick, [job, details, loss_plot, samples, outputs], **QUIET)
    resume.click(lambda run_id: resume_message(ctx, run_id), pick, message, **QUIET)
    return RunsPage(table, pick, open_live, clone, extend, more_steps, on_refresh)


def connect(ctx, page: RunsPage, train, live, tabs) -> None:
    import gradio as gr

    def on_select(evt: gr.SelectData):  # gradio reads this annotation (no `from __future__ import annotations` here)
        row = evt.row_value if hasattr(evt, "row_value") else None
        return row[0] if row else gr.update()

    page.table.select(on_select, None, page.pick, **QUIET)

    def on_open(run_id):
        if not run_id:
            return gr.update(), gr.update()
        return gr.Tabs(selected="live"), gr.update(choices=live.run_choices(), value=run_id)

    def job_values(run_id, continued_steps: int | None = None):
        """The Train form's values for a run's job; continued: from its LoRA, for more steps."""
        run = ctx.store.get(run_id or "")
        folder = ctx.store.folder(run.id)
        try:
            data = tomllib.loads((folder / "job.toml").read_text(encoding="utf-8"))
        except (OSError, tomllib.TOMLDecodeError) as e:
            raise UserError(f"cannot read the run's job ({e})", path=folder / "job.toml") from None
        if str(data.get("sample_prompts", "")).startswith(str(folder)):  # the UI wrote it: the form makes it again
            data.pop("sample_prompts")
            data.pop("sample_sweep", None)
        if continued_steps is not None:
            if run.kind != "train" or run.status != "finished" or not run.result:
                raise UserError(f"run {run.id} is {run.status}; only a finished training continues "
                                "(resume a stopped one)")
            if int(continued_steps or 0) < 1:
                raise UserError("more steps: at least 1")
            data["network_weights"] = run.result
            data["max_train_steps"] = int(continued_steps)
        return run, J.job_to_values(train.specs, data, run.info.get("ui") or {}, ctx.ws, folder)

    def on_clone(run_id):
        try:
            run, values = job_values(run_id)
        except UserError as e:
            return [gr.update()] * len(train.fields) + [gr.update(), f"**Cannot clone:** {e}"]
        return [*values, gr.Tabs(selected="train"), f"Cloned the job of `{run.id}` into the Train form."]

    def on_continue(run_id, steps):
        try:
            run, values = job_values(run_id, steps)
        except UserError as e:
            return [gr.update()] * len(train.fields) + [gr.update(), f"**Cannot continue:** {e}"]
        return [*values, gr.Tabs(selected="train"),
                f"The Train form continues `{run.id}` from its LoRA for {int(steps)} more steps: press Start."]

    page.open_live.click(on_open, page.pick, [tabs, live.pick], **QUIET)
    # the fields' changes run the form's check
    page.clone.click(on_clone, page.pick, [*train.fields, tabs, train.status], **QUIET)
    page.extend.click(on_continue, [page.pick, page.more_steps], [*train.fields, tabs, train.status], **QUIET)
