"""The `difflora` command line.

Each command lives in its own module and exposes `register(subparsers)`, which adds its
parser and sets `func` (a callable taking the parsed args and returning an exit code or
None). `main` turns a UserError into one line on stderr and exit code 2.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import re
import sys

from .errors import UserError

# (module, attribute) of each command's register function, in --help order.
COMMANDS = [
    "difflora.commands.train",
    "difflora.commands.generate",
    "difflora.commands.inspect",
    "difflora.commands.tools",
    "difflora.commands.eval",
    "difflora.commands.demo",
    "difflora.commands.toy",
    "difflora.commands.prep",
    "difflora.ui.command",  # `difflora ui`; imports gradio only when it runs
]

log = logging.getLogger("difflora")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="difflora",
        description="Train LoRA adapters that learn the difference between images, and the tools around them.",
    )
    from . import __version__

    parser.add_argument("--version", action="version", version=f"difflora {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="difflora's debug lines (not the libraries')")
    parser.add_argument("-q", "--quiet", action="store_true", help="warnings and errors only")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    for name in COMMANDS:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as e:
            if e.name == name:
                continue  # command not built yet
            raise
        module.register(sub)
    return parser


def setup_logging(verbose: bool = False, quiet: bool = False) -> None:
    """difflora's own loggers at INFO (DEBUG with -v, WARNING with -q); every library at WARNING.

    The root logger stays at WARNING so that -v shows difflora's debug lines and not the libraries'.
    """
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    log.setLevel(logging.DEBUG if verbose else logging.WARNING if quiet else logging.INFO)


_NEGATIVE_LIST = re.compile(r"^-\d[\d.,:\-e]*$")


def join_negative_values(argv: list[str]) -> list[str]:
    """`--sweep -1,0,1` -> `--sweep=-1,0,1`: argparse would read '-1,0,1' as an option."""
    out: list[str] = []
    for tok in argv:
        if out and out[-1].startswith("--") and "=" not in out[-1] and _NEGATIVE_LIST.match(tok) and ("," in tok or ":" in tok):
            out[-1] = f"{out[-1]}={tok}"
        else:
            out.append(tok)
    return out


def main(argv: list[str] | None = None) -> int:
    # Never reach for a model hub: every model is a local path.
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
    parser = build_parser()
    args = parser.parse_args(join_negative_values(list(sys.argv[1:] if argv is None else argv)))
    setup_logging(args.verbose, args.quiet)
    try:
        code = args.func(args)
    except UserError as e:
        print(f"difflora: error: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        print("difflora: interrupted", file=sys.stderr)
        return 130
    return int(code or 0)


if __name__ == "__main__":
    sys.exit(main())
