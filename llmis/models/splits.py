"""GGUF split files: ``name-00001-of-00003.gguf`` ... ``name-00003-of-00003.gguf``.

llama.cpp loads a split model from its first part and finds the others next to it by this
naming pattern, so the parts must sit side by side under their original names. Only the
first part stands for the model; the others are its continuation.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

__all__ = ["SplitName", "is_continuation_part", "parse_split_name", "split_part_paths"]

_SPLIT = re.compile(r"^(?P<prefix>.+)-(?P<index>\d{5})-of-(?P<count>\d{5})\.gguf$", re.IGNORECASE)


@dataclass(frozen=True)
class SplitName:
    prefix: str
    index: int  # 1-based
    count: int

    def part_name(self, index: int) -> str:
        return f"{self.prefix}-{index:05d}-of-{self.count:05d}.gguf"


def parse_split_name(name: str) -> SplitName | None:
    """The split fields of a file name, or None when it is not a split part."""
    match = _SPLIT.match(name)
    if match is None:
        return None
    index, count = int(match["index"]), int(match["count"])
    if not 1 <= index <= count or count < 2:
        return None
    return SplitName(match["prefix"], index, count)


def is_continuation_part(path: Path) -> bool:
    """True for parts 2..N of a split model (served through their first part)."""
    split = parse_split_name(path.name)
    return split is not None and split.index > 1


def split_part_paths(first: Path) -> list[Path]:
    """Every part of the split model whose first part is ``first`` ([first] if not split)."""
    split = parse_split_name(first.name)
    if split is None or split.index != 1:
        return [first]
    return [first.with_name(split.part_name(i)) for i in range(1, split.count + 1)]
