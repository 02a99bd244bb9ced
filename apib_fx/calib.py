"""Calibration inputs: turn what the user passes into a list of input batches, or say what is wrong."""
from __future__ import annotations

import warnings
from typing import Any, Iterable, Optional, Union

import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, IterableDataset

CalibData = Union[Tensor, Iterable[Any], None]


class CalibrationError(ValueError):
    """Calibration data that cannot be used, with what was expected."""


def batch_input(batch: Any, i: int) -> Tensor:
    """A batch is a tensor, or a tuple/list/dict whose first element is the input."""
    if isinstance(batch, Tensor):
        return batch
    if isinstance(batch, (tuple, list)) and batch:
        first = batch[0]
    elif isinstance(batch, dict) and batch:
        first = next(iter(batch.values()))
    else:
        raise CalibrationError(
            f"calibration batch {i} is a {type(batch).__name__}; expected a tensor or a "
            "tuple/list/dict whose first element is the input tensor"
        )
    if not isinstance(first, Tensor):
        raise CalibrationError(
            f"the first element of calibration batch {i} is a {type(first).__name__}, not a tensor"
        )
    return first


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
    example_inputs: Optional[Tensor] = None,
    seed: int = 0,
    scoring: bool = True,
) -> list[Tensor]:
    """Up to ``num_calib`` samples from ``calib_data`` re-cut into batches of ``batch_size``.

    ``calib_data``: a DataLoader or any iterable of batches, a map-style Dataset of samples
    (``num_calib`` of them drawn at random, seeded by ``seed``), or one tensor of samples; ``None``
    draws Gaussian inputs shaped like ``example_inputs`` (scores are then only indicative, which
    a warning says when ``scoring``: the samples feed a data-driven score, not only the trace).
    """
    if num_calib < 2:
        raise CalibrationError(f"num_calib must be at least 2 (kernels compare samples), got {num_calib}")
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
        data = random_inputs(example_inputs, num_calib, torch.Generator().manual_seed(seed))
        return _cut(data, batch_size)
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
    taken: list[Tensor] = []
    count = 0
    expected = tuple(example_inputs.shape[1:]) if example_inputs is not None else None
    integer_inputs = example_inputs is not None and not torch.is_floating_point(example_inputs)
    for i, batch in enumerate(source):
        x = batch_input(batch, i)
        if not torch.is_floating_point(x) and not integer_inputs:
            raise CalibrationError(
                f"calibration batch {i} has dtype {x.dtype}; expected floating point model inputs "
                "(did you pass labels first? For a model that takes integer inputs such as token "
                "ids, pass example_inputs of that dtype)"
            )
        if x.dim() < 2:
            raise CalibrationError(
                f"calibration batch {i} has shape {tuple(x.shape)}; expected (batch, ...) model inputs"
            )
        if x.is_floating_point() and not bool(torch.isfinite(x).all()):
            bad = int((~torch.isfinite(x)).sum())
            raise CalibrationError(
                f"calibration batch {i} holds {bad} NaN or infinite values; expected finite model inputs"
            )
        if expected is None:
            expected = tuple(x.shape[1:])
        elif tuple(x.shape[1:]) != expected:
            raise CalibrationError(
                f"calibration batch {i} has samples of shape {tuple(x.shape[1:])}; expected {expected} "
                "(as in example_inputs / the first batch)"
            )
        x = x[: num_calib - count].detach()
        taken.append(x)
        count += x.shape[0]
        if count >= num_calib:
            break
    if count == 0:
        raise CalibrationError("calib_data yielded no samples; expected at least 2 input samples")
    if count < 2:
        raise CalibrationError(f"calib_data yielded {count} sample; kernels need at least 2")
    return _cut(torch.cat(taken), batch_size)


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


def _cut(data: Tensor, batch_size: int) -> list[Tensor]:
    batches = list(data.split(batch_size))
    if len(batches) > 1 and batches[-1].shape[0] < 2:  # a 1-sample kernel carries nothing
        batches.pop()
    return batches
