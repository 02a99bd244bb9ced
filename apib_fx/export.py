"""ONNX export checked against ONNX Runtime, written atomically."""
from __future__ import annotations

import contextlib
import io
import logging
import pathlib
import warnings
from typing import Any, Optional, Sequence

import numpy as np
import torch
from torch import Tensor, nn

from ._atomic import atomic_path
from .calib import random_inputs
from .labels import flatten_values
from .trace import Inputs, as_inputs, eval_mode


# How much farther from the float64 result than PyTorch float32 ONNX Runtime may be, when PyTorch's
# own rounding exceeds the tolerance (see check_onnx_parity).
_FLOAT32_SLACK = 4.0


class OnnxExportError(RuntimeError):
    """Neither ONNX exporter could export the model."""


class OnnxParityError(RuntimeError):
    """ONNX Runtime's outputs differ from PyTorch's beyond tolerance."""


class ExportedOnnx(type(pathlib.Path())):  # type: ignore[misc]
    """The written path, carrying ``parity``: the ONNX Runtime check's figures (or None)."""

    parity: Optional[dict[str, Any]] = None


def _outputs(out: Any) -> list[Tensor]:
    if hasattr(out, "_asdict"):
        out = tuple(out)
    return [t for t in flatten_values(out) if isinstance(t, Tensor)]


@contextlib.contextmanager
def _silenced() -> Any:
    """The exporters print graphs and diagnostics from C++ straight to file descriptors 1 and 2."""
    import os
    import sys

    sys.stdout.flush()
    sys.stderr.flush()
    saved = [os.dup(1), os.dup(2)]
    null = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(null, 1)
        os.dup2(null, 2)
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
            yield
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os.dup2(saved[0], 1)
        os.dup2(saved[1], 2)
        for fd in (*saved, null):
            os.close(fd)


def _export(model: nn.Module, inputs: tuple[Tensor, ...], path: pathlib.Path, dynamic_batch: bool,
            opset: Optional[int]) -> str:
    with torch.no_grad():
        n_out = len(_outputs(model(*inputs)))
    in_names = ["input"] if len(inputs) == 1 else [f"input_{i}" for i in range(len(inputs))]
    out_names = ["output"] if n_out == 1 else [f"output_{i}" for i in range(n_out)]
    axes = {n: {0: "batch"} for n in in_names + out_names} if dynamic_batch else None
    errors = []
    # The TorchScript exporter is 5-20x faster here and handles the CNN zoo; the dynamo exporter
    # covers what it cannot (e.g. adaptive pooling to sizes that do not divide the input).
    for dynamo in (False, True):
        kwargs: dict[str, Any] = dict(input_names=in_names, output_names=out_names, dynamo=dynamo)
        example = inputs
        if dynamo:
            kwargs.update(external_data=False, opset_version=opset)
            if dynamic_batch:
                batch = torch.export.Dim("batch")
                kwargs["dynamic_shapes"] = tuple({0: batch} for _ in inputs)
                # torch.export takes a size-1 dimension for the constant 1 wherever an op could
                # specialise on it (a view, a norm's decomposition), and then refuses the dynamic
                # batch: the example is exported at batch 2 (the parity check runs batch 1).
                example = tuple(torch.cat([t, t]) if t.dim() and t.shape[0] == 1 else t for t in inputs)
        else:
            kwargs.update(dynamic_axes=axes, opset_version=opset or 17, do_constant_folding=True)
        try:
            with warnings.catch_warnings(), _silenced():
                warnings.simplefilter("ignore")
                logging.disable(logging.WARNING)
                try:
                    torch.onnx.export(model, example, str(path), **kwargs)
                finally:
                    logging.disable(logging.NOTSET)
            return "dynamo" if dynamo else "torchscript"
        except Exception as e:  # try the other exporter, report both if neither works
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            errors.append(f"{'dynamo' if dynamo else 'torchscript'} exporter: {type(e).__name__}: {first[:300]}")
    raise OnnxExportError(f"cannot export {type(model).__name__} to ONNX; " + "; ".join(errors))


def _float64_outputs(model: nn.Module, inputs: tuple[Tensor, ...]) -> Optional[list[np.ndarray]]:
    """The model's outputs computed in float64 on a copy (None when it cannot run in float64)."""
    import copy

    try:
        ref = copy.deepcopy(model).double().eval()
        with torch.no_grad():
            return [t.numpy() for t in _outputs(ref(*(t.double() if t.is_floating_point() else t
                                                     for t in inputs)))]
    except Exception:  # e.g. ops without a float64 kernel: fall back to the plain check
        return None


def check_onnx_parity(
    model: nn.Module,
    path: str | pathlib.Path,
    example_inputs: Inputs,
    batch_sizes: Optional[Sequence[int]] = None,
    rtol: float = 1e-4,
    seed: int = 0,
) -> dict[str, Any]:
    """Run ONNX Runtime (CPU) and PyTorch on fresh random inputs at each batch size; raise
    :class:`OnnxParityError` when max |diff| > ``rtol`` x max(1, max |output|).

    A deep, badly conditioned model can amplify float32 rounding beyond that tolerance in PyTorch
    itself. So before failing, both are compared with the model run in float64: ONNX Runtime
    passes when it is within ``rtol`` x scale of the float64 result, or at most 4x as far from it
    as PyTorch's own float32 result is (``float32_error`` in the figures): two float32 runs with
    different fusion and summation order land at comparable distances from the exact result, and a
    wrong export is off by the order of the output itself, so it fails either way."""
    import onnxruntime as ort

    inputs = as_inputs(example_inputs)
    batch_sizes = list(batch_sizes or [inputs[0].shape[0]])
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    session = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    names = [i.name for i in session.get_inputs()]
    gen = torch.Generator().manual_seed(seed)
    worst: dict[str, Any] = {"max_diff": 0.0, "scale": 1.0, "batch": None, "reference": "float32"}
    with eval_mode(model), torch.no_grad():
        for b in batch_sizes:
            fresh = tuple(random_inputs(t, b, gen) for t in inputs)
            want = [t.numpy() for t in _outputs(model(*fresh))]
            got = session.run(None, {n: t.numpy() for n, t in zip(names, fresh)})
            exact = None
            for k, (w, g) in enumerate(zip(want, got)):
                if w.shape != g.shape:
                    raise OnnxParityError(f"ONNX output shape {g.shape} != PyTorch {w.shape} at batch {b}")
                diff = float(np.abs(w - g).max()) if w.size else 0.0
                scale = max(1.0, float(np.abs(w).max()) if w.size else 1.0)
                row: dict[str, Any] = {"max_diff": diff, "scale": scale, "batch": b, "reference": "float32"}
                if not diff <= rtol * scale:
                    exact = _float64_outputs(model, fresh) if exact is None else exact
                    if exact is None or not np.issubdtype(w.dtype, np.floating):
                        raise OnnxParityError(
                            f"ONNX Runtime differs from PyTorch at batch {b}: max |diff| = {diff:.3e}, "
                            f"output scale {scale:.3e}, tolerance {rtol * scale:.3e}")
                    ort_err = float(np.abs(g - exact[k]).max())
                    torch_err = float(np.abs(w - exact[k]).max())
                    if not ort_err <= max(rtol * scale, _FLOAT32_SLACK * torch_err):
                        raise OnnxParityError(
                            f"ONNX Runtime differs from PyTorch at batch {b}: max |diff| = {diff:.3e}, "
                            f"output scale {scale:.3e}, tolerance {rtol * scale:.3e}; against the "
                            f"float64 result ONNX Runtime is off by {ort_err:.3e}, PyTorch float32 "
                            f"by {torch_err:.3e}")
                    row.update(reference="float64", max_diff=ort_err, float32_error=torch_err)
                if row["max_diff"] / row["scale"] >= worst["max_diff"] / worst["scale"]:
                    worst = row
    worst["batch_sizes"] = batch_sizes
    worst["tolerance"] = rtol
    return worst


def export_onnx(
    model: nn.Module,
    path: str | pathlib.Path,
    example_inputs: Inputs,
    *,
    dynamic_batch: bool = True,
    opset: Optional[int] = None,
    check: bool = True,
) -> ExportedOnnx:
    """Export ``model`` to ``path`` (eval mode), run the ONNX checker and, when ``check``, compare
    ONNX Runtime with PyTorch at two batch sizes. Nothing is left at ``path`` on failure (an
    existing file stays as it was). Returns the path; ``.parity`` holds the check's figures."""
    import onnx

    inputs = as_inputs(example_inputs)
    target = pathlib.Path(path)
    parity = None
    with eval_mode(model), atomic_path(target) as tmp:
        exporter = _export(model, inputs, tmp, dynamic_batch, opset)
        onnx.checker.check_model(str(tmp))
        if check:
            b = inputs[0].shape[0]
            parity = check_onnx_parity(model, tmp, inputs, [b, b + 2] if dynamic_batch else [b])
            parity["exporter"] = exporter
    out = ExportedOnnx(target)
    out.parity = parity
    return out
