"""Every command the README shows is one difflora accepts, and the first-steps block runs as written.

The README is the newcomer's first contact: a renamed option or sub-command there is a broken promise. Each
`.venv/bin/...` command in a bash block, an indented block or inline code is checked against the real
argument parser (and the scripts/extras it names against the tree); the "three commands" block is run
end to end on the embedded model, in a fresh folder holding only `examples/`.
"""

from __future__ import annotations

import re
import shlex
import shutil
import sys
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"


def _bash_blocks(text: str) -> list[list[str]]:
    """Commands of the ```bash blocks and the 4-space indented blocks, continuation lines joined."""
    blocks, current, fenced = [], [], False
    for line in text.splitlines():
        if line.startswith("```"):
            if fenced:
                blocks.append(current)
            fenced, current = line.strip() == "```bash", []
            continue
        if fenced:
            current.append(line)
        elif line.startswith("    .venv/bin/"):
            blocks.append([line.strip()])
    commands = []
    for block in blocks:
        joined = "\n".join(block).replace("\\\n", " ")
        commands.append([c.strip() for c in joined.splitlines() if c.strip() and not c.strip().startswith("#")])
    return commands


def readme_commands() -> list[str]:
    text = README.read_text()
    inline = re.findall(r"`(\.venv/bin/(?:pip|tensorboard) [^`]+)`", text)  # whole commands written in prose
    return [c for block in _bash_blocks(text) for c in block] + inline


def readme_mentions() -> list[str]:
    """Inline code naming a command in prose, often with placeholders (`difflora toy dataset --n N --out DIR`)."""
    return [m for m in re.findall(r"`(\.venv/bin/difflora [^`]+)`", README.read_text())]


def _argv(command: str) -> list[str]:
    return shlex.split(command, comments=True)


COMMANDS = readme_commands()
MENTIONS = readme_mentions()


def test_the_readme_shows_commands():
    assert len(COMMANDS) >= 20 and len(MENTIONS) >= 10
    assert any(c.startswith(".venv/bin/difflora train") for c in COMMANDS)


def _check_difflora(argv: list[str]) -> None:
    from difflora.cli import build_parser, join_negative_values

    try:
        build_parser().parse_args(join_negative_values(argv))
    except SystemExit as e:  # the house-style parser exits 2 with one line on a bad option
        raise AssertionError(f"difflora rejects the README's command: difflora {' '.join(argv)}") from e


def _check(command: str) -> None:
    argv = _argv(command)
    prog = argv[0]
    if prog in ("python3", "cd"):  # the set-up line itself (run by CI's fresh clone)
        return
    assert prog.startswith(".venv/bin/"), command
    tool = prog.removeprefix(".venv/bin/")
    if tool == "difflora":
        _check_difflora(argv[1:])
    elif tool in ("accelerate", "torchrun"):
        assert "-m" in argv and argv[argv.index("-m") + 1] == "difflora", command
        _check_difflora(argv[argv.index("-m") + 2:])
        assert shutil.which(tool, path=str(Path(sys.executable).parent)), f"{tool} is not installed"
    elif tool == "python":
        if argv[1:3] == ["-m", "pytest"]:
            assert (ROOT / argv[-1]).exists(), command
        else:
            assert (ROOT / argv[1]).is_file(), f"the README runs a script that does not exist: {argv[1]}"
    elif tool == "pip":
        extras = re.findall(r"\.\[(\w+)\]", command)
        optional = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
        assert extras and all(e in optional for e in extras), command
    elif tool == "tensorboard":
        assert shutil.which("tensorboard", path=str(Path(sys.executable).parent)), command
    else:
        raise AssertionError(f"the README runs a program this test does not know how to check: {command}")


@pytest.mark.parametrize("command", COMMANDS, ids=[c[:60] for c in COMMANDS])
def test_every_readme_command_is_accepted(command):
    _check(command)


def _parser_of(words: list[str]):
    """The (sub-)parser that `difflora WORDS...` reaches, and the words it did not consume."""
    import argparse

    from difflora.cli import build_parser

    parser = build_parser()
    while words:
        subs = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
        if not subs or words[0] not in subs[0].choices:
            break
        parser, words = subs[0].choices[words[0]], words[1:]
    return parser, words


@pytest.mark.parametrize("mention", MENTIONS, ids=[m[:60] for m in MENTIONS])
def test_every_option_named_in_prose_exists(mention):
    """`difflora generate --clip-l --t5xxl ...` in a sentence: the sub-command and each option it names exist."""
    from difflora.cli import build_parser

    words = [w for w in _argv(mention.split("|")[0])[1:] if w != "..."]
    global_options = {o for a in build_parser()._actions for o in a.option_strings}
    words = [w for w in words if w not in global_options]
    parser, rest = _parser_of(words)
    assert parser.prog != build_parser().prog or not rest, f"no such sub-command: {mention}"
    known = {o for a in parser._actions for o in a.option_strings}
    for word in rest:
        if word.startswith("--"):
            assert word.split("=")[0] in known, f"{mention}: {parser.prog} has no option {word}"


def test_a_renamed_option_would_be_caught():
    """The check is not vacuous: an option difflora does not have fails it."""
    with pytest.raises(AssertionError):
        _check(".venv/bin/difflora generate --prompt x --no-such-option 3")
    with pytest.raises(AssertionError):
        test_every_option_named_in_prose_exists(".venv/bin/difflora generate --no-such-option")
    with pytest.raises(AssertionError):
        test_every_option_named_in_prose_exists(".venv/bin/difflora no-such-command --n 3")


@pytest.mark.slow
def test_three_commands_block_runs_as_written(tmp_path, monkeypatch, run_cli):
    """'Learning a difference in three commands', verbatim, in a fresh folder: it writes the grid the README
    describes, and the LoRA changes the image."""
    import numpy as np
    from PIL import Image

    (block,) = [b for b in _bash_blocks(README.read_text()) if any("examples/addift.toml" in c for c in b)]
    assert len(block) == 3
    shutil.copytree(ROOT / "examples", tmp_path / "examples")
    monkeypatch.chdir(tmp_path)
    for command in block:
        argv = _argv(command)
        assert argv[0] == ".venv/bin/difflora"
        code, out, err = run_cli(*argv[1:])
        assert code == 0, f"{command}\n{err}"
    grid = tmp_path / "out" / "000_grid.png"
    assert grid.exists() and (tmp_path / "output" / "eyes_closed.safetensors").exists()
    pngs = sorted((tmp_path / "out").glob("000_*_w*.png"))
    by_weight = {p.stem.rsplit("_w", 1)[1]: np.asarray(Image.open(p), np.float32) for p in pngs}
    assert len(by_weight) == 3, [p.name for p in pngs]
    zero = next(v for k, v in by_weight.items() if float(k.replace("+", "")) == 0)
    plus = next(v for k, v in by_weight.items() if float(k.replace("+", "")) > 0)
    assert np.abs(plus - zero).mean() > 1.0  # the trained LoRA changes the image at +1
