"""Prune a random 30% of every prunable group of every torchvision CNN and check exactness.

    python benchmarks/zoo_table.py [--models resnet18,densenet121] [--out benchmarks/results/zoo.md]
    python benchmarks/zoo_table.py --models vit_b_16,swin_t,maxvit_t --size 224 \
        --out benchmarks/results/transformers.md      # vision transformers (fixed input sizes)
    python benchmarks/zoo_table.py --models vit_b_16,swin_t,maxvit_t --size 224 --heads whole \
        --out benchmarks/results/transformers_whole_heads.md   # attention by whole heads

Prints (and writes) a table: groups, prunable groups, exact?, FLOPs (MACs) before/after, and
whether the FLOPs model (ChannelGraph.flops) equals count_flops of the rebuilt model.
"""
from __future__ import annotations

import argparse
import gc
import time
from pathlib import Path

import torch

import apib_fx
from apib_fx.testing import CNN_ZOO, check_exact, zoo_input_size, zoo_model

from _results import emit, write_results


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default=",".join(CNN_ZOO))
    ap.add_argument("--out", default="benchmarks/results/zoo.md")
    ap.add_argument("--size", type=int, default=None, help="input size for every model (default: the zoo's small sizes)")
    ap.add_argument("--heads", default="dims", choices=["dims", "whole"], help="apib_fx.trace's heads")
    args = ap.parse_args()
    torch.set_num_threads(max(1, torch.get_num_threads()))
    rows = ["| model | groups | prunable | exact | max diff | MACs before | MACs after | FLOPs model = count | trace s |",
            "|---|---:|---:|---|---:|---:|---:|---|---:|"]
    print(rows[0]); print(rows[1])
    for name in args.models.split(","):
        model = zoo_model(name)
        size = args.size or zoo_input_size(name)
        x = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(0))
        t = time.perf_counter()
        graph = apib_fx.trace(model, x, heads=args.heads)
        t = time.perf_counter() - t
        r = check_exact(model, x, graph=graph)
        exact = "yes" if r.exact_expected and r.max_diff <= 1e-5 else (
            "no (norm mixes channels; shapes ok)" if not r.exact_expected and r.shapes_ok and r.finite else "FAIL")
        row = (f"| {name} | {len(graph.groups)} | {len(graph.prunable_groups)} | {exact} | {r.max_diff:.1e} | "
               f"{r.flops_before:,} | {r.flops_after:,} | {'yes' if r.flops_model == r.flops_after else 'NO'} | {t:.2f} |")
        emit(rows, row)
        del model, graph
        gc.collect()
    out = Path(args.out)
    sizes = f"{args.size}x{args.size}" if args.size else (
        f"{zoo_input_size('resnet18')}x{zoo_input_size('resnet18')} (inception_v3: 75x75)")
    heads = "; attention grouped by whole heads (heads='whole')" if args.heads == "whole" else ""
    note = (f"Inputs: batch 2 at {sizes}; MACs for the whole batch; 30% of every prunable group removed at "
            f"random{heads}.\n\n")
    write_results(out, note + "\n".join(rows) + "\n")


if __name__ == "__main__":
    main()
