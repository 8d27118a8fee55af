"""Pairs: upload or pick a pair folder; each pair with its difference heat map, training mask and warnings.

Also: toy pairs made in one click, a pair added from a before and an after slot (saved as NAME.png /
NAME_after.png), the `prep` commands' align, crop and tag buttons (writing to a new folder, never over
the pairs), and caption editing per pair with the tags each side has that the other lacks. For an edit
model a pair is control -> target and its instruction is `NAME.instruction.txt`, edited here too.
"""

from __future__ import annotations

import shutil
import time
import uuid
from pathlib import Path
from types import SimpleNamespace

from ...errors import UserError
from .. import pairs as P
from ..progress import GALLERY_HEIGHT
from ..subcommand import run_cli
from . import QUIET


def _composite(view: P.PairView):
    """before | after above difference | mask: near square, so a gallery cell shows it large and whole. A pair
    with further control images shows them between before and after (control images -> target), blank below."""
    import numpy as np

    from ...generate import make_grid

    h = view.before.shape[0]
    scale = max(1, 192 // h)  # small pairs enlarged so a face can be seen
    blank = np.full_like(view.before, 255)
    labels = ["before | difference", *(f"ref{i + 1}" for i in range(len(view.refs))), "after | mask"]
    return make_grid([[view.before, *view.refs, view.after], [view.heat, *(blank for _ in view.refs), view.mask]],
                     labels, scale=scale)


def show_pairs(ctx, folder: str, after_suffix: str, threshold: float, dilate: float, model: str):
    """(gallery items, warnings markdown, pair names)."""
    path = ctx.ws.resolve(folder, "pair folder")
    if not path.is_dir():
        raise UserError("not a folder", path=ctx.ws.relative(path))
    factor = P.latent_factor(str(ctx.ws.resolve(model, "model")) if model else None)
    items, lines, names = [], [], []
    for pair in P.find_pairs(path, after_suffix or "_after"):
        names.append(pair.name)
        try:
            view = P.analyse(pair, float(threshold), int(dilate), factor)
        except UserError as e:
            lines.append(f"- **{pair.name}**: {e}")
            continue
        label = P.pair_label(pair, view)
        instruction = P.read_instruction(pair.before)
        if instruction:
            label += f" · edit: {instruction}"
        items.append((_composite(view), label))
        lines += [f"- **{pair.name}**: {w}" for w in view.warnings]
    if not names:
        raise UserError("no pairs here (NAME.png with NAME_after.png)", path=ctx.ws.relative(path))
    summary = f"{len(names)} pair(s) in `{ctx.ws.relative(path)}`; mask at 1/{factor} (the latent grid)."
    return items, summary + ("\n\n**Warnings**\n" + "\n".join(lines) if lines else "\n\nNo warnings."), names


def make_toy_pairs(ctx, task: str, n: int, name: str) -> Path:
    """`n` procedural pairs of a toy task in pairs/<name> (a new or empty folder)."""
    from ...toy.evaluate import TASKS, write_pairs

    if task not in TASKS:
        raise UserError(f"unknown toy task {task!r}; choose one of: {', '.join(TASKS)}")
    if not 1 <= int(n) <= 64:
        raise UserError(f"number of toy pairs: 1 to 64, got {n}")
    dest = ctx.ws.new_folder("pairs", (name or task).strip(), create=False)
    if dest.exists() and any(dest.iterdir()):
        raise UserError("the folder already holds files; choose another name", path=ctx.ws.relative(dest))
    write_pairs(dest, task, int(n), seed=0)
    return dest


def add_pair(ctx, folder: str, name: str, before: str | None, after: str | None, replace: bool = False) -> list[str]:
    """One pair from the two slots, saved as NAME<ext> and NAME_after<ext> through the upload checks."""
    from ..workspace import safe_name

    if not before or not after:
        raise UserError("drop an image in both slots, 'before' and 'after'")
    stem = safe_name((name or "").strip() or Path(before).stem)
    dest = ctx.ws.resolve(folder or "", "pair folder")
    staging = ctx.ws.root / ".gradio" / f"pair-{uuid.uuid4().hex}"
    staging.mkdir(parents=True)
    try:
        staged = []
        for src, suffix in ((Path(before), ""), (Path(after), "_after")):
            staged.append(staging / f"{stem}{suffix}{src.suffix.lower()}")
            shutil.copyfile(src, staged[-1])
        return P.import_uploads([str(p) for p in staged], dest, replace=replace)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


PREP_ACTIONS = {"align": "_aligned", "crop": "_cropped"}


def prep_folder(ctx, folder: str, action: str, size: int = 512, after_suffix: str = "_after") -> tuple[str, str]:
    """Run `difflora prep pairs --align` or `prep crop --mode focus` on a pair folder into a new sibling folder;
    (the new folder, the command's report). The pairs themselves are never rewritten."""
    src = ctx.ws.resolve(folder or "", "pair folder")
    out = src.with_name(src.name + PREP_ACTIONS[action])
    if action == "align":
        argv = ["prep", "pairs", str(src), "--align", "--out", str(out), "--after-suffix", after_suffix]
    else:
        argv = ["prep", "crop", str(src), "--out", str(out), "--mode", "focus", "--size", str(int(size)),
                "--after-suffix", after_suffix]
    report = run_cli(argv, ctx.ws.root)
    return ctx.ws.relative(out), report


def tag_folder(ctx, folder: str) -> str:
    """Captions for the images that have none, from the toy tagger (`difflora prep tag --tagger toy`)."""
    return run_cli(["prep", "tag", str(ctx.ws.resolve(folder or "", "pair folder")), "--tagger", "toy"], ctx.ws.root)


def tag_diff(before: str, after: str) -> str:
    """What the two captions of a pair say differently: the tags only one of them has."""
    from ...prep.captions import split_tags

    b, a = split_tags(before or ""), split_tags(after or "")
    gone = [t for t in b if t not in a]
    new = [t for t in a if t not in b]
    if not gone and not new:
        return "The captions have the same tags: the difference is left to the images."
    return ("**only before:** " + (", ".join(f"`{t}`" for t in gone) or "none") + "  \n"
            "**only after:** " + (", ".join(f"`{t}`" for t in new) or "none"))


def edit_preview(ctx, folder: str, after_suffix: str, name: str, model: str, lora: str, instruction: str,
                 sweep: str = "0,1", steps: int = 20, seed: int = 1) -> list[tuple[str, str]]:
    """An edit LoRA on a pair's before image: `difflora generate --control BEFORE [--control NAME_ref1 ...]` with
    the instruction as prompt, one column per multiplier of `sweep`; (the control images, the grid) for a gallery."""
    from ..workspace import safe_name

    if not name:
        raise UserError("pick a pair (Show pairs, then the pair list)")
    if not lora:
        raise UserError("choose an edit LoRA")
    pair = pair_named(ctx, folder, after_suffix, name)
    prompt = (instruction or "").strip() or P.read_instruction(pair.before) or (
        P.read_caption(pair.after) if pair.after else "")
    if not prompt:
        raise UserError("the pair has no instruction: write one (or an 'after' caption)", path=pair.before.name)
    out = ctx.ws.root / "previews" / f"{time.strftime('%Y%m%d-%H%M%S')}-{safe_name(name)}-{uuid.uuid4().hex[:4]}"
    model_args = ["--model", str(ctx.ws.resolve(model, "model", role="read"))] if (model or "").strip() else []
    controls = [pair.before, *pair.refs]
    lora_path = ctx.ws.resolve(lora, "LoRA", role="read")
    argv = ["generate", *model_args, *(a for c in controls for a in ("--control", str(c))), "--prompt", prompt,
            "--lora", f"{lora_path}:1", "--sweep", sweep or "0,1", "--steps", str(int(steps)), "--seed", str(int(seed)),
            "--out", str(out)]
    run_cli(argv, ctx.ws.root)
    shown = [(str(pair.before), "before (control)")] + [(str(r), f"control: {r.name}") for r in pair.refs]
    return shown + [(str(out / "000_grid.png"), f"{Path(lora).stem}: {prompt} (multipliers {sweep or '0,1'})")]


def pair_named(ctx, folder: str, after_suffix: str, name: str) -> P.Pair:
    """The pair called `name` in a pair folder of the workspace."""
    folder_path = ctx.ws.resolve(folder or "", "pair folder")
    for p in P.find_pairs(folder_path, after_suffix or "_after"):
        if p.name == name:
            return p
    raise UserError(f"no pair named {name!r}", path=ctx.ws.relative(folder_path))


def build(ctx) -> None:
    import gradio as gr

    gr.Markdown("A pair is `NAME.png` (before) and `NAME_after.png` (after) in one folder, captions in `NAME.txt` / "
                "`NAME_after.txt`. Upload files named that way, or put them in a folder inside the workspace.")
    page = SimpleNamespace()  # the page's components, added by the builders below
    _build_folder_and_upload(gr, ctx, page)
    _build_more_tools(gr, page)
    _build_gallery_and_editor(gr, page)
    _build_edit_preview(gr, ctx, page)
    _wire_folder_and_upload(gr, ctx, page)
    _wire_more_tools(gr, ctx, page)
    _wire_editor(ctx, page)
    _wire_edit_preview(gr, ctx, page)


def _build_folder_and_upload(gr, ctx, page) -> None:
    """The folder picker with the view settings (suffix, mask threshold and dilation, model) and the upload box."""
    with gr.Row():
        with gr.Column(scale=2):
            page.folder = gr.Dropdown(label="pair folder (inside the workspace)", choices=ctx.ws.folders(),
                                      allow_custom_value=True, elem_id="pairs-folder")
            with gr.Row():
                page.suffix = gr.Textbox(label="after_suffix", value="_after", elem_id="pairs-suffix")
                page.threshold = gr.Number(label="diff_mask_threshold", value=10.0, elem_id="pairs-threshold")
                page.dilate = gr.Number(label="diff_mask_dilate", value=2, precision=0, elem_id="pairs-dilate")
                page.model = gr.Textbox(label="model (blank: embedded)", value="", elem_id="pairs-model")
            page.show = gr.Button("Show pairs", variant="primary", elem_id="pairs-show")
        with gr.Column(scale=1):
            page.new_name = gr.Textbox(label="new folder under pairs/", placeholder="eyes", elem_id="pairs-new-name")
            page.upload = gr.File(label="upload images and captions", file_count="multiple", elem_id="pairs-upload")
            page.replace = gr.Checkbox(label="replace existing files", value=False, elem_id="pairs-replace")
            page.add = gr.Button("Add to folder", elem_id="pairs-add")
    page.view_settings = [page.suffix, page.threshold, page.dilate, page.model]  # what show_pairs reads


def _build_more_tools(gr, page) -> None:
    """The folded tools: toy pairs, one pair from a before and an after slot, align / crop / tag buttons."""
    from ...toy.evaluate import TASKS

    with gr.Accordion("make toy pairs, add one pair, align, crop, tag", open=False, elem_id="pairs-more"):
        with gr.Row():
            page.toy_task = gr.Dropdown(label="toy task", choices=list(TASKS), value="eyes", elem_id="pairs-toy-task")
            page.toy_n = gr.Number(label="pairs", value=4, precision=0, minimum=1, maximum=64, elem_id="pairs-toy-n")
            page.toy_name = gr.Textbox(label="folder under pairs/", placeholder="the task's name",
                                       elem_id="pairs-toy-name")
            page.toy_go = gr.Button("Make toy pairs", elem_id="pairs-toy-go")
        with gr.Row():
            page.slot_before = gr.File(label="before image", file_count="single", file_types=["image"],
                                       elem_id="pairs-slot-before")
            page.slot_after = gr.File(label="after image", file_count="single", file_types=["image"],
                                      elem_id="pairs-slot-after")
            with gr.Column():
                page.slot_name = gr.Textbox(label="pair name", placeholder="the before file's name",
                                            info="saved as NAME.png and NAME_after.png in the pair folder",
                                            elem_id="pairs-slot-name")
                page.slot_add = gr.Button("Add this pair to the folder", elem_id="pairs-slot-add")
        with gr.Row():
            page.crop_size = gr.Number(label="crop size", value=512, precision=0, elem_id="pairs-crop-size")
            page.align = gr.Button("Align pairs (prep pairs --align) into FOLDER_aligned", elem_id="pairs-align")
            page.crop = gr.Button("Crop pairs (prep crop --mode focus) into FOLDER_cropped", elem_id="pairs-crop")
            page.tag = gr.Button("Caption untagged images (prep tag --tagger toy)", elem_id="pairs-tag")


def _build_gallery_and_editor(gr, page) -> None:
    """The status line, the pairs' gallery, and the caption and instruction editor of the picked pair."""
    page.status = gr.Markdown(elem_id="pairs-status")
    page.gallery = gr.Gallery(label="pairs: before (an edit model's control) and after (its target), below them the "
                                    "difference and the training mask (click one to see it whole)",
                              columns=2, height=GALLERY_HEIGHT, object_fit="contain", elem_id="pairs-gallery")
    with gr.Row():
        page.pick = gr.Dropdown(label="pair", choices=[], elem_id="pairs-pick")
        page.before_caption = gr.Textbox(label="before caption", elem_id="pairs-caption-before")
        page.after_caption = gr.Textbox(label="after caption", elem_id="pairs-caption-after")
        page.instruction = gr.Textbox(label="edit instruction (control → target)", elem_id="pairs-instruction",
                                      info="what an edit model is told to do to 'before' to get 'after' "
                                           "(NAME.instruction.txt; blank: the caption or the job's edit_instruction)")
        page.save = gr.Button("Save captions and instruction", elem_id="pairs-save")
    page.diff = gr.Markdown(elem_id="pairs-tag-diff")
    page.saved = gr.Markdown(elem_id="pairs-saved")


def _build_edit_preview(gr, ctx, page) -> None:
    """An edit model with an edit LoRA on the picked pair's before image (control images -> output)."""
    from ..pickers import lora_choices, model_choices

    with gr.Accordion("edit preview: an edit LoRA on the picked pair's before image", open=False,
                      elem_id="pairs-preview"):
        with gr.Row():
            page.preview_model = gr.Dropdown(label="edit model", choices=model_choices(ctx.ws), value="",
                                             allow_custom_value=True, elem_id="pairs-preview-model")
            page.preview_lora = gr.Dropdown(label="edit LoRA (by run and name)", choices=lora_choices(ctx.ws),
                                            elem_id="pairs-preview-lora")
            page.preview_sweep = gr.Textbox(label="multipliers", value="0,1", elem_id="pairs-preview-sweep")
            page.preview_steps = gr.Number(label="steps", value=20, precision=0, elem_id="pairs-preview-steps")
            page.preview_go = gr.Button("Preview the edit (generate --control)", elem_id="pairs-preview-go")
        page.preview_message = gr.Markdown(elem_id="pairs-preview-message")
        page.preview_gallery = gr.Gallery(label="control image(s), then the output at each multiplier", columns=3,
                                          height="auto", object_fit="contain", elem_id="pairs-preview-gallery")


def _wire_edit_preview(gr, ctx, page) -> None:
    from ..pickers import lora_choices, model_choices, refresh_on_focus

    def on_preview(f, s, name, m, lora, edit, sweep, steps, progress=gr.Progress()):
        try:
            progress(0.1, desc="generating")
            items = edit_preview(ctx, f, s, name, m or "", lora or "", edit, sweep, steps or 20)
        except UserError as e:
            return [], f"**Refused:** {e}"
        return items, f"`{name}`: {len(items) - 1} control image(s) → the edit at multipliers {sweep or '0,1'}."

    page.preview_go.click(on_preview, [page.folder, page.suffix, page.pick, page.preview_model, page.preview_lora,
                                       page.instruction, page.preview_sweep, page.preview_steps],
                          [page.preview_gallery, page.preview_message])
    refresh_on_focus(page.preview_lora, lambda: lora_choices(ctx.ws))
    refresh_on_focus(page.preview_model, lambda: model_choices(ctx.ws))


def _pick_update(gr, names: list[str]):
    return gr.update(choices=names, value=names[0] if names else None)


def _wire_folder_and_upload(gr, ctx, page) -> None:
    """"Show pairs", "Add to folder" (the upload into a new or existing folder) and the folder list's refresh."""

    def on_show(f, s, t, d, m):
        try:
            items, text, names = show_pairs(ctx, f or "", s, t, d, m)
        except UserError as e:
            return [], f"**Refused:** {e}", gr.update(choices=[])
        return items, text, _pick_update(gr, names)

    def on_add(name, files, replace_existing, s, t, d, m):
        if not files:
            return gr.update(), "**Refused:** choose files to upload", [], gr.update()
        try:
            dest = ctx.ws.new_folder("pairs", (name or "").strip(), create=False)  # made once the batch passes
            report = P.import_uploads([getattr(f, "name", f) for f in files], dest, replace=bool(replace_existing))
            rel = ctx.ws.relative(dest)
            items, text, names = show_pairs(ctx, rel, s, t, d, m)
        except UserError as e:
            return gr.update(), f"**Refused:** {e}", [], gr.update()
        return (gr.update(choices=ctx.ws.folders(), value=rel), f"Added {len(report)} file(s) to `{rel}`.\n\n" + text,
                items, _pick_update(gr, names))

    def refresh_folders():
        return gr.update(choices=ctx.ws.folders("pairs") + [f for f in ctx.ws.folders() if not f.startswith("pairs")])

    page.show.click(on_show, [page.folder, *page.view_settings], [page.gallery, page.status, page.pick])
    page.add.click(on_add, [page.new_name, page.upload, page.replace, *page.view_settings],
                   [page.folder, page.status, page.gallery, page.pick])
    page.folder.focus(refresh_folders, None, page.folder, **QUIET)


def _wire_more_tools(gr, ctx, page) -> None:
    """The folded tools' buttons; each shows the folder it made or changed."""

    def shown(rel, prefix, s, t, d, m):
        items, text, names = show_pairs(ctx, rel, s, t, d, m)
        return gr.update(choices=ctx.ws.folders(), value=rel), f"{prefix}\n\n{text}", items, _pick_update(gr, names)

    def refused(e):
        return gr.update(), f"**Refused:** {e}", gr.update(), gr.update()

    def on_toy(task, n, name, s, t, d, m, progress=gr.Progress()):
        try:
            progress(0.1, desc=f"rendering {int(n or 0)} toy pair(s)")
            dest = make_toy_pairs(ctx, task, n or 0, name)
            return shown(ctx.ws.relative(dest), f"Made {int(n)} toy pair(s) of '{task}'.", s, t, d, m)
        except UserError as e:
            return refused(e)

    def on_slots(f, name, before, after, replace_existing, s, t, d, m):
        try:
            report = add_pair(ctx, f, name, getattr(before, "name", before), getattr(after, "name", after),
                              bool(replace_existing))
            return shown(f, "Added " + ", ".join(report) + ".", s, t, d, m)
        except UserError as e:
            return refused(e)

    def on_prep(action):
        def go(f, size, s, t, d, m, progress=gr.Progress()):
            try:
                progress(0.1, desc=f"{action}: running")
                out, report = prep_folder(ctx, f, action, size or 512, s or "_after")
                return shown(out, f"Wrote `{out}`:\n```\n{report[-1500:]}\n```", s, t, d, m)
            except UserError as e:
                return refused(e)
        return go

    def on_tag(f, s, t, d, m, progress=gr.Progress()):
        try:
            progress(0.1, desc="tagging")
            report = tag_folder(ctx, f)
            return shown(f, f"```\n{report[-1500:]}\n```", s, t, d, m)
        except UserError as e:
            return refused(e)

    after_action = [page.folder, page.status, page.gallery, page.pick]
    view = page.view_settings
    page.toy_go.click(on_toy, [page.toy_task, page.toy_n, page.toy_name, *view], after_action)
    page.slot_add.click(on_slots, [page.folder, page.slot_name, page.slot_before, page.slot_after, page.replace, *view],
                        after_action)
    page.align.click(on_prep("align"), [page.folder, page.crop_size, *view], after_action)
    page.crop.click(on_prep("crop"), [page.folder, page.crop_size, *view], after_action)
    page.tag.click(on_tag, [page.folder, *view], after_action)


def _wire_editor(ctx, page) -> None:
    """Picking a pair loads its captions and instruction; "Save" writes them; the tag difference follows edits."""

    def on_pick(f, s, name):
        if not name:
            return "", "", ""
        try:
            p = pair_named(ctx, f, s, name)
        except UserError:
            return "", "", ""
        return P.read_caption(p.before), P.read_caption(p.after) if p.after else "", P.read_instruction(p.before) or ""

    def on_save(f, s, name, cb, ca, edit):
        try:
            p = pair_named(ctx, f, s, name)
            P.write_caption(p.before, cb)
            if p.after:
                P.write_caption(p.after, ca)
            P.write_instruction(p.before, edit)
        except UserError as e:
            return f"**Refused:** {e}"
        return f"Saved the captions and the instruction of {name}."

    for box in (page.before_caption, page.after_caption):
        box.change(tag_diff, [page.before_caption, page.after_caption], page.diff, **QUIET)
    page.pick.change(on_pick, [page.folder, page.suffix, page.pick],
                     [page.before_caption, page.after_caption, page.instruction], **QUIET)
    page.save.click(on_save, [page.folder, page.suffix, page.pick, page.before_caption, page.after_caption,
                              page.instruction], page.saved, **QUIET)
