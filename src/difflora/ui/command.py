"""`difflora ui`: the web app's command line (gradio is imported only when it runs)."""

from __future__ import annotations

import re


def register(sub) -> None:
    p = sub.add_parser("ui", help="a local web app: pairs, training with live curves, compare, tools, runs",
                       description="Serves the web UI on 127.0.0.1 (loopback only unless --listen with --auth). "
                                   "Everything it reads or writes stays inside --workspace.")
    p.add_argument("--workspace", default="difflora_workspace", metavar="DIR",
                   help="the folder the UI reads and writes (created if missing; default difflora_workspace)")
    p.add_argument("--allow-path", action="append", default=[], metavar="DIR",
                   help="also read models and data from DIR (repeatable; outputs stay in the workspace)")
    p.add_argument("--port", type=int, default=7860, help="port (default 7860)")
    p.add_argument("--listen", action="store_true", help="serve on every network interface (needs --auth)")
    p.add_argument("--auth", default=None, metavar="USER:PASS", help="require this user name and password")
    p.set_defaults(func=run)


def parse_auth(text: str | None) -> tuple[str, str] | None:
    from ..errors import UserError

    if text is None:
        return None
    user, sep, password = text.partition(":")
    if not sep or not user or not password or re.search(r"\s", user):
        raise UserError("--auth takes USER:PASS (a user name without spaces, a colon, a non-empty password)")
    return user, password


def run(args) -> int:
    from ..errors import UserError

    if args.listen and not args.auth:
        raise UserError("--listen serves the UI to the network and needs --auth USER:PASS")
    if not 1 <= args.port <= 65535:
        raise UserError(f"--port {args.port}: not a TCP port")
    auth = parse_auth(args.auth)
    from .app import serve

    serve(args.workspace, port=args.port, host="0.0.0.0" if args.listen else "127.0.0.1", auth=auth,
          allowed=args.allow_path)
    return 0
