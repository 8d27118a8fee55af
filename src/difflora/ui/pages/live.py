"""Live run: progress, steps/s and ETA, loss and learning-rate curves, sample grids as written, log tail.

Everything is read from the run registry and the run's files on page load and on a timer, never
kept from when the app was built: a reload, a second tab or a restarted server show the truth.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from ...errors import UserError
from ..progress import (GALLERY_HEIGHT, control_rows, curve_frame, file_stamp, format_eta, read_events, sample_grid,
                        summarize, with_controls)
from ..runs import default_run, log_tail, status_text
from . import QUIET


LOG_LINES = 12  # the tail shown; the box is this tall, so its last line is the log's last line


@dataclass
class LivePage:
    pick: object
    run_choices: object  # () -> list of (label, id)
    on_load: object  # () -> the pick's update: every run, the running one selected


def run_samples(ctx, run, progress) -> list[tuple[int, list[str]]]:
    """(step, image paths) of each sampling, from the events or, failing that, the sample folder."""
    if progress.samples:
        return progress.samples
    out = run.info.get("expected_result")
    if not out:
        return []
    folder = Path(out).parent / "sample"
    by_step: dict[int, list[str]] = {}
    for p in sorted(folder.glob("*.png")):
        m = re.search(r"_(\d{6})_(\d{2}|sweep)\.png$", p.name)
        if m:
            by_step.setdefault(int(m.group(1)), []).append(str(p))
    return sorted(by_step.items())


def sampling_grids(ctx, run, progress, cache: dict | None = None) -> list[tuple]:
    """(grid, caption) of each sampling, newest first. When the sampling's event names control images (an edit
    method's "before" images, `control`: see progress.control_rows), each row shows its control at the left."""
    cache = {} if cache is None else cache
    out = []
    for step, paths in reversed(list(dict(run_samples(ctx, run, progress)).items())):  # latest per step
        control = progress.sample_controls.get(step)
        key = (run.id, step, tuple(paths), repr(control))
        if key not in cache:
            cache[key] = _grid_with_controls(ctx.store.folder(run.id), paths, run.info.get("layout"), control)
        if cache[key] is not None:
            out.append((cache[key], f"step {step}"))
    return out


def _grid_with_controls(folder: Path, paths: list[str], layout, control):
    import numpy as np
    from PIL import Image

    grid = sample_grid(paths, layout)
    if grid is None or not control:
        return grid
    rows = len({x["prompt"] for x in layout}) if layout else 1
    try:
        controls = [[np.asarray(Image.open(p).convert("RGB")) for p in row]
                    for row in control_rows(control, folder, rows)]
    except OSError:  # a control image moved or deleted since: the samples alone
        return grid
    return with_controls(np.asarray(grid), controls)


def files_state(ctx, run_id: str) -> tuple:
    """What the Live page shows of a run changes only with these: every run record (its status, the queue),
    and the run's events and log."""
    folder = ctx.store.folder(run_id)
    return (run_id, tuple((p.parent.name, file_stamp(p)) for p in sorted(ctx.store.dir.glob("*/run.json"))),
            file_stamp(folder / "events.jsonl"), file_stamp(folder / "log.txt"))


def status_html(run, progress, runs=()) -> str:
    pct = 100 * progress.fraction
    rate = f"{progress.steps_per_s:.2f} steps/s" if progress.steps_per_s else "- steps/s"
    stage = f"stage {progress.stage} ({progress.stage_index + 1}/{progress.stages}) · " if progress.stage else ""
    error = f"<div class='run-error'>error: {_esc(run.error)}</div>" if run.error else ""
    return (f"<div id='live-summary'><b>{_esc(run.id)}</b> · <span id='live-state'>{_esc(status_text(list(runs), run))}</span><br>"
            f"{stage}step <span id='live-step'>{progress.global_step}</span>/{progress.total_steps} · {rate} · "
            f"ETA {format_eta(progress.eta_s)} · loss points <span id='live-points'>{len(progress.loss)}</span>"
            f"<div style='background:#ddd;height:10px;border-radius:5px'><div style='background:#f97316;height:10px;"
            f"border-radius:5px;width:{pct:.1f}%'></div></div>{error}</div>")


def _esc(text) -> str:
    import html

    return html.escape(str(text))


def resume_message(ctx, run_id: str | None) -> str:
    """Queue a stopped, interrupted or failed run to continue from its saved state (Live and Runs pages)."""
    try:
        run = ctx.runner.resume(run_id or "")
    except UserError as e:
        return f"**Refused:** {e}"
    return f"Queued `{run.id}` to resume from its saved state."


def build(ctx) -> LivePage:
    import gradio as gr

    def run_choices():
        return [r.id for r in ctx.store.all()]

    def on_load():
        runs = ctx.store.all()
        first = default_run(runs)
        return gr.update(choices=[r.id for r in runs], value=first.id if first else None)

    with gr.Row():
        pick = gr.Dropdown(label="run", choices=[], value=None, elem_id="live-pick", scale=4)
        stop = gr.Button("Stop (saves state)", variant="stop", elem_id="live-stop", scale=1)
        resume = gr.Button("Resume", elem_id="live-resume", scale=1)
        sample_now = gr.Button("Sample now", elem_id="live-sample-now", scale=1)
        save_now = gr.Button("Save now", elem_id="live-save-now", scale=1)
    summary = gr.HTML(elem_id="live-status")
    message = gr.Markdown(elem_id="live-message")
    with gr.Row():
        loss_plot = gr.LinePlot(x="step", y="loss", title="loss", elem_id="live-loss", height=260)
        lr_plot = gr.LinePlot(x="step", y="lr", title="learning rate", elem_id="live-lr", height=260)
    latest = gr.Image(label="latest samples (rows: prompts; columns: LoRA weights)", type="numpy", interactive=False,
                      height=None, buttons=["fullscreen", "download"], elem_id="live-latest")
    samples = gr.Gallery(label="every sampling (newest first); click one to see it whole", columns=2,
                         height=GALLERY_HEIGHT,
                         object_fit="contain", elem_id="live-samples")
    log = gr.Textbox(label="log tail (follows the end)", lines=LOG_LINES, max_lines=LOG_LINES, autoscroll=True,
                     elem_id="live-log")
    timer = gr.Timer(1.0)
    cache: dict = {}

    def refresh(run_id):
        if not run_id:
            return "<div id='live-summary'>No run yet: start one on the Train page.</div>", None, None, None, [], ""
        try:
            run = ctx.store.get(run_id)
        except UserError as e:
            return f"<div id='live-summary'>{_esc(e)}</div>", None, None, None, [], ""
        folder = ctx.store.folder(run_id)
        progress = summarize(read_events(folder / "events.jsonl"))
        grids = sampling_grids(ctx, run, progress, cache)
        return (status_html(run, progress, ctx.store.all()), curve_frame(progress.loss, "loss"),
                curve_frame(progress.lr, "lr"), grids[0][0] if grids else None, grids,
                "\n".join(log_tail(folder / "log.txt", LOG_LINES)))

    def tick(run_id, shown):
        """The picked run's state; with none picked, the run a fresh page would show. Nothing is sent while the
        run's files are as this page last showed them (`shown`): redrawing the plots every second is what keeps
        a browser busy."""
        if not run_id:
            first = default_run(ctx.store.all())
            if first is not None:
                return gr.update(choices=run_choices(), value=first.id), *refresh(first.id), None
        now = files_state(ctx, run_id) if run_id else ()
        if now == shown:
            return (gr.skip(),) * (len(outputs) + 2)
        return gr.skip(), *refresh(run_id), now

    outputs = [summary, loss_plot, lr_plot, latest, samples, log]
    shown = gr.State(None)  # per browser tab: what the files were at the last update
    timer.tick(tick, [pick, shown], [pick, *outputs, shown], **QUIET)
    # the tail follows the end whatever was appended at once (Gradio's autoscroll stops after a large jump)
    log.change(None, None, None, js="() => { const t = document.querySelector('#live-log textarea'); "
                                    "if (t) { t.scrollTop = t.scrollHeight; } }")
    pick.change(refresh, pick, outputs, **QUIET)
    pick.focus(lambda: gr.update(choices=run_choices()), None, pick, **QUIET)

    def on_request(run_id, what):
        try:
            ctx.runner.request(run_id or "", what)
        except UserError as e:
            return f"**Refused:** {e}"
        return ("Sampling after this step." if what == "sample" else
                "Saving the LoRA and the training state after this step.")

    sample_now.click(lambda r: on_request(r, "sample"), pick, message, **QUIET)
    save_now.click(lambda r: on_request(r, "save"), pick, message, **QUIET)

    def on_stop(run_id):
        try:
            ctx.runner.stop(run_id or "")
        except UserError as e:
            return f"**Refused:** {e}"
        return "Stopping: the run saves its LoRA and state."

    stop.click(on_stop, pick, message, **QUIET)
    resume.click(lambda run_id: resume_message(ctx, run_id), pick, message, **QUIET)
    return LivePage(pick, run_choices, on_load)
