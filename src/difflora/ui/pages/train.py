"""Train: method cards, the job form generated from the schema, live validation, start / stop / resume."""

from __future__ import annotations

import os
import shlex
from pathlib import Path
from dataclasses import dataclass

from ...errors import UserError
from ...fileio import write_text_atomic
from .. import jobform as J
from ..runs import ACTIVE, RESUMABLE, Run, new_run_id

DEFAULT_METHOD = "addift"


@dataclass
class TrainPage:
    specs: list
    fields: list  # one component per spec
    errors: dict  # group -> Markdown
    status: object
    start: object
    stop: object
    resume: object
    check: object  # validates the form: (*values) -> (one Markdown per group, status)
    check_outputs: list


def _component(gr, spec: J.FieldSpec):
    default = J.effective_default(spec, DEFAULT_METHOD)
    elem_id = "f-" + spec.key.replace(".", "-")
    info = spec.help or None
    if spec.kind == "bool":
        return gr.Checkbox(label=spec.key, value=bool(default), info=info, elem_id=elem_id)
    if spec.kind == "optional_bool":
        return gr.Dropdown(label=spec.key, choices=["", "true", "false"], value="", info="blank: default",
                           elem_id=elem_id)
    if spec.kind == "choice":
        value = DEFAULT_METHOD if spec.key == "method" else (default if default is not None else "")
        return gr.Dropdown(label=spec.key, choices=spec.choices, value=value, info=info, elem_id=elem_id)
    placeholder = J.display(default) or ("pairs/eyes" if spec.key == "image_dir" else "")
    if spec.key == "output_dir":
        placeholder = "runs/<run>/output"
    return gr.Textbox(label=spec.key, value="", placeholder=placeholder, info=info, lines=1, max_lines=4,
                      elem_id=elem_id)


def _card_text(method: str) -> str:
    d = J.method_defaults(method)
    defaults = ", ".join(f"{k} {J.display(v)}" for k, v in d.items()) or "kohya's defaults"
    return f"**{method}**  \n{J.method_purpose(method)}  \n*defaults:* {defaults}"


def build(ctx) -> TrainPage:
    import gradio as gr

    specs = J.build_fields()
    gr.Markdown("Pick a method, point `image_dir` at a pair folder, and start. Blank fields take the method's "
                "recommended value (shown greyed). Every key is the CLI's; errors are the CLI's messages.")
    with gr.Row(elem_id="method-cards"):
        card_buttons = {}
        for m in J.methods():
            with gr.Column(min_width=160, elem_id=f"card-{m}"):
                gr.Markdown(_card_text(m))
                card_buttons[m] = gr.Button(f"Use {m}", size="sm", elem_id=f"use-{m}")
    fields, errors = [], {}
    groups: dict[str, list] = {}
    for s in specs:
        groups.setdefault(s.group, []).append(s)
    by_key = {}
    for group, members in groups.items():
        nested = group.endswith(" options")
        with gr.Accordion(group, open=not nested, elem_id="g-" + group.replace(" ", "-")):
            errors[group] = gr.Markdown(elem_id="err-" + group.replace(" ", "-"), elem_classes=["field-error"])
            basic = [s for s in members if not s.advanced or nested]
            advanced = [s for s in members if s.advanced and not nested]
            with gr.Row():
                for s in basic:
                    by_key[s.key] = _component(gr, s)
            if advanced:
                with gr.Accordion("advanced", open=False):
                    with gr.Row():
                        for s in advanced:
                            by_key[s.key] = _component(gr, s)
    fields = [by_key[s.key] for s in specs]
    status = gr.Markdown(elem_id="train-status")
    with gr.Row():
        start = gr.Button("Start", variant="primary", elem_id="train-start")
        stop = gr.Button("Stop (saves state)", variant="stop", elem_id="train-stop")
        resume = gr.Button("Resume last stopped", elem_id="train-resume")
        as_toml = gr.Button("Copy as TOML", elem_id="train-as-toml")
        as_cli = gr.Button("Copy as CLI command", elem_id="train-as-cli")
    copy_out = gr.Code(label="job", language=None, interactive=False, elem_id="train-copy")

    group_names = list(errors)

    def check(*values):
        """(one Markdown per group, status) for the form as it stands."""
        out = {g: "" for g in group_names}
        try:
            data, ui = J.form_to_job(specs, list(values), ctx.ws, ctx.ws.runs / "RUN")
            J.sample_layout(ui)
            message = J.validate(data, ctx.ws)
        except UserError as e:
            message = str(e)
        if message:
            group = J.group_of_error(message, specs) or group_names[0]
            out[group] = f"⚠ {message}"
            return [*out.values(), f"**Not ready:** {message}"]
        return [*out.values(), "Ready to start."]

    gr.on([f.change for f in fields], check, fields, [*errors.values(), status], show_progress="hidden")
    page = TrainPage(specs, fields, errors, status, start, stop, resume, check, [*errors.values(), status])

    method_field = by_key["method"]
    affected = sorted({k for m in J.methods() for k in J.method_defaults(m)} & set(by_key))

    def on_method(method):
        updates = []
        for key in affected:
            spec = next(s for s in specs if s.key == key)
            default = J.effective_default(spec, method)
            if spec.kind in ("bool", "choice"):
                updates.append(gr.update(value=default))
            else:
                updates.append(gr.update(placeholder=J.display(default)))
        return updates

    method_field.change(on_method, method_field, [by_key[k] for k in affected])
    for m, button in card_buttons.items():
        button.click(lambda m=m: m, None, method_field)

    def copy(values, cli: bool):
        try:
            data, ui = J.form_to_job(specs, list(values), ctx.ws)
        except UserError as e:
            return f"# {e}"
        text = J.job_toml(data)
        if not cli:
            return text
        try:
            path = cli_job_path(ctx.ws, data.get("output_name", "last"))
        except UserError as e:
            return f"# {e}"
        write_text_atomic(path, text)
        return (f"difflora train {shlex.join([str(path), *ctx.ws.restrict_arguments()])}\n"
                "# (the job was saved to that file; set sample_prompts to sample outside the UI)")

    as_toml.click(lambda *v: copy(v, False), fields, copy_out)
    as_cli.click(lambda *v: copy(v, True), fields, copy_out)

    def on_stop():
        active = [r for r in ctx.store.all() if r.status in ACTIVE and r.kind == "train"]
        if not active:
            return "No training is running."
        try:
            ctx.runner.stop(active[0].id)
        except UserError as e:
            return f"**Refused:** {e}"
        return f"Stopping `{active[0].id}`; it saves its LoRA and state."

    def on_resume():
        stopped = [r for r in ctx.store.all() if r.status in RESUMABLE and r.kind == "train"]
        if not stopped:
            return "No stopped or interrupted run to resume."
        ctx.runner.resume(stopped[0].id)
        return f"Queued `{stopped[0].id}` to resume."

    stop.click(on_stop, None, status)
    resume.click(on_resume, None, status)
    return page


def cli_job_path(ws, output_name: str) -> Path:
    """Where "Copy as CLI command" saves the job: jobs/<output_name>.toml, a plain name inside the workspace."""
    from ... import validate

    validate.name_part(output_name, "output_name")
    return ws.resolve(f"jobs/{output_name}.toml", "output_name")


def start_run(ctx, specs, values) -> Run:
    """Validate the form and queue its run; UserError with the CLI's message when it is not valid."""
    data, ui = J.form_to_job(specs, list(values), ctx.ws, ctx.ws.runs / "RUN")
    layout = J.sample_layout(ui)
    message = J.validate(data, ctx.ws)
    if message:
        raise UserError(message)
    title = f"{data.get('method', 'standard')}-{data.get('output_name', 'last')}"
    run_id = new_run_id(title)
    folder = ctx.store.folder(run_id)
    data, ui = J.form_to_job(specs, list(values), ctx.ws, folder)
    if "sample_prompts" not in data:
        write_text_atomic(folder / "prompts.txt", J.prompt_file_text(layout, seed=int(data.get("seed", 42))))
        data["sample_prompts"] = str(folder / "prompts.txt")
        steps = J.effective_default(next(s for s in specs if s.key == "max_train_steps"), data.get("method"))
        data.setdefault("sample_every_n_steps", max(1, int(data.get("max_train_steps", steps)) // 4))
    else:
        layout = None
    write_text_atomic(folder / "job.toml", J.job_toml(data))
    argv = ["train", str(folder / "job.toml"), "--events", str(folder / "events.jsonl"), *ctx.ws.restrict_arguments()]
    lora = os.path.join(data["output_dir"], data.get("output_name", "last") + ".safetensors")
    run = Run(run_id, "train", title, argv, info={"layout": layout, "ui": ui, "expected_result": lora})
    return ctx.runner.submit(run)


def connect(ctx, page: TrainPage, live, tabs) -> None:
    import gradio as gr

    def on_start(*values):
        try:
            run = start_run(ctx, page.specs, values)
        except UserError as e:
            return f"**Not started:** {e}", gr.update(), gr.update()
        return (f"Queued `{run.id}`.", gr.Tabs(selected="live"),
                gr.update(choices=live.run_choices(), value=run.id))

    page.start.click(on_start, page.fields, [page.status, tabs, live.pick])
