"""Where every benchmark's table goes: written whole or not at all (an interrupted run keeps the
previous results file)."""
from __future__ import annotations

from pathlib import Path

from apib_fx._atomic import write_text


def write_results(path: str | Path, text: str) -> Path:
    """Write ``text`` to ``path`` atomically (creating its folder) and say where."""
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    write_text(out, text)
    print(f"written {out}")
    return out
