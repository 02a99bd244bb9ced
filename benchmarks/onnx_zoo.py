"""ONNX export of every torchvision CNN, unpruned and APIB-pruned at 0.48, checked against ONNX Runtime.

    python benchmarks/onnx_zoo.py [--models resnet18,densenet121] [--out benchmarks/results/onnx_zoo.md]

For each model: prune with APIB (8 Gaussian calibration images at the zoo's small input size,
random weights), export both models with :func:`apib_fx.export_onnx` (ONNX checker, then ONNX
Runtime vs PyTorch at two batch sizes) and print: exported?, max abs diff relative to the output
scale, MACs removed. A failure is reported in its row, never skipped.
"""
from __future__ import annotations

import argparse
import gc
import tempfile
from pathlib import Path

import torch
from tqdm.auto import tqdm

import apib_fx
from apib_fx.testing import CNN_ZOO, zoo_input_size, zoo_model

from _results import write_results


def _export_cell(model, path, x) -> str:
    try:
        onnx = apib_fx.export_onnx(model, path, x)
    except Exception as e:  # report, never hide
        return f"FAIL ({type(e).__name__}: {str(e).splitlines()[0][:80]})"
    p = onnx.parity
    if p["reference"] == "float64":  # PyTorch's own float32 rounding exceeded the tolerance
        return (f"yes | {p['max_diff'] / p['scale']:.1e} vs float64 "
                f"(PyTorch float32: {p['float32_error'] / p['scale']:.1e})")
    return f"yes | {p['max_diff'] / p['scale']:.1e}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default=",".join(CNN_ZOO))
    ap.add_argument("--flops-target", type=float, default=0.48)
    ap.add_argument("--out", default="benchmarks/results/onnx_zoo.md")
    args = ap.parse_args()
    rows = ["| model | input | MACs removed | unpruned exported | rel. max diff | pruned exported | rel. max diff |",
            "|---|---|---:|---|---:|---|---:|"]
    print("\n".join(rows), flush=True)
    names = args.models.split(",")
    with tempfile.TemporaryDirectory() as tmp:
        for name in tqdm(names, desc="onnx zoo", unit="model", leave=False):
            model = zoo_model(name, num_classes=10)
            size = zoo_input_size(name)
            x = torch.randn(8, 3, size, size, generator=torch.Generator().manual_seed(0))
            try:
                pruned = apib_fx.prune(model, args.flops_target, x, num_calib=8, batch_size=8, progress=False)
                removed = f"{pruned.apib_report.flops_reduction:.3f}"
                pruned_cell = _export_cell(pruned, Path(tmp) / f"{name}_pruned.onnx", x[:1])
            except Exception as e:
                removed, pruned_cell = "-", f"FAIL ({type(e).__name__}: {str(e).splitlines()[0][:80]}) | -"
            unpruned_cell = _export_cell(model, Path(tmp) / f"{name}.onnx", x[:1])
            if unpruned_cell.startswith("FAIL"):
                unpruned_cell += " | -"
            row = f"| {name} | {size}x{size} | {removed} | {unpruned_cell} | {pruned_cell} |"
            tqdm.write(row)
            rows.append(row)
            del model
            gc.collect()
    out = Path(args.out)
    text = (f"torchvision CNN zoo, random weights, 10 classes, APIB at flops_target={args.flops_target} on 8 "
            f"Gaussian images; ONNX Runtime CPU vs PyTorch at batch 1 and 3 (diff relative to output scale; "
            f"the check fails above 1e-4, or, where PyTorch's own float32 rounding exceeds that, when ONNX "
            f"Runtime is more than 4x as far from the float64 result as PyTorch is). "
            f"torch {torch.__version__}.\n\n" + "\n".join(rows) + "\n")
    write_results(out, text)


if __name__ == "__main__":
    main()
