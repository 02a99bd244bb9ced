"""Where every benchmark's table goes: written whole or not at all (an interrupted run keeps the
previous results file)."""
from __future__ import annotations

from pathlib import Path

from apib_fx._atomic import write_text


def emit(lines: list[str], row: str) -> None:
    """Show a table row as soon as it is measured and keep it for the results file."""
    print(row, flush=True)
    lines.append(row)


def write_results(path: str | Path, text: str | list[str]) -> Path:
    """Write ``text`` (or lines, one per line) to ``path`` atomically (creating its folder) and
    say where."""
    if isinstance(text, list):
        text = "\n".join(text) + "\n"
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    write_text(out, text)
    print(f"written {out}")
    return out
