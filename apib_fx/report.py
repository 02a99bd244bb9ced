"""Write what a pruning run did: report.json, report.md and channels.png."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Optional

from ._atomic import atomic_path, write_bytes
from .prune import PruneReport


def _sample(report: PruneReport) -> str:
    shapes = report.input_shapes or (report.input_shape,)
    return " and ".join("x".join(map(str, shape)) for shape in shapes) + (" input" if len(shapes) == 1 else " inputs")


def markdown(report: PruneReport, extra: Optional[dict[str, Any]] = None) -> str:
    lines = [
        f"# apib_fx pruning report ({report.method})",
        "",
        "| | before | after |",
        "|---|---:|---:|",
        f"| FLOPs (MACs, one {_sample(report)}) | {report.flops_before:,} | {report.flops_after:,} |",
        f"| parameters | {report.params_before:,} | {report.params_after:,} |",
        "",
        f"FLOPs removed: **{report.flops_reduction:.2%}** (target {report.flops_target:.2%}); "
        f"global threshold α = {report.alpha:.4g}; calibration samples: {report.num_calib}"
        + ("; attention pruned by whole heads." if report.heads == "whole" else "."),
        "",
        "## Time per phase (s)",
        "",
        "| " + " | ".join(report.timings) + " |",
        "|" + "---:|" * len(report.timings),
        "| " + " | ".join(f"{v:.2f}" for v in report.timings.values()) + " |",
        "",
    ]
    for key, value in (extra or {}).items():
        lines.append(f"- {key}: {value}")
    if report.specialized:
        lines += ["", "## Branches on the input's shape", "",
                  f"The forward branches on its input's shape; the model was traced with one {_sample(report)}, "
                  "and the pruned model takes the same branches (it raises AssertionError for inputs that "
                  "would take others):", ""]
        lines += [f"- {s}" for s in report.specialized]
    lines += ["", "## Channels per layer group", "", report.table(), ""]
    return "\n".join(lines)


def channels_plot(report: PruneReport, path: Path) -> None:
    """Bar chart per prunable group: original vs kept widths."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [g for g in report.groups if g.prunable]
    fig, ax = plt.subplots(figsize=(max(6, 0.18 * len(rows) + 2), 4))
    xs = range(len(rows))
    ax.bar(xs, [g.channels_before for g in rows], color="#c8d4e3", label="original")
    ax.bar(xs, [g.channels_after for g in rows], color="#2f6db5", label="kept")
    ax.set_xlabel("channel group (in graph order)")
    ax.set_ylabel("channels")
    ax.set_title(f"{report.method}: {report.flops_reduction:.1%} of FLOPs removed")
    ax.legend()
    fig.tight_layout()
    try:
        with atomic_path(path) as tmp:
            fig.savefig(tmp, dpi=110, format="png")
    finally:
        plt.close(fig)


def write_reports(report: PruneReport, out_dir: str | Path, extra: Optional[dict[str, Any]] = None) -> dict[str, Path]:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"json": out / "report.json", "md": out / "report.md", "png": out / "channels.png"}
    data = report.to_dict()
    data.update(extra or {})
    write_bytes(paths["json"], json.dumps(data, indent=2, default=str).encode())
    write_bytes(paths["md"], markdown(report, extra).encode())
    channels_plot(report, paths["png"])
    return paths
