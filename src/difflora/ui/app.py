"""Building and serving the Gradio app.

Offline by construction: analytics and Gradio's version check are off, server-side rendering and
the MCP server are off, the theme uses local fonts, and Gradio's upload and cache folders live
inside the workspace, which is the only folder it may serve (`allowed_paths`).
"""

from __future__ import annotations

import logging
import os
import signal
import threading
from dataclasses import dataclass

from .runs import RunStore, Runner
from .workspace import ServerLock, Workspace, make_root

log = logging.getLogger(__name__)

MAX_UPLOAD = "20mb"  # per file; pairs.MAX_UPLOAD_BYTES checks it again after the upload


def offline_environment(workspace: Workspace) -> None:
    """Set before gradio is imported: no telemetry, no hub, every temporary file inside the workspace."""
    gradio_dir = workspace.root / ".gradio"
    os.environ.update({
        "GRADIO_ANALYTICS_ENABLED": "False", "GRADIO_SSR_MODE": "False", "GRADIO_MCP_SERVER": "False",
        "GRADIO_TEMP_DIR": str(gradio_dir / "uploads"), "GRADIO_EXAMPLES_CACHE": str(gradio_dir / "cache"),
        "GRADIO_ALLOWED_PATHS": "", "GRADIO_SHARE": "False", "HF_HUB_OFFLINE": "1", "HF_HUB_DISABLE_TELEMETRY": "1",
        "TRANSFORMERS_OFFLINE": "1", "DO_NOT_TRACK": "1",
    })


@dataclass
class Context:
    """What every page needs."""

    ws: Workspace
    store: RunStore
    runner: Runner
    lock: object = None  # the workspace's ServerLock, when serve() does not block (tests release it)


def build(ctx: Context):
    import gradio as gr

    from .pages import QUIET, compare, evaluate, live, pairs, runs, tools, train

    with gr.Blocks(title="difflora") as demo:
        gr.Markdown(f"## difflora · workspace `{ctx.ws.root}`")
        with gr.Tabs(elem_id="tabs") as tabs:
            with gr.Tab("Pairs", id="pairs", elem_id="tab-pairs"):
                pairs.build(ctx)
            with gr.Tab("Train", id="train", elem_id="tab-train"):
                train_page = train.build(ctx)
            with gr.Tab("Live run", id="live", elem_id="tab-live"):
                live_page = live.build(ctx)
            with gr.Tab("Compare", id="compare", elem_id="tab-compare"):
                compare.build(ctx)
            with gr.Tab("Tools", id="tools", elem_id="tab-tools"):
                tools.build(ctx)
            with gr.Tab("Evaluate", id="evaluate", elem_id="tab-evaluate"):
                eval_pick, eval_on_load = evaluate.build(ctx)
            with gr.Tab("Runs", id="runs", elem_id="tab-runs"):
                runs_page = runs.build(ctx)
        train.connect(ctx, train_page, live_page, tabs)
        runs.connect(ctx, runs_page, train_page, live_page, tabs)
        # every page reads the registry when it is opened, not when the app was built
        demo.load(live_page.on_load, None, live_page.pick, **QUIET)
        demo.load(runs_page.on_load, None, [runs_page.table, runs_page.pick], **QUIET)
        demo.load(eval_on_load, None, eval_pick, **QUIET)
    return demo


def serve(workspace: str | os.PathLike, port: int = 7860, host: str = "127.0.0.1",
          auth: tuple[str, str] | None = None, block: bool = True, allowed=()):
    allowed = [Workspace.trusted_folder(a) for a in allowed]
    lock = ServerLock.of(make_root(workspace))
    lock.__enter__()  # before anything is written in the workspace; released when the server stops
    try:
        ws = Workspace(workspace, allowed)
        _check_port(host, port)
        demo, ctx = _launch(ws, port, host, auth)
    except BaseException:
        lock.__exit__()
        raise
    print(f"difflora ui: http://{host}:{port}/ (workspace {ws.root})", flush=True)
    if not block:
        ctx.lock = lock
        return demo, ctx
    done = threading.Event()

    def _stop(signum, frame):
        done.set()

    signal.signal(signal.SIGTERM, _stop)
    signal.signal(signal.SIGINT, _stop)
    done.wait()
    print("difflora ui: stopping; a running training saves its state", flush=True)
    ctx.runner.shutdown()
    demo.close()
    lock.__exit__()
    return None


def _check_port(host: str, port: int) -> None:
    """One line when the port is taken, before anything starts (Gradio's own error is a traceback)."""
    import socket

    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        try:
            probe.bind((host, port))
        except OSError as e:
            from ..errors import UserError

            raise UserError(f"--port {port}: cannot serve on {host}:{port} ({e.strerror}); another program uses it",
                            hint="choose another --port") from None


def _launch(ws: Workspace, port: int, host: str, auth):
    offline_environment(ws)
    import gradio as gr

    logging.getLogger("httpx").setLevel(logging.WARNING)
    store = RunStore(ws.runs)
    runner = Runner(store, ws.root)  # marks runs left executing by a previous server "interrupted"
    runner.start()
    ctx = Context(ws, store, runner)
    demo = build(ctx)
    demo.queue(default_concurrency_limit=4)
    demo.launch(server_name=host, server_port=port, auth=auth, share=False, prevent_thread_lock=True,
                allowed_paths=[str(ws.root)], blocked_paths=[], max_file_size=MAX_UPLOAD, quiet=True,
                show_error=True, ssr_mode=False, mcp_server=False, enable_monitoring=False, pwa=False,
                run_history=False, theme=gr.themes.Default())
    return demo, ctx
