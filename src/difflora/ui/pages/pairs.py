"""Pairs: upload or pick a pair folder; each pair with its difference heat map, training mask and warnings."""

from __future__ import annotations


from ...errors import UserError
from .. import pairs as P


def _composite(view: P.PairView):

    from ...generate import make_grid

    h = view.before.shape[0]
    scale = max(1, 128 // h)
    return make_grid([[view.before, view.after, view.heat, view.mask]], ["before", "after", "difference", "mask"],
                     scale=scale)


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
        label = pair.name + (" ⚠ " + "; ".join(view.warnings) if view.warnings else f" · {view.changed:.1%} changed")
        items.append((_composite(view), label))
        lines += [f"- **{pair.name}**: {w}" for w in view.warnings]
    if not names:
        raise UserError("no pairs here (NAME.png with NAME_after.png)", path=ctx.ws.relative(path))
    summary = f"{len(names)} pair(s) in `{ctx.ws.relative(path)}`; mask at 1/{factor} (the latent grid)."
    return items, summary + ("\n\n**Warnings**\n" + "\n".join(lines) if lines else "\n\nNo warnings."), names


def build(ctx) -> None:
    import gradio as gr

    def refresh_folders():
        return gr.update(choices=ctx.ws.folders("pairs") + [f for f in ctx.ws.folders() if not f.startswith("pairs")])

    gr.Markdown("A pair is `NAME.png` (before) and `NAME_after.png` (after) in one folder, captions in `NAME.txt` / "
                "`NAME_after.txt`. Upload files named that way, or put them in a folder inside the workspace.")
    with gr.Row():
        with gr.Column(scale=2):
            folder = gr.Dropdown(label="pair folder (inside the workspace)", choices=ctx.ws.folders(),
                                 allow_custom_value=True, elem_id="pairs-folder")
            with gr.Row():
                suffix = gr.Textbox(label="after_suffix", value="_after", elem_id="pairs-suffix")
                threshold = gr.Number(label="diff_mask_threshold", value=10.0, elem_id="pairs-threshold")
                dilate = gr.Number(label="diff_mask_dilate", value=2, precision=0, elem_id="pairs-dilate")
                model = gr.Textbox(label="model (blank: embedded)", value="", elem_id="pairs-model")
            show = gr.Button("Show pairs", variant="primary", elem_id="pairs-show")
        with gr.Column(scale=1):
            new_name = gr.Textbox(label="new folder under pairs/", placeholder="eyes", elem_id="pairs-new-name")
            upload = gr.File(label="upload images and captions", file_count="multiple", elem_id="pairs-upload")
            replace = gr.Checkbox(label="replace existing files", value=False, elem_id="pairs-replace")
            add = gr.Button("Add to folder", elem_id="pairs-add")
    status = gr.Markdown(elem_id="pairs-status")
    gallery = gr.Gallery(label="pairs", columns=3, height="auto", object_fit="contain", elem_id="pairs-gallery")
    with gr.Row():
        pick = gr.Dropdown(label="pair", choices=[], elem_id="pairs-pick")
        before_caption = gr.Textbox(label="before caption", elem_id="pairs-caption-before")
        after_caption = gr.Textbox(label="after caption", elem_id="pairs-caption-after")
        save = gr.Button("Save captions", elem_id="pairs-save")
    saved = gr.Markdown(elem_id="pairs-saved")

    def on_show(f, s, t, d, m):
        try:
            items, text, names = show_pairs(ctx, f or "", s, t, d, m)
        except UserError as e:
            return [], f"**Refused:** {e}", gr.update(choices=[])
        return items, text, gr.update(choices=names, value=names[0] if names else None)

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
                items, gr.update(choices=names, value=names[0] if names else None))

    def pair_of(f, s, name):
        folder_path = ctx.ws.resolve(f or "", "pair folder")
        for p in P.find_pairs(folder_path, s or "_after"):
            if p.name == name:
                return p
        raise UserError(f"no pair named {name!r}", path=ctx.ws.relative(folder_path))

    def on_pick(f, s, name):
        if not name:
            return "", ""
        try:
            p = pair_of(f, s, name)
        except UserError:
            return "", ""
        return P.read_caption(p.before), P.read_caption(p.after) if p.after else ""

    def on_save(f, s, name, cb, ca):
        try:
            p = pair_of(f, s, name)
            P.write_caption(p.before, cb)
            if p.after:
                P.write_caption(p.after, ca)
        except UserError as e:
            return f"**Refused:** {e}"
        return f"Saved the captions of {name}."

    show.click(on_show, [folder, suffix, threshold, dilate, model], [gallery, status, pick])
    add.click(on_add, [new_name, upload, replace, suffix, threshold, dilate, model], [folder, status, gallery, pick])
    pick.change(on_pick, [folder, suffix, pick], [before_caption, after_caption])
    save.click(on_save, [folder, suffix, pick, before_caption, after_caption], saved)
    folder.focus(refresh_folders, None, folder)
