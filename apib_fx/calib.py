"""Calibration inputs: turn what the user passes into a list of input batches, or say what is wrong."""
from __future__ import annotations

import inspect
import warnings
from typing import Any, Iterable, Optional, Sequence, Union

import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset, IterableDataset

CalibData = Union[Tensor, Iterable[Any], None]


class CalibrationError(ValueError):
    """Calibration data that cannot be used, with what was expected."""


Batch = tuple[Tensor, ...]  # one tensor per model input


def forward_inputs(model: nn.Module) -> list[str]:
    """Names of the inputs ``model.forward`` requires (positional parameters without a default);
    a forward of ``*args`` alone counts as one input."""
    try:
        params = inspect.signature(model.forward).parameters.values()
    except (TypeError, ValueError):
        return ["input"]
    names = [p.name for p in params
             if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD) and p.default is p.empty]
    return names or ["input"]


def batch_inputs(batch: Any, i: int, names: Sequence[str] = ("input",)) -> Batch:
    """The model inputs of one batch: a tensor (a model of one input), or a tuple/list whose first
    ``len(names)`` items are the inputs (labels may follow), or a dict holding them under the
    forward's parameter ``names`` (else its first ``len(names)`` values)."""
    n = len(names)
    if isinstance(batch, Tensor) and n == 1:
        items: list[Any] = [batch]
    elif isinstance(batch, (tuple, list)) and len(batch) >= n:
        items = list(batch[:n])
    elif isinstance(batch, dict) and len(batch) >= n:
        items = [batch[k] for k in names] if all(k in batch for k in names) else list(batch.values())[:n]
    else:
        got = type(batch).__name__
        if isinstance(batch, (tuple, list, dict)):
            got += f" of {len(batch)}"
        expected = ("a tensor or a tuple/list/dict whose first element is the input tensor" if n == 1 else
                    f"a tuple/list/dict whose first {n} elements are the {n} input tensors ({', '.join(names)})")
        raise CalibrationError(f"calibration batch {i} is a {got}; expected {expected}")
    for k, x in enumerate(items):
        if not isinstance(x, Tensor):
            which = "first element" if n == 1 else f"input {k} ({names[k]})"
            raise CalibrationError(f"the {which} of calibration batch {i} is a {type(x).__name__}, not a tensor")
    return tuple(items)


def random_inputs(example: Tensor, batch: int, generator: torch.Generator) -> Tensor:
    """``batch`` random samples shaped like ``example``'s: Gaussian for floating point inputs;
    for integer inputs (token ids, indices) uniform over the range of values ``example`` holds,
    so they stay valid for the model."""
    shape = (batch, *example.shape[1:])
    if example.is_floating_point():
        return torch.randn(shape, generator=generator, dtype=example.dtype)
    if example.dtype == torch.bool:
        return torch.randint(0, 2, shape, generator=generator).bool()
    lo, hi = (int(example.min()), int(example.max())) if example.numel() else (0, 0)
    return torch.randint(lo, hi + 1, shape, generator=generator).to(example.dtype)


def calibration_batches(
    calib_data: CalibData,
    num_calib: int,
    batch_size: int,
    example_inputs: Optional[Batch] = None,
    seed: int = 0,
    scoring: bool = True,
    names: Sequence[str] = ("input",),
) -> list[Batch]:
    """Up to ``num_calib`` samples from ``calib_data`` re-cut into batches of ``batch_size``, each
    a tuple with one tensor per model input (``names``: the forward's inputs, or as many as
    ``example_inputs`` holds).

    ``calib_data``: a DataLoader or any iterable of batches, a map-style Dataset of samples
    (``num_calib`` of them drawn at random, seeded by ``seed``), or one tensor of samples; ``None``
    draws Gaussian inputs shaped like ``example_inputs`` (scores are then only indicative, which
    a warning says when ``scoring``: the samples feed a data-driven score, not only the trace).
    """
    if num_calib < 2:
        raise CalibrationError(f"num_calib must be at least 2 (kernels compare samples), got {num_calib}")
    if example_inputs is not None and len(example_inputs) != len(names):
        names = [f"input {k}" for k in range(len(example_inputs))]
    if calib_data is None:
        if example_inputs is None:
            raise CalibrationError(
                "no calibration data and no example_inputs: pass calib_data (a DataLoader, an "
                "iterable of batches or a tensor of inputs) or example_inputs=torch.randn(1, C, H, W) "
                "so synthetic inputs of the right shape can be drawn"
            )
        if scoring:
            warnings.warn(
                "apib_fx.prune: no calib_data given, scoring on synthetic Gaussian inputs; data-driven "
                "scores (APIB) are only meaningful on real data",
                stacklevel=3,
            )
        gen = torch.Generator().manual_seed(seed)
        return _cut(tuple(random_inputs(t, num_calib, gen) for t in example_inputs), batch_size)
    if isinstance(calib_data, Tensor):
        source: Iterable[Any] = [calib_data]
    elif isinstance(calib_data, Dataset) and not isinstance(calib_data, IterableDataset):
        # A map-style dataset yields samples, not batches; and stored in order (an ImageFolder:
        # class by class), its first samples would all be one class.
        source = _batched(calib_data, batch_size, num_calib, seed)
    else:
        try:
            source = iter(calib_data)
        except TypeError:
            raise CalibrationError(
                f"calib_data is a {type(calib_data).__name__}; expected a DataLoader, an iterable of "
                "batches, or a tensor of inputs"
            ) from None
    taken: list[Batch] = []
    count = 0
    expected = [tuple(t.shape[1:]) for t in example_inputs] if example_inputs is not None else None
    integer_ok = [not torch.is_floating_point(t) for t in example_inputs] if example_inputs is not None else None
    for i, batch in enumerate(source):
        xs = batch_inputs(batch, i, names)
        for k, x in enumerate(xs):
            which = "" if len(xs) == 1 else f" input {k} ({names[k]})"
            if not torch.is_floating_point(x) and not (integer_ok and integer_ok[k]):
                raise CalibrationError(
                    f"calibration batch {i}{which} has dtype {x.dtype}; expected floating point model inputs "
                    "(did you pass labels first? For a model that takes integer inputs such as token "
                    "ids, pass example_inputs of that dtype)"
                )
            if x.dim() < 2:
                raise CalibrationError(
                    f"calibration batch {i}{which} has shape {tuple(x.shape)}; expected (batch, ...) model inputs"
                )
            if x.is_floating_point() and not bool(torch.isfinite(x).all()):
                bad = int((~torch.isfinite(x)).sum())
                raise CalibrationError(
                    f"calibration batch {i}{which} holds {bad} NaN or infinite values; expected finite model inputs"
                )
            if x.shape[0] != xs[0].shape[0]:
                raise CalibrationError(
                    f"calibration batch {i} has {x.shape[0]} samples of{which} but {xs[0].shape[0]} of input 0 "
                    f"({names[0]}); expected one sample of each input per sample"
                )
        if expected is None:
            expected = [tuple(x.shape[1:]) for x in xs]
        for k, x in enumerate(xs):
            if tuple(x.shape[1:]) != expected[k]:
                which = "" if len(xs) == 1 else f" input {k} ({names[k]})"
                raise CalibrationError(
                    f"calibration batch {i}{which} has samples of shape {tuple(x.shape[1:])}; expected "
                    f"{expected[k]} (as in example_inputs / the first batch)"
                )
        xs = tuple(x[: num_calib - count].detach() for x in xs)
        taken.append(xs)
        count += xs[0].shape[0]
        if count >= num_calib:
            break
    if count == 0:
        raise CalibrationError("calib_data yielded no samples; expected at least 2 input samples")
    if count < 2:
        raise CalibrationError(f"calib_data yielded {count} sample; kernels need at least 2")
    return _cut(tuple(torch.cat(parts) for parts in zip(*taken)), batch_size)


def _batched(dataset: Dataset, batch_size: int, num: int, seed: int) -> Iterable[Any]:
    """``num`` samples of a map-style ``dataset`` drawn without replacement (seeded), collated
    into batches of ``batch_size``."""
    try:
        size = len(dataset)  # type: ignore[arg-type]
    except TypeError:
        raise CalibrationError(
            f"calib_data is a {type(dataset).__name__} (a map-style Dataset) without a length; pass a "
            "DataLoader over it"
        ) from None
    order = torch.randperm(size, generator=torch.Generator().manual_seed(seed))[:num]
    try:
        yield from DataLoader(dataset, batch_size=batch_size, sampler=order.tolist())
    except (TypeError, RuntimeError) as e:
        raise CalibrationError(
            f"calib_data is a {type(dataset).__name__} whose samples could not be batched ({e}); give it a "
            "transform that returns tensors (e.g. torchvision.transforms.ToTensor()) or pass a DataLoader"
        ) from e


def _cut(data: Batch, batch_size: int) -> list[Batch]:
    batches = list(zip(*(t.split(batch_size) for t in data)))
    if len(batches) > 1 and batches[-1][0].shape[0] < 2:  # a 1-sample kernel carries nothing
        batches.pop()
    return batches
