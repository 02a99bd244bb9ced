"""Save and load pruned models.

Format ``apib_fx.model/1``: one file written by ``torch.save`` holding a dict
``{"format": "apib_fx.model/1", "torch_version": str, "module": <the nn.Module>, "meta": dict}``.
A pruned model is a ``torch.fx.GraphModule``, which pickles as its generated Python code plus its
submodules, so the smaller shapes and the rewritten ``view``/``split`` sizes travel with it; the
submodules' classes (torch, torchvision, or your own) must be importable where it is loaded.
Loading unpickles: only load files you trust.

:func:`load_weights` reads the other kind of file people have: a ``state_dict`` of an unpruned
model (``torch.save(model.state_dict(), path)`` or a training checkpoint holding one), into a
freshly built model of the same architecture. It reads tensors only (``weights_only``).
"""
from __future__ import annotations

import pathlib
from typing import Any, Mapping, Optional, Union

import torch
from torch import nn

from ._atomic import atomic_path

FORMAT = "apib_fx.model/1"


class ModelFileError(ValueError):
    """A file that is not a readable apib_fx model."""


class WeightsMismatchError(ModelFileError):
    """A state_dict that does not fit the model it is loaded into. ``problems``: what differs;
    ``num_outputs``: when every mismatch is a layer with another number of output rows, all the
    same (a classifier trained for another number of classes), that number; else None."""

    def __init__(self, path: str, problems: str, num_outputs: Optional[int] = None):
        hint = f" (a classifier with {num_outputs} outputs: build the model with {num_outputs} classes)"
        super().__init__(f"the weights in {path!r} do not fit the model: {problems}" + (hint if num_outputs else ""))
        self.path, self.problems, self.num_outputs = path, problems, num_outputs


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
    if _state_dict_in(payload) is not None:
        raise ModelFileError(
            f"{str(p)!r} holds a state_dict (weights without the model), not an apib_fx model file: build "
            "the architecture and read it with apib_fx.load_weights(model, path) (on the command line: "
            "--model torchvision:NAME or cifar:NAME with --weights PATH)"
        )
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise ModelFileError(f"{str(p)!r} is not an apib_fx model file (expected format {FORMAT})")
    model = payload["module"]
    return (model, payload.get("meta", {})) if with_meta else model


# Where training scripts put the state_dict inside a checkpoint dict (timm, Lightning-style,
# torchvision's references and common hand-written loops), and the prefixes that wrappers add
# to every key (DataParallel / DistributedDataParallel, torch.compile).
_STATE_KEYS = ("state_dict", "model_state_dict", "model", "net", "module")
_WRAPPER_PREFIXES = ("module.", "_orig_mod.")


def _state_dict_in(obj: Any) -> Optional[dict[str, torch.Tensor]]:
    """The tensors-by-name mapping in a loaded checkpoint, or None."""
    def is_state(d: Any) -> bool:
        return isinstance(d, Mapping) and bool(d) and all(
            isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in d.items())

    if is_state(obj):
        return dict(obj)
    if isinstance(obj, Mapping):
        for key in _STATE_KEYS:
            if is_state(obj.get(key)):
                return dict(obj[key])
    return None


def _unwrapped(state: dict[str, torch.Tensor], expected: set[str]) -> dict[str, torch.Tensor]:
    for prefix in _WRAPPER_PREFIXES:
        if not (state.keys() & expected) and all(k.startswith(prefix) for k in state):
            state = {k[len(prefix):]: v for k, v in state.items()}
    return state


def _listed(items: list[str], limit: int = 3) -> str:
    """The first ``limit`` of ``items``, and how many more there are."""
    return ", ".join(items[:limit]) + (f" and {len(items) - limit} more" if len(items) > limit else "")


def load_weights(model: nn.Module, path: Union[str, pathlib.Path]) -> nn.Module:
    """Load the ``state_dict`` saved at ``path`` into ``model`` (in place, every tensor) and return it.

    The file may hold the state_dict itself or a checkpoint dict with it under ``state_dict``,
    ``model_state_dict``, ``model``, ``net`` or ``module``; keys prefixed by ``module.``
    (DataParallel) or ``_orig_mod.`` (torch.compile) are matched without the prefix. Read with
    ``weights_only=True``: no code in the file runs. Every name and shape is checked before any
    tensor is copied, so a file that does not fit raises :class:`WeightsMismatchError` (naming the
    missing, unexpected and mis-shaped tensors) and leaves ``model`` as it was.
    """
    p = pathlib.Path(path).expanduser()
    if not p.is_file():
        raise ModelFileError(f"no weights file at {str(p)!r}")
    try:
        obj = torch.load(p, map_location="cpu", weights_only=True)
    except Exception as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ModelFileError(
            f"{str(p)!r} is not a state_dict file that can be read safely ({first}); save the weights "
            "with torch.save(model.state_dict(), path)"
        ) from None
    state = _state_dict_in(obj)
    if state is None:
        keys = list(map(repr, sorted(map(str, obj)))) if isinstance(obj, Mapping) else []
        found = f"a dict with keys {_listed(keys)}" if isinstance(obj, Mapping) else type(obj).__name__
        raise ModelFileError(
            f"{str(p)!r} holds {found}, not a state_dict (a dict of tensors, alone or under one of "
            f"{', '.join(_STATE_KEYS)}); save the weights with torch.save(model.state_dict(), path)"
        )
    own = model.state_dict()
    state = _unwrapped(state, set(own))
    # (BatchNorm fills in a missing step count itself: checkpoints from before torch 0.4.1 lack it)
    missing = [k for k in own if k not in state and not k.endswith("num_batches_tracked")]
    unexpected = [k for k in state if k not in own]
    shapes = [k for k in own if k in state and tuple(state[k].shape) != tuple(own[k].shape)]
    if missing or unexpected or shapes:
        problems = []
        if missing:
            problems.append(f"missing {_listed(list(map(repr, missing)))}")
        if unexpected:
            problems.append(f"unexpected {_listed(list(map(repr, unexpected)))}")
        if shapes:
            problems.append("shapes differ: " + _listed(
                [f"{k!r} is {tuple(state[k].shape)} in the file, {tuple(own[k].shape)} in the model" for k in shapes]))
        head = None  # layers that differ only in their output rows, all alike: another class count
        if shapes and not missing and not unexpected and all(
                state[k].dim() == own[k].dim() >= 1 and state[k].shape[1:] == own[k].shape[1:] for k in shapes):
            rows = {int(state[k].shape[0]) for k in shapes}
            head = rows.pop() if len(rows) == 1 else None
        raise WeightsMismatchError(str(p), "; ".join(problems), head)
    model.load_state_dict(state, strict=True)
    return model
