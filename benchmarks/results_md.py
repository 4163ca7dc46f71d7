"""benchmarks/RESULTS.md is shared by several scripts: each owns one section between its markers."""

from __future__ import annotations

from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "RESULTS.md"


def markers(name: str) -> tuple[str, str]:
    """The start and end markers of section `name`."""
    return f"<!-- {name}:start -->", f"<!-- {name}:end -->"


def write_section(name: str, section: str, path: Path = RESULTS) -> None:
    """Replace section `name` (`section` holds its markers) in `path`, or append it; the rest is untouched."""
    start, end = markers(name)
    text = path.read_text(encoding="utf-8") if path.exists() else ""
    section = section.strip("\n")
    if start in text and end in text:
        head, rest = text.split(start, 1)
        text = head + section + rest.split(end, 1)[1]
    else:
        text = text.rstrip("\n") + "\n\n" + section + "\n"
    path.write_text(text, encoding="utf-8")
