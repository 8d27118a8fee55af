"""Caption editing for `difflora prep captions`: kohya's comma-separated tags.

The edits run in a fixed order on each caption: replace, remove, dedupe, sort by frequency, trigger
word first (so `keep_tokens = 1` keeps it in place when captions are shuffled).
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field


def split_tags(caption: str, separator: str = ",") -> list[str]:
    return [t.strip() for t in caption.split(separator) if t.strip()]


def join_tags(tags: list[str]) -> str:
    return ", ".join(tags)


def _key(tag: str) -> str:
    return " ".join(tag.lower().replace("_", " ").split())


@dataclass
class CaptionEdits:
    trigger: str | None = None
    remove: list[str] = field(default_factory=list)
    replace: dict[str, str] = field(default_factory=dict)
    dedupe: bool = True
    sort_by_frequency: bool = False

    def apply(self, tags: list[str], frequency: Counter | None = None) -> list[str]:
        replace = {_key(k): v for k, v in self.replace.items()}
        out = []
        for t in tags:
            t = replace.get(_key(t), t)
            out.extend(split_tags(t))  # a replacement may be several tags, or nothing
        removed = {_key(r) for r in self.remove}
        out = [t for t in out if _key(t) not in removed]
        if self.dedupe:
            seen, unique = set(), []
            for t in out:
                if _key(t) not in seen:
                    seen.add(_key(t))
                    unique.append(t)
            out = unique
        if self.sort_by_frequency and frequency is not None:
            order = {t: i for i, t in enumerate(out)}
            out = sorted(out, key=lambda t: (-frequency[_key(t)], order[t]))
        if self.trigger:
            out = [self.trigger] + [t for t in out if _key(t) != _key(self.trigger)]
        return out


def tag_frequency(captions: list[list[str]]) -> Counter:
    """How many captions contain each tag (compared case- and underscore-insensitively)."""
    freq: Counter = Counter()
    for tags in captions:
        freq.update({_key(t) for t in tags})
    return freq


def pair_difference(before: list[str], after: list[str]) -> dict[str, list[str]]:
    """What a pair teaches, in words: the tags both captions share, and those only one has."""
    kb, ka = {_key(t): t for t in before}, {_key(t): t for t in after}
    return {
        "shared": [t for t in before if _key(t) in ka],
        "before_only": [t for t in before if _key(t) not in ka],
        "after_only": [t for t in after if _key(t) not in kb],
    }
