"""BENCHMARKS.md, as the benchmark scripts update it: each owns one section between HTML comment markers."""
from __future__ import annotations

from pathlib import Path

PATH = Path(__file__).resolve().parents[1] / "BENCHMARKS.md"


def write_section(key: str, heading: str, body: str) -> None:
    """Replace what lies between ``<!-- key:begin -->`` and ``<!-- key:end -->`` with ``body``; a section
    not there yet is appended under ``heading``."""
    text = PATH.read_text()
    begin, end = f"<!-- {key}:begin -->", f"<!-- {key}:end -->"
    if begin not in text:
        text += f"\n## {heading}\n\n{begin}\n{end}\n"
    PATH.write_text(text[: text.index(begin)] + f"{begin}\n{body}\n{end}" + text[text.index(end) + len(end):])
