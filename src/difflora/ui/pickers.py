"""What the pages offer to pick: LoRA files by run and name, and the workspace's models.

A LoRA picker lists adapter files only (every key an adapter key: a training state's tensors, a
latent cache or a model is left out), labelled "<name> · run <id>" so a run's files sort together.
A model picker lists diffusers folders (model_index.json) and single-file checkpoints.
"""

from __future__ import annotations

from pathlib import Path

from ..errors import UserError
from ..fileio import read_safetensors_header

SKIPPED_PARTS = ("latent_cache", ".gradio")  # caches, and Gradio's upload folder


def _header_keys(path: Path) -> set[str] | None:
    try:
        tensors, _ = read_safetensors_header(path)
    except UserError:
        return None
    return set(tensors)


def is_adapter_file(path: Path) -> bool:
    from ..network.adapters import KNOWN_SUFFIXES, split_key

    keys = _header_keys(path)
    return bool(keys) and all(split_key(k)[1] in KNOWN_SUFFIXES for k in keys)


def _candidates(ws) -> list[Path]:
    return sorted(p for p in ws.root.rglob("*.safetensors") if p.is_file()
                  and not any(part.startswith(".") or part in SKIPPED_PARTS or part.endswith("-state")
                              for part in p.relative_to(ws.root).parts[:-1]))


def lora_choices(ws) -> list[tuple[str, str]]:
    """(label, workspace path) of every LoRA file: the newest run's first, then files outside runs."""
    rows = []
    for p in _candidates(ws):
        if not is_adapter_file(p):
            continue
        rel = p.relative_to(ws.root).parts
        run = rel[1] if rel[0] == "runs" and len(rel) > 2 else None
        label = f"{p.stem} · run {run}" if run else ws.relative(p)
        rows.append((run or "", label, ws.relative(p)))
    in_runs = sorted((r for r in rows if r[0]), key=lambda r: (r[0], r[1]), reverse=True)
    return [(label, value) for _, label, value in in_runs + [r for r in rows if not r[0]]]


def model_choices(ws) -> list[tuple[str, str]]:
    """(label, workspace path) of the workspace's models: diffusers folders and single-file checkpoints, also
    through symlinks to folders trusted with --allow-path."""
    import os

    out = [("the embedded toy model", "")]
    for top, dirs, files in os.walk(ws.root, followlinks=True):
        rel = Path(top).relative_to(ws.root)
        if rel.parts[:1] in (("runs",), ("tools",), ("compare",)) or any(p.startswith(".") or p.endswith("-state") \
                                                                          for p in rel.parts) \
                or len(rel.parts) > 4:
            dirs[:] = []
            continue
        if "model_index.json" in files:
            out.append((f"{rel.as_posix()} (diffusers folder)", rel.as_posix()))
            dirs[:] = []  # its components are not models of their own
            continue
        for name in sorted(files):
            path = Path(top) / name
            if name.endswith(".safetensors") and _header_keys(path) and not is_adapter_file(path):
                out.append((f"{(rel / name).as_posix()} (single file)", (rel / name).as_posix()))
    return out


def refresh_on_focus(picker, choices) -> None:
    """`picker` lists `choices()` when it is opened. Nothing is sent while they are the ones this page shows:
    a list re-rendered while open moves the option under the user's pointer."""
    import gradio as gr

    from .pages import QUIET

    def as_shown(items) -> list[tuple[str, str]]:  # Gradio's form of a choice: (label, value)
        return [tuple(c) if isinstance(c, (tuple, list)) else (str(c), c) for c in items]

    shown = gr.State(as_shown(picker.choices))  # per browser tab: the choices its picker holds

    def refresh(before):
        now = as_shown(choices())
        return (gr.skip(), before) if now == before else (gr.update(choices=now), now)

    picker.focus(refresh, shown, [picker, shown], **QUIET)
