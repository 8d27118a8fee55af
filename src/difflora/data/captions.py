"""Caption files and kohya's caption processing (prefix/suffix, dropout, keep_tokens, shuffle)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import UserError


def read_caption(path: Path) -> str:
    """The first non-empty line of a UTF-8 caption file (a BOM is ignored)."""
    try:
        raw = path.read_bytes()
    except OSError as e:
        raise UserError(f"cannot read caption ({e.strerror})", path=path) from None
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise UserError(f"caption file is not UTF-8 text (byte {e.start}); re-save it as UTF-8", path=path) from None
    if "\x00" in text:
        raise UserError("caption file contains NUL bytes; it is not a text file", path=path)
    for line in text.splitlines():
        if line.strip():
            return line.strip()
    return ""


@dataclass(frozen=True)
class CaptionRules:
    shuffle_caption: bool = False
    keep_tokens: int = 0
    keep_tokens_separator: str = ""
    caption_separator: str = ","
    caption_prefix: str = ""
    caption_suffix: str = ""
    caption_dropout_rate: float = 0.0
    caption_dropout_every_n_epochs: int = 0
    caption_tag_dropout_rate: float = 0.0


def process_caption(caption: str, rules: CaptionRules, rng: np.random.Generator, epoch: int = 0) -> str:
    """kohya's BaseDataset.process_caption, in its order."""
    if rules.caption_prefix:
        caption = f"{rules.caption_prefix} {caption}"
    if rules.caption_suffix:
        caption = f"{caption} {rules.caption_suffix}"
    if rules.caption_dropout_rate and rng.random() < rules.caption_dropout_rate:
        return ""
    if rules.caption_dropout_every_n_epochs and epoch > 0 and epoch % rules.caption_dropout_every_n_epochs == 0:
        return ""
    if not (rules.shuffle_caption or rules.caption_tag_dropout_rate):
        return caption
    sep = rules.caption_separator or ","
    if rules.keep_tokens_separator and rules.keep_tokens_separator in caption:
        fixed_part, flex_part = caption.split(rules.keep_tokens_separator, 1)
        fixed = [t.strip() for t in fixed_part.split(sep) if t.strip()]
        flex = [t.strip() for t in flex_part.split(sep) if t.strip()]
    else:
        tokens = [t.strip() for t in caption.split(sep) if t.strip()]
        fixed, flex = tokens[: rules.keep_tokens], tokens[rules.keep_tokens:]
    if rules.shuffle_caption:
        flex = [flex[i] for i in rng.permutation(len(flex))]
    if rules.caption_tag_dropout_rate:
        flex = [t for t in flex if rng.random() >= rules.caption_tag_dropout_rate]
    return ", ".join(fixed + flex)
