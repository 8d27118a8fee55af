"""Train: method cards, the job form generated from the schema, live validation, start / stop / resume.

Every field carries its line of `difflora train --help-keys`; only the chosen method's table is shown.
Start runs the CLI's checks of the job and of its data (the training's own loader) before anything
is queued. Presets are form values saved under `<workspace>/presets/`; a job TOML or a kohya config
can be imported into the form.
"""

from __future__ import annotations

import json
import os
import re
import shlex
from dataclasses import dataclass
from pathlib import Path

from ...errors import UserError
from ...fileio import write_text_atomic
from ..workspace import safe_name
from .. import jobform as J
from ..runs import ACTIVE, RESUMABLE, Run, new_run_id
from . import QUIET

DEFAULT_METHOD = "addift"
# The form's values reach the server as one input, the hidden component `TrainPage.form`: Gradio's page gives each
# input of an event a loading status and from then on updates every one of them on every event of the page,
# searching its whole component tree for each. With the ~190 fields as inputs that made every click and every
# timer tick anywhere on the page cost the browser about half a second of CPU once the form had been checked.
# Each field's change copies its value into `window.diffloraForm` in the browser (no server call) and hands the
# whole object to the hidden component, whose change runs the check; events that read the form send that object.
FORM_JS = "(value, form) => {{ const f = (window.diffloraForm = window.diffloraForm || Object.assign({{}}, form)); " \
          "f[{key}] = value; return Object.assign({{}}, f); }}"
LATEST_FORM_JS = "(form) => window.diffloraForm || form"


@dataclass
class TrainPage:
    specs: list
    fields: list  # one component per spec
    errors: dict  # group -> Markdown
    status: object
    start: object
    stop: object
    resume: object
    form: object  # the hidden component holding every field's value ({key: value}; see FORM_JS)
    check_outputs: list
    report: object  # (problems, prefix) -> the values of check_outputs

    def values(self, form: dict) -> list:
        """The fields' values, in `specs` order, from the form's {key: value}."""
        return [form.get(s.key) for s in self.specs]


def _component(gr, spec: J.FieldSpec):
    default = J.effective_default(spec, DEFAULT_METHOD)
    elem_id = "f-" + spec.key.replace(".", "-")
    info = spec.help
    if spec.kind == "bool":
        return gr.Checkbox(label=spec.label, value=bool(default), info=info, elem_id=elem_id)
    if spec.kind == "optional_bool":
        return gr.Dropdown(label=spec.label, choices=["", "true", "false"], value="", info=f"{info} (blank: default)",
                           elem_id=elem_id)
    if spec.kind == "choice":
        value = DEFAULT_METHOD if spec.key == "method" else (default if default is not None else "")
        return gr.Dropdown(label=spec.label, choices=spec.choices, value=value, info=info, elem_id=elem_id)
    placeholder = J.display(default) or {"image_dir": "pairs/eyes",
                                          "sample_prompt": "the first pair's 'before' caption"}.get(spec.key, "")
    if spec.key == "output_dir":
        placeholder = "runs/<run>/output"
    return gr.Textbox(label=spec.label, value="", placeholder=placeholder, info=info, lines=1, max_lines=4,
                      elem_id=elem_id)


def group_id(group: str) -> str:
    """A form group's name as an element id: 'addift options' -> 'addift-options', 'FLUX.1 models' -> 'FLUX-1-models'."""
    return re.sub(r"[^A-Za-z0-9]+", "-", group).strip("-")


def presets_dir(ctx):
    return ctx.ws.root / "presets"


def preset_names(ctx) -> list[str]:
    return sorted(p.stem for p in presets_dir(ctx).glob("*.toml"))


def save_preset(ctx, specs, values, name: str) -> str:
    """The form's non-blank values as `<workspace>/presets/<name>.toml`; returns the name used."""
    import tomli_w

    name = safe_name((name or "").strip())
    if not (name or "").strip() or name == "untitled":
        raise UserError("give the preset a name")
    kept = {s.key: v for s, v in zip(specs, values) if v not in (None, "") and not (
        s.kind == "bool" and bool(v) == bool(J.effective_default(s, DEFAULT_METHOD)))}
    write_text_atomic(presets_dir(ctx) / f"{name}.toml", tomli_w.dumps(kept))
    return name


def load_preset(ctx, specs, name: str) -> list:
    import tomllib

    path = presets_dir(ctx) / f"{safe_name(name or '')}.toml"
    try:
        kept = tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise UserError("no such preset", path=ctx.ws.relative(path)) from None
    except (OSError, tomllib.TOMLDecodeError) as e:
        raise UserError(f"unreadable preset ({e})", path=ctx.ws.relative(path)) from None
    method = kept.get("method", DEFAULT_METHOD)
    out = []
    for s in specs:
        if s.key in kept:
            out.append(kept[s.key])
        elif s.kind == "bool":
            out.append(bool(J.effective_default(s, method)))
        elif s.kind == "choice":
            out.append(method if s.key == "method" else (J.effective_default(s, method) or ""))
        else:
            out.append("")
    return out


def import_job(ctx, specs, path_text: str) -> list:
    """The form's values for a job TOML or a kohya sd-scripts config in the workspace (kohya keys renamed)."""
    from pydantic import ValidationError

    from ... import kohya_config
    from ...config import JobConfig, format_errors, read_toml

    path = ctx.ws.resolve(path_text or "", "job file")
    data, text = read_toml(path)
    try:
        data = kohya_config.normalise(data, set(JobConfig.model_fields))
        JobConfig.model_validate(data)  # unknown keys and bad values are refused here, not dropped
    except ValidationError as e:
        raise format_errors(e, text, ctx.ws.relative(path)) from None
    except UserError as e:
        raise e if e.path else UserError(str(e), path=ctx.ws.relative(path)) from None
    base = path.parent
    for key in J.PATH_KEYS & set(data):
        if isinstance(data[key], str) and data[key]:
            data[key] = str((base / data[key]).resolve())
    for ds in data.get("datasets") or []:
        for sub in ds.get("subsets") or []:
            for key in ("image_dir", "after_dir"):
                if isinstance(sub.get(key), str):
                    sub[key] = str((base / sub[key]).resolve())
    return J.job_to_values(specs, data, {}, ctx.ws)


def _card_text(method: str) -> str:
    d = J.method_defaults(method)
    defaults = ", ".join(f"{k} {J.display(v)}" for k, v in d.items()) or "kohya's defaults"
    return f"**{method}**  \n{J.method_purpose(method)}  \n*defaults:* {defaults}"


def _build_method_cards(gr) -> dict:
    """One card per method (its purpose and defaults) with a "Use" button; {method: button}."""
    with gr.Row(elem_id="method-cards"):
        card_buttons = {}
        for m in J.methods():
            with gr.Column(min_width=160, elem_id=f"card-{m}"):
                gr.Markdown(_card_text(m))
                card_buttons[m] = gr.Button(f"Use {m}", size="sm", elem_id=f"use-{m}")
    return card_buttons


@dataclass
class FormGroups:
    """The job form's components by key, and its accordions: each group's error line, the method option tables
    ({method: accordion}) and the family option groups ({group: (accordion, the model_family values it serves)})."""

    by_key: dict
    errors: dict
    method_groups: dict
    family_groups: dict


def _build_form_groups(gr, specs) -> FormGroups:
    """An accordion per field group: its basic fields, then an "advanced" one; a method's table is shown only
    for that method, a family's group only once a family is chosen."""
    groups: dict[str, list] = {}
    for s in specs:
        groups.setdefault(s.group, []).append(s)
    out = FormGroups({}, {}, {}, {})
    served = J.family_group_names()
    for group, members in groups.items():
        nested = group.endswith(" options")
        method_of_group = group[:-len(" options")] if nested else None
        with gr.Accordion(group, open=not nested and group not in served, elem_id="g-" + group_id(group),
                          visible=method_of_group in (None, DEFAULT_METHOD)) as accordion:
            if method_of_group in J.methods():
                out.method_groups[method_of_group] = accordion
            if group in served:
                out.family_groups[group] = (accordion, served[group])
            out.errors[group] = gr.Markdown(elem_id="err-" + group_id(group), elem_classes=["field-error"])
            flat = nested or group in served  # a method's or a family's own keys: shown once their group is
            basic = [s for s in members if not s.advanced or flat]
            advanced = [s for s in members if s.advanced and not flat]
            with gr.Row():
                for s in basic:
                    out.by_key[s.key] = _component(gr, s)
            if advanced:
                with gr.Accordion("advanced", open=False):
                    with gr.Row():
                        for s in advanced:
                            out.by_key[s.key] = _component(gr, s)
    return out


def _build_presets_and_import(gr) -> dict:
    """The preset picker with its load/save buttons and the job import box; the components by name."""
    with gr.Accordion("presets and import", open=False, elem_id="g-presets"):
        with gr.Row():
            pick = gr.Dropdown(label="preset", choices=[], allow_custom_value=True, elem_id="preset-pick",
                               info="form values saved in this workspace (presets/NAME.toml)")
            load = gr.Button("Load preset", elem_id="preset-load")
            save = gr.Button("Save form as preset", elem_id="preset-save")
        with gr.Row():
            path = gr.Textbox(label="job TOML or kohya config to import", placeholder="jobs/my_job.toml",
                              info="a difflora job or a kohya sd-scripts --config_file TOML in the workspace",
                              elem_id="import-path")
            go = gr.Button("Import into the form", elem_id="import-go")
    return {"pick": pick, "load": load, "save": save, "import_path": path, "import_go": go}


def _build_run_controls(gr) -> dict:
    """The status line, start / stop / resume, and the "copy as TOML / CLI" buttons with their output box."""
    status = gr.Markdown(elem_id="train-status")
    with gr.Row():
        start = gr.Button("Start", variant="primary", elem_id="train-start")
        stop = gr.Button("Stop (saves state)", variant="stop", elem_id="train-stop")
        resume = gr.Button("Resume last stopped", elem_id="train-resume")
        as_toml = gr.Button("Copy as TOML", elem_id="train-as-toml")
        as_cli = gr.Button("Copy as CLI command", elem_id="train-as-cli")
    copy_out = gr.Code(label="job", language=None, interactive=False, elem_id="train-copy")
    return {"status": status, "start": start, "stop": stop, "resume": resume, "as_toml": as_toml, "as_cli": as_cli,
            "copy_out": copy_out}


def _problem_reporter(specs, group_names: list[str]):
    """report(problems, prefix) -> the values of the group error lines and the status line: the first problem next
    to its field's group and in the status line."""

    def report(problems: list[str], prefix: str = "Not ready") -> list:
        out = {g: "" for g in group_names}
        if not problems:
            return [*out.values(), "Ready to start."]
        out[J.group_of_error(problems[0], specs) or group_names[0]] = f"⚠ {problems[0]}"
        return [*out.values(), f"**{prefix}:** {problems[0]}"]

    return report


def build(ctx) -> TrainPage:
    import gradio as gr

    specs = J.build_fields()
    gr.Markdown("Pick a method, point `image_dir` at a pair folder, and start. Blank fields take the method's "
                "recommended value (shown greyed). Every key is the CLI's; errors are the CLI's messages.")
    card_buttons = _build_method_cards(gr)
    groups = _build_form_groups(gr, specs)
    fields = [groups.by_key[s.key] for s in specs]
    presets = _build_presets_and_import(gr)
    run = _build_run_controls(gr)
    report = _problem_reporter(specs, list(groups.errors))

    form = gr.JSON(value={s.key: f.value for s, f in zip(specs, fields)}, visible=False, elem_id="train-form")
    for s, f in zip(specs, fields):
        f.change(None, [f, form], form, js=FORM_JS.format(key=json.dumps(s.key)), **QUIET)
    page = TrainPage(specs, fields, groups.errors, run["status"], run["start"], run["stop"], run["resume"], form,
                     [*groups.errors.values(), run["status"]], report)
    # a method change updates several fields at once: one check for the last of them, not one per field
    form.change(lambda values: report(check_form(ctx, specs, page.values(values))), form, page.check_outputs,
                js=LATEST_FORM_JS, trigger_mode="always_last", concurrency_limit=1, **QUIET)
    _wire_method_and_family(gr, specs, groups, card_buttons)
    _wire_presets_and_import(ctx, gr, page, presets)
    _wire_copy(ctx, page, run["as_toml"], run["as_cli"], run["copy_out"])
    _wire_stop_and_resume(ctx, page)
    return page


def _wire_method_and_family(gr, specs, groups: FormGroups, card_buttons: dict) -> None:
    """A method change (its field or a card) resets the method's defaults and shows its option table; a family
    choice shows that family's own keys (all families' while it is detected)."""
    by_key = groups.by_key
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

    method_field.change(on_method, method_field, [by_key[k] for k in affected], **QUIET)
    method_field.change(lambda m: [gr.update(visible=m == name) for name in groups.method_groups], method_field,
                        list(groups.method_groups.values()), **QUIET)
    by_key["model_family"].change(
        lambda family: [gr.update(visible=not family or family in names, open=bool(family))
                        for _, names in groups.family_groups.values()],
        by_key["model_family"], [accordion for accordion, _ in groups.family_groups.values()], **QUIET)
    for m, button in card_buttons.items():
        button.click(lambda m=m: m, None, method_field, **QUIET)


def _wire_presets_and_import(ctx, gr, page: TrainPage, presets: dict) -> None:
    specs = page.specs

    def on_preset_save(name, values):
        try:
            saved = save_preset(ctx, specs, page.values(values), name)
        except UserError as e:
            return gr.update(), f"**Refused:** {e}"
        return gr.update(choices=preset_names(ctx), value=saved), f"Saved the preset `{saved}`."

    def on_preset_load(name):
        try:
            return [*load_preset(ctx, specs, name), f"Loaded the preset `{name}`."]
        except UserError as e:
            return [*(gr.update() for _ in specs), f"**Refused:** {e}"]

    def on_import(path_text):
        try:
            return [*import_job(ctx, specs, path_text), f"Imported `{path_text}` into the form."]
        except UserError as e:
            return [*(gr.update() for _ in specs), f"**Not imported:** {e}"]

    presets["save"].click(on_preset_save, [presets["pick"], page.form], [presets["pick"], page.status],
                          js=f"(name, form) => [name, ({LATEST_FORM_JS})(form)]", **QUIET)
    presets["load"].click(on_preset_load, presets["pick"], [*page.fields, page.status], **QUIET)
    presets["pick"].focus(lambda: gr.update(choices=preset_names(ctx)), None, presets["pick"], **QUIET)
    presets["import_go"].click(on_import, presets["import_path"], [*page.fields, page.status], **QUIET)


def _wire_copy(ctx, page: TrainPage, as_toml, as_cli, copy_out) -> None:
    """"Copy as TOML" shows the job; "Copy as CLI command" also saves it to jobs/<output_name>.toml."""
    specs = page.specs

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

    as_toml.click(lambda v: copy(page.values(v), False), page.form, copy_out, js=LATEST_FORM_JS, **QUIET)
    as_cli.click(lambda v: copy(page.values(v), True), page.form, copy_out, js=LATEST_FORM_JS, **QUIET)


def _wire_stop_and_resume(ctx, page: TrainPage) -> None:
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

    page.stop.click(on_stop, None, page.status, **QUIET)
    page.resume.click(on_resume, None, page.status, **QUIET)


def cli_job_path(ws, output_name: str) -> Path:
    """Where "Copy as CLI command" saves the job: jobs/<output_name>.toml, a plain name inside the workspace."""
    from ... import validate

    validate.name_part(output_name, "output_name")
    return ws.resolve(f"jobs/{output_name}.toml", "output_name")


def check_form(ctx, specs, values, with_data: bool = False) -> list[str]:
    """The form's problems in its own words (empty: it may start); with_data also reads the pairs as a run would."""
    try:
        data, ui = J.form_to_job(specs, list(values), ctx.ws, ctx.ws.runs / "RUN")
        J.sample_multipliers(ui)
        message = J.validate(data, ctx.ws, with_data=with_data)
    except UserError as e:
        message = str(e)
    if message:
        return [J.form_message(message, specs)]
    return J.implausible(data)


def start_run(ctx, specs, values) -> Run:
    """Check the form and its data, and queue its run; UserError in the form's words when it cannot start."""
    problems = check_form(ctx, specs, values, with_data=True)
    if problems:
        raise UserError(problems[0])
    data, ui = J.form_to_job(specs, list(values), ctx.ws, ctx.ws.runs / "RUN")
    title = f"{data.get('method', 'standard')}-{data.get('output_name', 'last')}"
    run_id = new_run_id(title)
    folder = ctx.store.folder(run_id)
    data, ui = J.form_to_job(specs, list(values), ctx.ws, folder)
    layout = None
    if "sample_prompts" not in data:  # the preview grid: the training samples as often as stays cheap
        prompts = J.preview_prompts(ui, data)
        write_text_atomic(folder / "prompts.txt", J.prompt_file_text(prompts, seed=int(data.get("seed", 42))))
        data["sample_prompts"] = str(folder / "prompts.txt")
        data.setdefault("sample_sweep", J.sample_multipliers(ui))
        layout = J.sample_layout(ui, data)
    write_text_atomic(folder / "job.toml", J.job_toml(data))
    argv = ["train", str(folder / "job.toml"), "--events", str(folder / "events.jsonl"), *ctx.ws.restrict_arguments()]
    lora = os.path.join(data["output_dir"], data.get("output_name", "last") + ".safetensors")
    run = Run(run_id, "train", title, argv, info={"layout": layout, "ui": ui, "expected_result": lora})
    return ctx.runner.submit(run)


def connect(ctx, page: TrainPage, live, tabs) -> None:
    import gradio as gr

    def on_start(values):
        try:
            run = start_run(ctx, page.specs, page.values(values))
        except UserError as e:
            # only the group with the problem and the status line change: the form's own check (on every edit)
            # has cleared the other groups, and each output left out is one re-render less for the browser
            *groups, line = page.report([str(e)], prefix="Not started")
            return [*(text or gr.skip() for text in groups), line, gr.skip(), gr.skip()]
        return [*page.report([])[:-1], f"Queued `{run.id}`.", gr.Tabs(selected="live"),
                gr.update(choices=live.run_choices(), value=run.id)]

    # a refusal must reach the page at once even on a loaded machine: outside the queue (QUIET: the tabs holding
    # the whole form are an output)
    page.start.click(on_start, page.form, [*page.check_outputs, tabs, live.pick], js=LATEST_FORM_JS, queue=False,
                     **QUIET)
