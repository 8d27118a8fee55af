"""Sample prompts in kohya's syntax: `prompt --n negative --w 512 --h 512 --d seed --l cfg --s steps --ss sampler`,
plus `--m multiplier` (ai-toolkit) and, for edit models, `--ci control.png` (musubi-tuner's; repeatable, relative to
the prompt file's folder)."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path

from .errors import UserError
from .fileio import read_text_file


@dataclass
class SamplePrompt:
    prompt: str
    negative: str = ""
    width: int | None = None
    height: int | None = None
    seed: int | None = None
    cfg: float | None = None  # None: the family's default (7.5; FLUX: 1, no true CFG)
    steps: int = 30
    sampler: str | None = None
    extra: dict = field(default_factory=dict)


_FLAG = re.compile(r"\s--(n|w|h|d|l|s|ss|m|ci)\s+")


def parse_prompt_line(line: str, source: str = "prompt") -> SamplePrompt:
    """One line of a kohya prompt file. `--m` (ai-toolkit style) sets a LoRA multiplier."""
    parts = _FLAG.split(" " + line.strip())
    sp = SamplePrompt(prompt=parts[0].strip())
    for flag, value in zip(parts[1::2], parts[2::2]):
        value = value.strip()
        try:
            if flag == "n":
                sp.negative = value
            elif flag == "w":
                sp.width = int(value)
            elif flag == "h":
                sp.height = int(value)
            elif flag == "d":
                sp.seed = int(value)
            elif flag == "l":
                sp.cfg = float(value)
            elif flag == "s":
                sp.steps = min(max(int(value), 1), 1000)
            elif flag == "ss":
                sp.sampler = value
            elif flag == "m":
                sp.extra["multiplier"] = float(value)
            elif flag == "ci":
                sp.extra.setdefault("controls", []).append(value)
        except ValueError:
            raise UserError(f"bad value {value!r} for --{flag} in line {line.strip()!r}", path=source) from None
    if not sp.prompt:
        raise UserError(f"empty prompt in line {line.strip()!r}", path=source)
    return sp


def _json_prompt(item: dict, index: int, path: Path) -> SamplePrompt:
    def number(key: str, kind, default=None):
        value = item.get(key, default)
        if value is None:
            return None
        if isinstance(value, bool) or not isinstance(value, (int, float)) or (kind is int and value != int(value)):
            raise UserError(f"entry {index}: {key} must be {'a whole number' if kind is int else 'a number'}, "
                            f"got {value!r}", path=path)
        return kind(value)

    sampler = item.get("sample_sampler")
    if sampler is not None and not isinstance(sampler, str):
        raise UserError(f"entry {index}: sample_sampler must be a name, got {sampler!r}", path=path)
    return SamplePrompt(prompt=item["prompt"], negative=str(item.get("negative_prompt", "")),
                        width=number("width", int), height=number("height", int), seed=number("seed", int),
                        cfg=number("scale", float), steps=number("sample_steps", int, 30), sampler=sampler)


def load_prompt_file(path: str | Path) -> list[SamplePrompt]:
    path = Path(path)
    text = read_text_file(path, "prompt file", "a prompt file (.txt or .json)")
    if path.suffix.lower() == ".json":
        try:
            items = json.loads(text)
        except ValueError as e:
            raise UserError(f"invalid JSON ({e})", path=path) from None
        if not isinstance(items, list):
            raise UserError("a JSON prompt file holds a list of prompts", path=path)
        out = []
        for i, item in enumerate(items, 1):
            if isinstance(item, str):
                out.append(parse_prompt_line(item, str(path)))
            elif isinstance(item, dict) and isinstance(item.get("prompt"), str):
                out.append(_json_prompt(item, i, path))
            else:
                raise UserError("each JSON entry must be a string or an object with 'prompt'", path=path)
        return out
    prompts = [parse_prompt_line(line, str(path)) for line in text.splitlines()
               if line.strip() and not line.strip().startswith("#")]
    if not prompts:
        raise UserError("prompt file has no prompts", path=path)
    for sp in prompts:  # control images named relative to the prompt file
        if "controls" in sp.extra:
            sp.extra["controls"] = [str(path.parent / c) if not Path(c).is_absolute() else c
                                    for c in sp.extra["controls"]]
    return prompts
