"""Live run: progress, steps/s and ETA, loss and learning-rate curves, sample grids as written, log tail."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from ...errors import UserError
from ..progress import curve_frame, format_eta, read_events, sample_grid, summarize
from ..runs import ACTIVE, log_tail


@dataclass
class LivePage:
    pick: object
    run_choices: object  # () -> list of (label, id)


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
        m = re.search(r"_(\d{6})_(\d{2})\.png$", p.name)
        if m:
            by_step.setdefault(int(m.group(1)), []).append(str(p))
    return sorted(by_step.items())


def status_html(run, progress) -> str:
    pct = 100 * progress.fraction
    rate = f"{progress.steps_per_s:.2f} steps/s" if progress.steps_per_s else "- steps/s"
    stage = f"stage {progress.stage} ({progress.stage_index + 1}/{progress.stages}) · " if progress.stage else ""
    error = f"<div class='run-error'>error: {_esc(run.error)}</div>" if run.error else ""
    return (f"<div id='live-summary'><b>{_esc(run.id)}</b> · <span id='live-state'>{run.status}</span><br>"
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

    def default_run():
        runs = ctx.store.all()
        active = [r for r in runs if r.status in ACTIVE]
        return (active or runs or [None])[0]

    first = default_run()
    with gr.Row():
        pick = gr.Dropdown(label="run", choices=run_choices(), value=first.id if first else None,
                           elem_id="live-pick", scale=4)
        stop = gr.Button("Stop (saves state)", variant="stop", elem_id="live-stop", scale=1)
        resume = gr.Button("Resume", elem_id="live-resume", scale=1)
    summary = gr.HTML(elem_id="live-status")
    message = gr.Markdown(elem_id="live-message")
    with gr.Row():
        loss_plot = gr.LinePlot(x="step", y="loss", title="loss", elem_id="live-loss", height=260)
        lr_plot = gr.LinePlot(x="step", y="lr", title="learning rate", elem_id="live-lr", height=260)
    samples = gr.Gallery(label="samples (newest first; columns are the multipliers)", columns=4, height="auto",
                         object_fit="contain", elem_id="live-samples")
    log = gr.Textbox(label="log tail", lines=10, max_lines=10, autoscroll=True, elem_id="live-log")
    timer = gr.Timer(1.0)
    cache: dict = {}

    def refresh(run_id):
        if not run_id:
            return "<div id='live-summary'>No run yet: start one on the Train page.</div>", None, None, [], ""
        try:
            run = ctx.store.get(run_id)
        except UserError as e:
            return f"<div id='live-summary'>{_esc(e)}</div>", None, None, [], ""
        folder = ctx.store.folder(run_id)
        progress = summarize(read_events(folder / "events.jsonl"))
        grids = []
        for step, paths in reversed(list(dict(run_samples(ctx, run, progress)).items())):  # latest per step
            key = (run_id, step, tuple(paths))
            if key not in cache:
                cache[key] = sample_grid(paths, run.info.get("layout"))
            if cache[key] is not None:
                grids.append((cache[key], f"step {step}"))
        return (status_html(run, progress), curve_frame(progress.loss, "loss"), curve_frame(progress.lr, "lr"),
                grids, "\n".join(log_tail(folder / "log.txt", 30)))

    outputs = [summary, loss_plot, lr_plot, samples, log]
    timer.tick(refresh, pick, outputs, show_progress="hidden")
    pick.change(refresh, pick, outputs)
    pick.focus(lambda: gr.update(choices=run_choices()), None, pick)

    def on_stop(run_id):
        try:
            ctx.runner.stop(run_id or "")
        except UserError as e:
            return f"**Refused:** {e}"
        return "Stopping: the run saves its LoRA and state."

    stop.click(on_stop, pick, message)
    resume.click(lambda run_id: resume_message(ctx, run_id), pick, message)
    return LivePage(pick, run_choices)
