"""Time to build the channel-dependency graph: apib_fx.trace vs Torch-Pruning's
DependencyGraph().build_dependency, same models, same inputs, same run.

    python benchmarks/trace_speed.py [--size 224] [--repeat 3]

Both are warmed up once per model, then run alternately ``--repeat`` times (so a noisy machine
slows both alike); the median of each is reported.
"""
from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch

import apib_fx
from apib_fx.testing import zoo_model

from _results import emit, write_results

MODELS = ["resnet18", "resnet50", "resnext50_32x4d", "vgg16_bn", "densenet121", "googlenet",
          "inception_v3", "mobilenet_v2", "mobilenet_v3_large", "efficientnet_b0", "regnet_y_400mf",
          "shufflenet_v2_x1_0", "convnext_tiny"]


def timed_pair(ours, theirs, repeat: int) -> tuple[float, float | Exception]:
    """Median times of ``ours`` and ``theirs``, run alternately after one warm-up each; an
    exception raised by ``theirs`` is returned in place of its time."""
    ours()
    try:
        theirs()
    except Exception as e:  # report, never hide
        return timed_pair(ours, lambda: None, repeat)[0], e
    a, b = [], []
    for _ in range(repeat):
        for fn, times in ((ours, a), (theirs, b)):
            t = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t)
    return statistics.median(a), statistics.median(b)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--repeat", type=int, default=9)
    ap.add_argument("--models", default=",".join(MODELS))
    ap.add_argument("--out", default="benchmarks/results/trace_speed.md")
    args = ap.parse_args()
    import torch_pruning as tp

    rows = ["| model | apib_fx.trace (s) | Torch-Pruning build_dependency (s) | speedup | apib_fx groups | TP groups "
            "| apib_fx phases (ms): fx / shapes / labels / groups |",
            "|---|---:|---:|---:|---:|---:|---:|"]
    print(f"torch threads: {torch.get_num_threads()}, input 1x3x{args.size}x{args.size}, torch-pruning {tp.__version__}")
    print(rows[0]); print(rows[1])
    for name in args.models.split(","):
        model = zoo_model(name)
        size = 299 if name == "inception_v3" and args.size < 299 else args.size
        x = torch.randn(1, 3, size, size)
        def build():
            return tp.DependencyGraph().build_dependency(model, example_inputs=x)

        phases = []  # ChannelGraph.timings of every timed trace

        def trace():
            phases.append(apib_fx.trace(model, x).timings)

        ours, theirs = timed_pair(trace, build, args.repeat)
        split = " / ".join(f"{1e3 * statistics.median(p[k] for p in phases[-args.repeat:]):.1f}" for k in phases[0])
        n_ours = len(apib_fx.trace(model, x).prunable_groups)
        if isinstance(theirs, Exception):
            cell, speed, n_theirs = f"error: {type(theirs).__name__}", "-", "-"
        else:
            ignored = [m for m in model.modules() if isinstance(m, torch.nn.Linear) and m.out_features == 1000]
            n_theirs = len(list(build().get_all_groups(ignored_layers=ignored)))
            cell, speed = f"{theirs:.3f}", f"{theirs / ours:.2f}x"
        row = f"| {name} | {ours:.3f} | {cell} | {speed} | {n_ours} | {n_theirs} | {split} |"
        emit(rows, row)
    out = Path(args.out)
    write_results(out, f"Input 1x3x{args.size}x{args.size} (inception_v3 299), median of {args.repeat} "
                   "alternating runs, "
                   f"{torch.get_num_threads()} threads, CPU.\n\n" + "\n".join(rows) + "\n")


if __name__ == "__main__":
    main()
