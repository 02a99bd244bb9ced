"""torch.fx's symbolic trace of a module, with module calls and attribute reads intercepted on the
module's own classes instead of on ``nn.Module``.

fx intercepts them by setting ``nn.Module.__call__`` and ``nn.Module.__getattr__`` for the trace
and back after it. Assigning a special method to a class makes CPython update the slot of every
subclass (over a thousand once torchvision is imported) and drops their attribute caches, so the
four assignments and the slower forward after them are 2 ms of a 10-30 ms trace. Here the same
wrappers are set on the classes of the modules in the tree being traced (a dozen, with few
subclasses each) and taken off again. What fx does otherwise is unchanged: the same graph, the
same wrapped functions, the same errors for a module that is not in the tree.

Where that could trace differently, :func:`trace_module` leaves it to fx (returns None): a class
in the tree with its own ``__call__`` or ``__getattr__`` (its override would bypass the wrapper on
a base class), a plain ``nn.Module`` in the tree (patching it is fx's way), a trace inside another
(classes already patched), or a torch without the private helpers used here.
"""
from __future__ import annotations

import functools
import inspect
from types import FunctionType
from typing import Any, Iterator, Optional

from torch import fx, nn

try:
    from torch.fx import _symbolic_trace as _fx
    from torch.fx._lazy_graph_module import _LazyGraphModule
    _HELPERS = (_fx._new_patcher, _fx._patch_wrapped_functions, _fx._autowrap_check, _fx._orig_module_call,
                _fx._orig_module_getattr, _fx._get_is_fx_tracing, _fx._set_is_fx_tracing,
                _fx._constant_attribute_types, _fx._PatchedFn)
except (ImportError, AttributeError):  # pragma: no cover - another torch: fx's own trace
    _fx = None

_INTERCEPTED = ("__getattr__", "__call__")


class _ClassPatch(_fx._PatchedFn if _fx is not None else object):
    """``cls.<name> = new_fn`` for the trace; undone by deleting it again (the class inherited it).
    A patch of fx's patcher, so fx's own revert-and-reapply (``_maybe_revert_all_patches``)
    takes it off and puts it back with the others."""

    def patch(self) -> None:
        setattr(self.frame_dict, self.fn_name, self.new_fn)

    def revert(self) -> None:
        delattr(self.frame_dict, self.fn_name)


def _classes(paths: dict[nn.Module, str]) -> Optional[list[type]]:
    """The distinct classes of the modules in ``paths``; None if one of them, or a class between
    it and nn.Module, defines ``__call__`` or ``__getattr__`` itself (or still carries a patch)."""
    classes = list(dict.fromkeys(type(m) for m in paths))
    if nn.Module in classes:  # a plain container (GraphModules have them): fx patches nn.Module itself
        return None
    for cls in classes:
        for base in cls.__mro__:
            if base is nn.Module:
                break
            if any(name in base.__dict__ for name in _INTERCEPTED):
                return None
    if nn.Module.__call__ is not _fx._orig_module_call or nn.Module.__getattr__ is not _fx._orig_module_getattr:
        return None  # fx's own trace is running
    return classes


class _TensorAttributes(dict):
    """fx's table of the tensors stored as plain module attributes (tensor -> qualified name; the
    last name, as fx's walk leaves it), filled on first use. fx fills it before every trace by
    testing every attribute of every module (a millisecond on a MobileNet); it is read only when
    a tensor that is neither a parameter nor a buffer is passed to an op, which most models never
    do. (Filled then, it also lists tensors the forward has stored on modules so far.)"""

    def __init__(self, root: nn.Module):
        super().__init__()
        self._root: Optional[nn.Module] = root

    def _fill(self) -> None:
        root, self._root = self._root, None
        if root is None:
            return
        constant_types = _fx._constant_attribute_types
        is_constant: dict[type, bool] = {}  # (answered once per type)
        for name, module in root.named_modules(remove_duplicate=False):
            for key, value in module.__dict__.items():
                t = type(value)
                hit = is_constant.get(t)
                if hit is None:
                    hit = is_constant[t] = issubclass(t, constant_types)
                if hit:
                    dict.__setitem__(self, value, f"{name}.{key}" if name else key)

    def get(self, key: Any, default: Any = None) -> Any:
        self._fill()
        return super().get(key, default)

    def __getitem__(self, key: Any) -> str:
        self._fill()
        return super().__getitem__(key)

    def __contains__(self, key: Any) -> bool:
        self._fill()
        return super().__contains__(key)

    def __setitem__(self, key: Any, value: str) -> None:
        self._fill()
        super().__setitem__(key, value)

    def __iter__(self) -> Iterator[Any]:
        self._fill()
        return super().__iter__()

    def __len__(self) -> int:
        self._fill()
        return super().__len__()

    def items(self) -> Any:
        self._fill()
        return super().items()

    def keys(self) -> Any:
        self._fill()
        return super().keys()

    def values(self) -> Any:
        self._fill()
        return super().values()


def trace_module(tracer: fx.Tracer, root: nn.Module, concrete_args: Optional[dict[str, Any]],
                 paths: Optional[dict[nn.Module, str]] = None) -> Optional[fx.Graph]:
    """``tracer``'s graph of ``root`` as :meth:`fx.Tracer.trace` builds it, or None where fx
    should trace it itself (see the module's docstring). ``paths``: each module of ``root`` -> its
    first name (``named_modules()``), where the caller has them."""
    if _fx is None or not isinstance(root, nn.Module):
        return None
    if paths is None:
        paths = {module: name for name, module in root.named_modules()}
    classes = _classes(paths)
    fn = getattr(type(root), tracer.traced_func_name, None)
    if classes is None or not isinstance(fn, FunctionType):
        return None
    old_flag = _fx._get_is_fx_tracing()
    _fx._set_is_fx_tracing(True)
    try:
        _LazyGraphModule.force_recompile(root)  # (a lazily compiled GraphModule has no forward code yet)
        tracer.root = root
        tracer.root_module_name = root._get_name()
        tracer.submodule_paths = paths
        tracer.tensor_attrs = _TensorAttributes(root)
        tracer.graph = fx.Graph(tracer_cls=type(tracer))
        code = fn.__code__
        tracer.graph._co_fields = {"co_name": code.co_name, "co_filename": code.co_filename,
                                   "co_firstlineno": code.co_firstlineno}
        fn_globals = fn.__globals__
        fn, args = tracer.create_args_for_root(fn, True, concrete_args)
        parameter_proxy_cache: dict[str, Any] = {}
        orig_getattr, orig_call = _fx._orig_module_getattr, _fx._orig_module_call

        @functools.wraps(orig_getattr)
        def module_getattr_wrapper(mod: nn.Module, attr: str) -> Any:
            return tracer.getattr(attr, orig_getattr(mod, attr), parameter_proxy_cache)

        @functools.wraps(orig_call)
        def module_call_wrapper(mod: nn.Module, *args: Any, **kwargs: Any) -> Any:
            def forward(*args: Any, **kwargs: Any) -> Any:
                return orig_call(mod, *args, **kwargs)

            _fx._autowrap_check(patcher, getattr(getattr(mod, "forward", mod), "__globals__", {}),
                                tracer._autowrap_function_ids)
            return tracer.call_module(mod, forward, args, kwargs)

        with _fx._new_patcher() as patcher:
            for cls in classes:
                for name, wrapper in (("__getattr__", module_getattr_wrapper), ("__call__", module_call_wrapper)):
                    patcher.patches_made.append(_ClassPatch(cls, name, None, wrapper))
                    patcher.patches_made[-1].patch()
            _fx._patch_wrapped_functions(patcher)
            _fx._autowrap_check(patcher, fn_globals, tracer._autowrap_function_ids)
            for module in tracer._autowrap_search:
                _fx._autowrap_check(patcher, module.__dict__, tracer._autowrap_function_ids)
            annotations = inspect.get_annotations(inspect.unwrap(fn))
            tracer.create_node("output", "output", (tracer.create_arg(fn(*args)),), {},
                               type_expr=annotations.get("return", None))
        tracer.submodule_paths = None
    finally:
        _fx._set_is_fx_tracing(old_flag)
    return tracer.graph
