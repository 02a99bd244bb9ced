"""Save and load pruned models.

Format ``apib_fx.model/1``: one file written by ``torch.save`` holding a dict
``{"format": "apib_fx.model/1", "torch_version": str, "module": <the nn.Module>, "meta": dict}``.
A pruned model is a ``torch.fx.GraphModule``, which pickles as its generated Python code plus its
submodules, so the smaller shapes and the rewritten ``view``/``split`` sizes travel with it; the
submodules' classes (torch, torchvision, or your own) must be importable where it is loaded.
Loading unpickles: only load files you trust.
"""
from __future__ import annotations

import pathlib
from typing import Any, Optional, Union

import torch
from torch import nn

from ._atomic import atomic_path

FORMAT = "apib_fx.model/1"


class ModelFileError(ValueError):
    """A file that is not a readable apib_fx model."""


def save(model: nn.Module, path: Union[str, pathlib.Path], meta: Optional[dict[str, Any]] = None) -> pathlib.Path:
    """Write ``model`` (and ``meta``, e.g. its pruning report) to ``path`` atomically."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    payload = {"format": FORMAT, "torch_version": torch.__version__, "module": model, "meta": dict(meta or {})}
    with atomic_path(path) as tmp:
        torch.save(payload, tmp)
    return pathlib.Path(path)


def load(path: Union[str, pathlib.Path], map_location: Any = "cpu", with_meta: bool = False):
    """Read a model written by :func:`save`; ``with_meta=True`` returns ``(model, meta)``."""
    p = pathlib.Path(path)
    if not p.is_file():
        raise ModelFileError(f"no model file at {str(p)!r}")
    try:
        payload = torch.load(p, map_location=map_location, weights_only=False)
    except Exception as e:
        raise ModelFileError(f"{str(p)!r} is not an apib_fx model file ({type(e).__name__}: {e})") from None
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise ModelFileError(f"{str(p)!r} is not an apib_fx model file (expected format {FORMAT})")
    model = payload["module"]
    return (model, payload.get("meta", {})) if with_meta else model
