"""The `difflora` command line.

Each command lives in its own module and exposes `register(subparsers)`, which adds its
parser and sets `func` (a callable taking the parsed args and returning an exit code or
None). `main` turns a UserError into one line on stderr and exit code 2, and any other
exception that escapes into one line naming the command and its file, exit code 1 (`-v` shows
the traceback). A reader that closes our stdout (`difflora inspect X | head`) ends us quietly.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import re
import sys
import traceback

from .errors import TrainingStopped, UserError

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


class _Parser(argparse.ArgumentParser):
    """argparse, with its errors in the house style: one line, exit code 2."""

    def error(self, message: str):
        self.exit(2, f"difflora: error: {' '.join(message.split())} (see '{self.prog} --help')\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
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


_NEGATIVE_LIST = re.compile(r"^-(\d|\.\d|inf|nan)[\w.,:+\-]*$", re.IGNORECASE)


def join_negative_values(argv: list[str]) -> list[str]:
    """`--sweep -1,0,1` -> `--sweep=-1,0,1`: argparse would read '-1,0,1' as an option."""
    out: list[str] = []
    for tok in argv:
        if out and out[-1].startswith("--") and "=" not in out[-1] and _NEGATIVE_LIST.match(tok) and ("," in tok or ":" in tok):
            out[-1] = f"{out[-1]}={tok}"
        else:
            out.append(tok)
    return out


# The attribute holding each command's main file, for naming it in an error.
_FILE_ARGS = ("job", "file", "model", "models", "dir", "model_tuned", "save_to", "out")


def _operation(args) -> str:
    """`difflora train (job.toml)`: the command that failed, and its file when it has one."""
    words = ["difflora", str(getattr(args, "command", "") or "")]
    words += [str(v) for k, v in vars(args).items() if k.endswith("_command") and v]
    op = " ".join(w for w in words if w)
    for name in _FILE_ARGS:
        value = getattr(args, name, None)
        if isinstance(value, list):
            value = value[0] if value else None
        if value:
            return f"{op} ({value})"
    return op


def _end_progress_bars() -> None:
    """Close open tqdm bars, so that an error message starts on a line of its own."""
    tqdm_module = sys.modules.get("tqdm.std")
    if tqdm_module is None:
        return
    for bar in list(getattr(tqdm_module.tqdm, "_instances", ())):
        try:
            bar.close()
        except Exception:  # a bar that cannot draw any more: nothing to end
            pass


def _quiet_closed_stdout() -> None:
    """Our reader went away: send what is left in the buffer, and at exit, nowhere."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError):  # stdout is not a real file (a test's capture): nothing to redirect
        pass


def _internal_error(e: BaseException, args) -> str:
    text = " ".join(str(e).split())
    where = f"{e.filename}: " if isinstance(e, OSError) and e.filename else ""
    return (f"{where}internal error in {_operation(args)}: {type(e).__name__}"
            + (f": {text}" if text else "")
            + (" (the traceback is above; please report it)" if args.verbose
               else " (run with -v for the traceback; please report it)"))


def main(argv: list[str] | None = None) -> int:
    # Never reach for a model hub: every model is a local path.
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
    parser = build_parser()
    try:
        args = parser.parse_args(join_negative_values(list(sys.argv[1:] if argv is None else argv)))
    except BrokenPipeError:  # `difflora --help | head`
        _quiet_closed_stdout()
        return 141
    except SystemExit as e:  # --help, or a bad option (already reported in one line)
        return e.code if isinstance(e.code, int) else 2
    setup_logging(args.verbose, args.quiet)
    try:
        code = args.func(args)
        sys.stdout.flush()  # a closed pipe shows up here, not at exit
    except UserError as e:
        _end_progress_bars()
        stopped_on_request = isinstance(e, TrainingStopped) and e.requested
        print(f"difflora: {'' if stopped_on_request else 'error: '}{e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        _end_progress_bars()
        print("difflora: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        _quiet_closed_stdout()
        return 141  # as if killed by SIGPIPE, which is what the shell expects of `| head`
    except Exception as e:
        _end_progress_bars()
        if args.verbose:
            traceback.print_exc()
        print(f"difflora: error: {_internal_error(e, args)}", file=sys.stderr)
        return 1
    return int(code or 0)


if __name__ == "__main__":
    sys.exit(main())
