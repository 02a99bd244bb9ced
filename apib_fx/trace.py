"""The trace pass: model -> torch.fx graph -> shapes -> channel labels -> :class:`ChannelGraph`."""
from __future__ import annotations

import bisect
import collections
import dis
import functools
import gc
import inspect
import linecache
import operator
import os
import sys
import time
import warnings
from contextlib import contextmanager
from typing import Any, Callable, Iterable, Iterator, Mapping, Optional, Sequence, Union

import torch
import torch.nn.functional as F
from torch import Tensor, fx, nn
from torch.fx.immutable_collections import immutable_dict, immutable_list
from torch.fx import traceback as fx_traceback
from torch.fx.node import map_aggregate
from torch.fx.proxy import ParameterProxy
from torch.fx.passes.shape_prop import TensorMetadata
from torch.nn.modules.batchnorm import _BatchNorm

from ._symbolic import trace_module
from .flops import MAC_TARGETS, _MacCounter, unfused_attention
from .graph import ChannelGraph, graph_tensors
from .labels import LabelSpace, flatten_values, is_labels, unlabeled
from .rules import (DEFAULT_LEAF_MODULES, RuleContext, batch_norm_of, branch_check, graph_constants, module_rule,
                    opaque, rule_for, tie_outer)

Inputs = Union[Tensor, Sequence[Tensor]]


try:  # generates the Python code on first use: the passes here interpret the graph, and
    # apply() rewrites a copy, so code made at trace time (a third of tracing) would be thrown away
    from torch.fx._lazy_graph_module import _LazyGraphModule as _TracedModule
except ImportError:  # pragma: no cover - a torch without it generates the code at once
    _TracedModule = fx.GraphModule


class TraceError(RuntimeError):
    """torch.fx could not trace the model."""


class InputShapeError(ValueError):
    """The model does not run on the example inputs."""


def as_inputs(example_inputs: Inputs) -> tuple[Tensor, ...]:
    """The API's convention: a tensor or a tuple/list of tensors."""
    if isinstance(example_inputs, Tensor):
        return (example_inputs,)
    if isinstance(example_inputs, (tuple, list)) and all(isinstance(t, Tensor) for t in example_inputs):
        return tuple(example_inputs)
    raise TypeError(
        f"example_inputs must be a tensor or a tuple of tensors, got {type(example_inputs).__name__}"
    )


@contextmanager
def gc_paused() -> Iterator[None]:
    """Python's cyclic garbage collector paused (restored as it was afterwards). Tracing creates
    tens of thousands of objects that outlive the call (fx nodes, labels, the graph): Python answers
    allocation with collections over every object in the process (a full one ~0.15 s with torch
    loaded). The few cycles made here are collected afterwards."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


@contextmanager
def eval_mode(model: nn.Module, modules: Optional[Iterable[nn.Module]] = None) -> Iterator[nn.Module]:
    """Run ``model`` in eval mode (no BatchNorm statistics updates) and restore every module's own
    ``training`` flag afterwards, so the user's model comes back exactly as it was. ``modules``:
    ``model.modules()``, where the caller has them already."""
    flags = [(m, m.training) for m in (model.modules() if modules is None else modules)]
    # Only flags that change are written (nn.Module.__setattr__ is slow: a model already in eval
    # mode, as for tracing, spent a few percent of a trace here).
    if any(flag for _, flag in flags):
        model.eval()
    try:
        yield model
    finally:
        for m, flag in flags:
            if m.training != flag:
                m.training = flag


class _ModuleStack(collections.OrderedDict):
    """The tracer's module call stack, which fx copies into every node's meta. Copying a plain
    OrderedDict recomputes its slot names each time (CPython cannot cache them on a built-in
    class): 3-5% of tracing RegNet or MobileNetV3. Here a copy is one constructor call."""

    def __copy__(self) -> "_ModuleStack":
        return _ModuleStack(self)


# Argument types fx records as they are (never a tensor: fx looks those up among the model's
# parameters and buffers).
_PLAIN_ARGS = frozenset({int, float, bool, str, complex, type(None), type(...), torch.dtype, torch.device,
                         torch.memory_format, torch.layout})
_PYTREE_NODES = torch.utils._pytree.SUPPORTED_NODES  # the containers fx's own argument walk opens


def _tracer_of(args: Any) -> Any:
    """The tracer of the proxies among ``args`` (tuples, lists and keyword dicts of them, as a call
    passes them); None when there is none, ``...`` when a container fx's pytree walk would open is
    of another type (a namedtuple, an OrderedDict) or proxies of two tracers meet: fx decides then."""
    found = None
    for a in args:
        t = type(a)
        if t is _Proxy or t is fx.Proxy:
            tracer = a.tracer
        elif t in _PLAIN_ARGS:
            continue
        elif t is tuple or t is list:
            tracer = _tracer_of(a)
        elif t is dict:
            tracer = _tracer_of(a.values())
        elif isinstance(a, (fx.Proxy, tuple, list, dict)) or t in _PYTREE_NODES:
            return ...
        else:
            continue
        if tracer is ...:
            return ...
        if tracer is not None:
            if found is not None and tracer is not found:
                return ...
            found = tracer
    return found


@functools.lru_cache(maxsize=1024)
def _unpacked_count(code: Any, offset: int) -> Optional[int]:
    """The number of names the instruction at ``offset`` of ``code`` unpacks a value into, or None
    if it is not an unpacking (as fx's Proxy.__iter__ reads it)."""
    instructions = list(dis.get_instructions(code))
    at = bisect.bisect_left(instructions, offset, key=lambda i: i.offset) if sys.version_info >= (3, 11) else offset // 2
    instruction = instructions[at]
    return instruction.argval if instruction.opname == "UNPACK_SEQUENCE" else None


# The names fx derives from node targets given by name (a module's path, a method), kept across
# traces: each module's path is a new target once per trace.
_NODE_NAMES: dict[str, str] = {}
_FUNCTION_NAMES: dict[Any, str] = {}  # torch function -> the name fx gives its node


class _Proxy(fx.Proxy):
    """The proxies of :class:`_Tracer`: a torch function called on one (``F.relu(x)``,
    ``torch.cat([a, b])``) is recorded as fx records it, but fx finds the tracer through two pytree
    walks over the arguments, a quarter of tracing GoogLeNet or ResNet-50; here one plain loop."""

    def __getattr__(self, k: str) -> "_Attribute":
        return _Attribute(self, k)  # (fx's Attribute, with this class's conversions: len(x.shape))

    def __iter__(self) -> Iterator[fx.Proxy]:
        # fx's test: ``a, b = x.chunk(2)`` unpacks into getitems, other iteration fails. fx
        # disassembles the calling function for every unpacking (a millisecond of tracing
        # ShuffleNetV2); the answer depends only on the code and the instruction, so it is cached.
        frame = inspect.currentframe().f_back
        count = _unpacked_count(frame.f_code, frame.f_lasti)
        if count is None:  # a loop, ``a, *rest = ...``, ``sum(...)``: the pieces of a split, if it is one
            tracer = self.tracer
            if isinstance(tracer, _Tracer) and tracer.example_inputs is not None:
                count = tracer.pieces(self)
        if count is not None:
            return (self[i] for i in range(count))
        return self.tracer.iter(self)

    def __len__(self) -> int:
        tracer = self.tracer
        if isinstance(tracer, _Tracer) and tracer.example_inputs is not None:
            count = tracer.pieces(self)
            return count if count is not None else tracer.to_int(self, len)
        return super().__len__()

    def __int__(self) -> int:
        tracer = self.tracer
        if isinstance(tracer, _Tracer) and tracer.example_inputs is not None:
            return tracer.to_int(self, int)
        raise TypeError(f"int() of a traced value ({self.node.format_node()}): fx records no conversion")

    @classmethod
    def __torch_function__(cls, orig_method: Any, types: tuple, args: Any = None, kwargs: Any = None) -> Any:
        args = args if args else ()
        kwargs = kwargs if kwargs else {}
        tracer = _tracer_of((*args, *kwargs.values()))
        if (not isinstance(tracer, _Tracer)
                or isinstance(orig_method, (torch._C.ScriptMethod, torch._ops.HigherOrderOperator))):
            return super().__torch_function__(orig_method, types, args, kwargs)
        if torch.overrides.is_tensor_method_or_property(orig_method):
            return tracer.create_proxy("call_method", orig_method.__name__, args, kwargs)
        name = _FUNCTION_NAMES.get(orig_method)
        if name is None:
            name = _FUNCTION_NAMES[orig_method] = tracer.graph._target_to_str(orig_method.__name__)
        return tracer.create_proxy("call_function", orig_method, args, kwargs, name=name)


class _Attribute(fx.proxy.Attribute, _Proxy):
    """``x.shape``, ``x.size``: fx's lazily recorded attribute, as a :class:`_Proxy`."""


class _Tracer(fx.Tracer):
    """fx.Tracer that keeps ``leaf_types`` opaque and remembers which module was being traced
    when tracing fails, to name it in the error."""

    # Module calls and attribute reads are intercepted on the traced model's classes, not on
    # nn.Module (see apib_fx._symbolic); False: fx's own way.
    patch_model_classes = True

    # GraphModule unpickling re-creates its tracer with no arguments: default to the engine's leaves.
    def __init__(self, leaf_types: tuple[type, ...] = tuple(DEFAULT_LEAF_MODULES)):
        # batch_norm_of stays one call when a pruned GraphModule is unpickled (which re-traces
        # its code with this class): traced into, it would branch on the input's rank.
        super().__init__(autowrap_functions=(batch_norm_of, branch_check))
        self.module_stack = _ModuleStack()
        self.leaf_types = leaf_types
        self.failed_in: list[tuple[str, str]] = []
        self._is_leaf: dict[type, bool] = {}  # module class -> kept as one node
        self.num_calls: Optional[dict[str, int]] = getattr(self, "num_calls", None)
        # With example inputs, a branch on their shape follows them (see to_bool).
        self.example_inputs: Optional[tuple[Tensor, ...]] = None
        self.specialized: list[str] = []
        self._example_run: Optional[_ExampleRun] = None
        self._running_example = False  # (fx's patches of nn.Module then call through, untraced)
        self._node_names: dict[Any, str] = {}  # other targets (functions) -> the names fx derives
        self.module_paths: Optional[dict[nn.Module, str]] = None  # root's modules -> first names, if known

    def create_node(self, kind: str, target: Any, args: tuple, kwargs: dict, name: Optional[str] = None,
                    type_expr: Any = None) -> fx.Node:
        # What fx's own version does for a plain symbolic trace, at a third of the cost: the node
        # with the module stack in its meta. Left out: the deprecated ``node_name_to_scope`` table,
        # and Graph.create_node's scan of every argument for raw SymInts (a quarter of tracing;
        # a symbolic trace records proxies, never SymInts), skipped by giving the arguments to
        # the node once it exists, through Node's public setters.
        if self.check_mutable_operations or self.record_stack_traces or fx_traceback.has_preserved_node_meta():
            return super().create_node(kind, target, args, kwargs, name, type_expr)
        graph = self.graph
        if name is None:  # the name fx derives from the target (snake case), worked out once per target
            try:
                names = _NODE_NAMES if type(target) is str else self._node_names
                name = names.get(target)
                if name is None:
                    if len(names) > 100_000:  # (the paths of many models traced in one process)
                        names.clear()
                    name = names[target] = graph._target_to_str(target)
            except (TypeError, AttributeError):  # an unhashable target; a torch without the helper
                name = None
        if args or kwargs:
            node = graph.create_node(kind, target, (), None, name, type_expr)
            if kwargs:
                node.kwargs = kwargs
            if args:
                node.args = args
        else:
            node = graph.create_node(kind, target, args, kwargs, name, type_expr)
        if self.module_stack:
            node.meta["nn_module_stack"] = _ModuleStack(self.module_stack)
        return node

    def create_arg(self, a: Any) -> Any:
        # Most arguments are proxies, plain Python values or tuples, lists and keyword dicts of
        # them. fx first tests each against Parameter, Tensor, Module, namedtuple and opaque types
        # (a fifth of tracing a MobileNet); for these types its answer is the same as here.
        t = type(a)
        if t is _Proxy or t is fx.Proxy:
            return a.node
        if t in _PLAIN_ARGS:
            return a
        if t is tuple:
            return tuple([self.create_arg(v) for v in a])
        if t is list:
            return [self.create_arg(v) for v in a]
        if t is dict and all(type(k) is str for k in a):  # keyword arguments
            return {k: self.create_arg(v) for k, v in a.items()}
        if t is Tensor:
            # A buffer passed to a function (F.batch_norm(x, self.running_mean, ...), timm's
            # BatchNormAct2d): fx finds its name by walking root.named_buffers() for every such
            # argument (a third of tracing timm's EfficientNet). Here by identity, from one walk.
            name = self._first_name("buffers", a)
            if name is not None:
                return self.create_node("get_attr", name, (), {})
        return super().create_arg(a)

    def proxy(self, node: fx.Node) -> fx.Proxy:
        return _Proxy(node, self)

    def _first_name(self, kind: str, t: Tensor) -> Optional[str]:
        """The name fx would find for ``t`` among the root's ``named_{kind}()`` (its first), by
        identity from one walk per trace; None if it is not there (registered since: fx searches)."""
        names = self._names_by_identity.get(kind)
        if names is None:
            names = self._names_by_identity[kind] = {}
            for n, v in getattr(self.root, f"named_{kind}")():
                names.setdefault(id(v), (n, v))
        found = names.get(id(t))
        return found[0] if found is not None and found[1] is t else None

    def trace(self, root: Any, concrete_args: Any = None) -> fx.Graph:
        self._names_by_identity: dict[str, dict[int, tuple[str, Tensor]]] = {}  # see _first_name
        # fx stores tensors a forward creates (``torch.zeros(1, 8, 1, 1)``) as new attributes of
        # the traced module: they are taken off it again and kept with the graph, so the user's
        # model comes back as it was.
        self._constant_names: list[str] = []
        try:
            graph = trace_module(self, root, concrete_args, self.module_paths) if self.patch_model_classes else None
            if graph is None:
                graph = super().trace(root, concrete_args)
        finally:
            constants = {}
            for name in self._constant_names:
                if isinstance(root, nn.Module) and name in root.__dict__:
                    constants[name] = root.__dict__.pop(name)
        if constants:
            graph._apib_constants = constants
        return graph

    def get_fresh_qualname(self, prefix: str) -> str:
        name = super().get_fresh_qualname(prefix)
        self._constant_names.append(name)  # fx sets it on the root next
        return name

    def getattr(self, attr: str, attr_val: Any, parameter_proxy_cache: dict[str, Any]) -> Any:
        # fx finds the name of a parameter that a forward reads (ConvNeXt's layer scales) by
        # walking root.named_parameters() on every read, the module tree each time: a tenth of
        # tracing ConvNeXt. Here by identity, from one walk; the same first name and proxy.
        if self._running_example:
            return attr_val
        if not isinstance(attr_val, nn.Parameter):
            if self.proxy_buffer_attributes and isinstance(attr_val, Tensor):
                return super().getattr(attr, attr_val, parameter_proxy_cache)
            return attr_val  # a submodule, a buffer, a plain attribute: fx returns it as it is
        name = self._first_name("parameters", attr_val)
        if name is None:
            return super().getattr(attr, attr_val, parameter_proxy_cache)
        if name not in parameter_proxy_cache:
            factory = (lambda node: ParameterProxy(self, node, name, attr_val)) if self.param_shapes_constant else None
            parameter_proxy_cache[name] = self.create_proxy("get_attr", name, (), {}, proxy_factory_fn=factory)
        return parameter_proxy_cache[name]

    def to_bool(self, obj: fx.Proxy) -> bool:
        """A branch on a traced value (``if H % p != 0:``, ``assert C == self.dim``): fx cannot
        follow it. With example inputs, a condition computed from tensor shapes, ranks, dtypes or
        devices alone takes the value it has for them, and the graph records a check
        (:func:`~apib_fx.rules.branch_check`) that inputs take the same branch; one read from
        tensor values does not (it would change from batch to batch)."""
        if self.example_inputs is None:
            return super().to_bool(obj)
        value, text, where = self._metadata_value(obj, "branches on")
        if not isinstance(value, (bool, int, float)):
            return super().to_bool(obj)
        taken = bool(value)
        self._record(obj if type(value) is bool else obj != 0, taken, text, where, f"is {taken}")
        return taken

    def to_int(self, obj: fx.Proxy, convert: Callable[[Any], int]) -> int:
        """``len(x.shape)``, ``int(H * 0.5)`` (``convert``: len or int) of a value computed from
        tensor metadata: its value on the example inputs, checked as :meth:`to_bool` checks."""
        value, text, where = self._metadata_value(obj, "converts")
        n = convert(value)
        self._record(self.create_proxy("call_function", convert, (obj,), {}) == n, True, text, where,
                     f"gives {convert.__name__} {n}")
        return n

    def pieces(self, obj: fx.Proxy) -> Optional[int]:
        """How many tensors a split of a traced tensor gives (``x.chunk(4, 1)``, ``x.split(8, 1)``,
        ``x.unbind(2)``; None for any other value): a number set by shapes alone, so a loop over
        the pieces follows the example inputs, checked in the graph as :meth:`to_int` checks."""
        node = obj.node
        if not _splits_by_shape(node):
            return None
        value = self._example_value(node)
        if not isinstance(value, (tuple, list)):
            return None
        line, text = _model_line()
        self._record(self.create_proxy("call_function", len, (obj,), {}) == len(value), True, text,
                     self._where(line), f"gives {len(value)} pieces")
        return len(value)

    def _where(self, line: str) -> str:
        """``line``, and the module being traced there."""
        if not self.module_stack:
            return line
        return f"{line}, in module '{next(reversed(self.module_stack.values()))[0]}'"

    def _metadata_value(self, obj: fx.Proxy, verb: str) -> tuple[Any, str, str]:
        """``obj``'s value on the example inputs, and the model's line asking for it and where
        that is; a TraceError if the value is read from tensor values."""
        line, text = _model_line()
        where = self._where(line)
        if not _reads_metadata_only(obj.node):
            raise fx.proxy.TraceError(
                f"symbolically traced variables cannot be used as inputs to control flow: `{text}` "
                f"({where}) {verb} tensor values, which differ from input to input (one computed from "
                "sizes alone follows the example inputs)")
        return self._example_value(obj.node), text, where

    def _record(self, condition: fx.Proxy, taken: bool, text: str, where: str, outcome: str) -> None:
        """A check in the graph that inputs give ``text`` the outcome the example inputs gave it
        (``condition`` is ``taken``)."""
        self.create_proxy("call_function", branch_check, (condition, taken, (
            f"apib_fx traced this model for inputs on which `{text}` ({where}) {outcome}; these "
            "inputs take another branch: trace and prune it with inputs like them")), {})
        entry = f"`{text}` {outcome} ({where})"
        if entry not in self.specialized:  # (``if a or b:``: two checks, one line to list)
            self.specialized.append(entry)

    def _example_value(self, node: fx.Node) -> Any:
        if self._example_run is None:
            self._example_run = _ExampleRun(self.root, self.graph, self.example_inputs)
        self._running_example = True
        try:
            return self._example_run.value(node)
        finally:
            self._running_example = False

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        # A module with a channel rule stays one node, also when its class lives outside torch.nn
        # (fx would otherwise trace into a torchvision subclass of nn.Conv3d and see F.conv3d).
        return (isinstance(m, self.leaf_types) or module_rule(type(m)) is not None
                or super().is_leaf_module(m, qualname))

    def call_module(self, m: nn.Module, forward: Any, args: Any, kwargs: Any) -> Any:
        if self._running_example:
            return forward(*args, **kwargs)
        rule = module_rule(type(m))
        if rule is not None and rule.expand is not None and not isinstance(m, self.leaf_types):
            out = rule.expand(m, args, kwargs)  # the ops it computes, so its inner widths get rules
            if out is not None:
                return out
        path = self.submodule_paths.get(m) if self.submodule_paths else None
        if path is None or self.num_calls is None:  # not a submodule: fx's own error; an older fx
            return super().call_module(m, forward, args, kwargs)
        # fx's call_module, less its scope bookkeeping (only the deprecated table above reads it)
        # and with the leaf test answered once per class (it depends on the class alone).
        calls = self.num_calls.get(path, 0)
        key = f"{path}@{calls}" if calls else path
        self.module_stack[key] = (path, type(m))
        self.num_calls[path] = calls + 1
        leaf = self._is_leaf.get(type(m))
        if leaf is None:
            leaf = self._is_leaf[type(m)] = self.is_leaf_module(m, path)
        try:
            if leaf:
                return self.create_proxy("call_module", path, args, kwargs)
            return forward(*args, **kwargs)
        except Exception:
            if not self.failed_in:  # innermost first
                self.failed_in.append((path, type(m).__name__))
            raise
        finally:
            self.module_stack.popitem()


class _ExampleRun(fx.Interpreter):
    """The graph traced so far, run on the example inputs node by node as far as a value is
    asked for (only a model that branches on a shape pays for it)."""

    def __init__(self, root: nn.Module, graph: fx.Graph, inputs: tuple[Tensor, ...]):
        super().__init__(root, garbage_collect_values=False, graph=graph)
        self.args_iter = iter([t.clone() for t in inputs])  # (an in-place op must not write into the caller's)

    def value(self, node: fx.Node) -> Any:
        env = self.env
        if node not in env:
            for n in self.graph.nodes:
                if n not in env:
                    env[n] = self.run_node(n)
                    if n is node:
                        break
        return env[node]


# What a condition may read off a tensor and still hold for every input of the traced shapes.
_METADATA_METHODS = frozenset({"size", "dim", "ndimension", "numel", "nelement"})
_METADATA_ATTRIBUTES = frozenset({"shape", "ndim", "dtype", "device", "is_cuda", "layout"})
_PLAIN_FUNCTION_MODULES = frozenset({"_operator", "operator", "math", "builtins"})


def _reads_metadata_only(node: fx.Node) -> bool:
    """Whether ``node``'s value is computed from tensor metadata (sizes, rank, dtype, device),
    forward arguments left at plain defaults and constants alone, through Python arithmetic and
    comparisons."""
    if node.op == "call_method":
        return node.target in _METADATA_METHODS
    if node.op == "placeholder":
        # A forward argument left at a plain default (``is_causal=False``): the example inputs
        # leave it so; the check then says so for calls that set it.
        return bool(node.args) and type(node.args[0]) in (bool, int, float, str)
    if node.op != "call_function":
        return False  # an input, a parameter, a layer's output: tensor values
    if node.target is getattr and len(node.args) > 1 and node.args[1] in _METADATA_ATTRIBUTES:
        return True
    if getattr(node.target, "__module__", None) not in _PLAIN_FUNCTION_MODULES:
        return False
    return all(_reads_metadata_only(a) for a in node.all_input_nodes)


# Ops that split a tensor into a tuple of tensors whose length follows from shapes and the
# split's arguments.
_SPLITS = frozenset({"split", "chunk", "unbind", "tensor_split", "split_with_sizes", "hsplit", "vsplit", "dsplit"})


def _splits_by_shape(node: fx.Node) -> bool:
    """Whether ``node`` splits a tensor by sizes read from metadata and constants alone."""
    if node.op == "call_method":
        name = node.target
    elif node.op == "call_function":
        name = getattr(node.target, "__name__", None)
        if getattr(node.target, "__module__", None) not in ("torch", "torch.functional", None):
            return False
    else:
        return False
    return name in _SPLITS and all(_reads_metadata_only(a) for a in node.all_input_nodes[1:])


_LIBRARY_DIRS = tuple(os.path.dirname(m.__file__) + os.sep for m in (torch, sys.modules[__name__.rpartition(".")[0]]))


def _model_line() -> tuple[str, str]:
    """("file:line", source text) of the model code being traced: the innermost frame outside
    torch and apib_fx."""
    frame = sys._getframe(1)
    while frame is not None and frame.f_code.co_filename.startswith(_LIBRARY_DIRS):
        frame = frame.f_back
    if frame is None:
        return "?", "?"
    path, line = frame.f_code.co_filename, frame.f_lineno
    return f"{os.path.basename(path)}:{line}", linecache.getline(path, line).strip() or "?"


def symbolic_trace(model: nn.Module, leaf_modules: Sequence[type] = (),
                   example_inputs: Optional[tuple[Tensor, ...]] = None) -> fx.GraphModule:
    """torch.fx symbolic trace with a clear error naming the module that failed; with
    ``example_inputs``, through the branches on their shapes (:func:`trace_graph`)."""
    return graph_module(model, trace_graph(model, leaf_modules, example_inputs))


def graph_module(model: nn.Module, graph: fx.Graph) -> fx.GraphModule:
    """The GraphModule of a graph from :func:`trace_graph` (it shares ``model``'s tensors)."""
    constants = graph_constants(graph)
    root = model
    if constants:
        # The GraphModule copies what the graph reads from its root: a stand-in sharing the model's
        # submodules and tensors, plus the constants, so the model itself gets no new attributes.
        root = nn.Module.__new__(nn.Module)
        root.__dict__.update(model.__dict__)
        root.__dict__.update(constants)
    return _with_containers(_TracedModule(root, graph, type(model).__name__), model)


# torch's containers: a GraphModule rebuilt from them keeps indexing (``pruned.layer4[-1]``,
# ``pruned.classifier[1] = nn.Linear(...)``), which fine-tuning and inspection code relies on.
_CONTAINERS = (nn.Sequential, nn.ModuleList, nn.ModuleDict)


class BlockSequence(nn.Sequential):
    """An ``nn.Sequential`` (indexing, slicing, ``len``) of blocks whose own forward the traced
    graph inlined, so it cannot be called: it names the pruned layers (``pruned.layer4[-1].conv2``).
    With no forward of its own, TorchScript leaves it alone."""

    forward = nn.Module.forward


def _callable(module: nn.Module) -> bool:
    return type(module).forward is not nn.Module.forward


def _with_containers(gm: fx.GraphModule, model: nn.Module) -> fx.GraphModule:
    """Give ``gm`` torch's container where ``model`` has one: fx rebuilds the module tree from the
    paths its graph calls, with a plain ``nn.Module`` at every inner level, which cannot be indexed.
    A container holding exactly the original's children (a child the graph never calls would shift
    positions) becomes an ``nn.ModuleList`` / ``ModuleDict`` / ``Sequential``, also for a subclass
    that keeps the container's forward (torchvision's ``Conv2dNormActivation``), and a
    :class:`BlockSequence` where some child cannot run on its own (a residual block the graph
    inlined). Only torch's classes and that one, so a saved model loads without the model's code,
    and a container that can be called computes what the original did. In place; returns ``gm``."""
    originals = dict(model.named_modules(remove_duplicate=False))
    # Deepest first: whether a container can be called depends on its children's final form.
    for name, sub in reversed(list(gm.named_modules())):
        if not name or type(sub) is not nn.Module or sub._parameters or sub._buffers:
            continue
        original = originals.get(name)
        kind = next((c for c in _CONTAINERS if isinstance(original, c)), None)
        if kind is None or (kind is nn.Sequential and type(original).forward is not nn.Sequential.forward):
            continue
        if list(sub._modules) != list(original._modules):
            continue
        children = collections.OrderedDict(sub._modules)
        if kind is nn.Sequential and not all(_callable(c) for c in children.values()):
            kind = BlockSequence
        container = kind(list(children.values())) if kind is nn.ModuleList else kind(children)
        container.training = original.training
        parent, _, leaf = name.rpartition(".")
        (gm.get_submodule(parent) if parent else gm)._modules[leaf] = container
    return gm


def trace_graph(model: nn.Module, leaf_modules: Sequence[type] = (),
                example_inputs: Optional[tuple[Tensor, ...]] = None,
                module_paths: Optional[dict[nn.Module, str]] = None) -> fx.Graph:
    """:func:`symbolic_trace`'s graph, whose targets name ``model``'s own submodules and tensors
    (no GraphModule is built: the trace's passes interpret it on ``model``). With
    ``example_inputs``, branches on their shapes follow them, checked in the graph
    (``graph._apib_specialized`` lists them; see ``_Tracer.to_bool``). ``module_paths``: each
    module of ``model`` -> its first name, where the caller has them."""
    tracer = _Tracer(tuple(DEFAULT_LEAF_MODULES) + tuple(leaf_modules))
    tracer.example_inputs = example_inputs
    tracer.module_paths = module_paths
    try:
        absent = _absent_optional_arguments(model, len(example_inputs)) if example_inputs is not None else {}
        graph = tracer.trace(model, concrete_args=absent or None)
        for node in graph.find_nodes(op="placeholder") if absent else ():
            # fx renames an argument it binds (mask -> mask_1): the forward keeps the model's name
            name = node.target.rpartition("_")[0]
            if name in absent and node.target == f"{name}_1":
                node.target = name
    except Exception as e:
        if tracer.failed_in:
            path, cls = tracer.failed_in[0]
            raise TraceError(
                f"torch.fx could not trace module '{path}' ({cls}): {type(e).__name__}: {e}\n"
                f"Keep it opaque with apib_fx.trace(model, example_inputs, leaf_modules=({cls},)): "
                "its channels are then left whole."
            ) from e
        # The model's own forward is not traceable (data-dependent control flow, as in detection
        # models): making it a leaf would leave nothing to prune, so point at its parts.
        cls = type(model).__name__
        parts = ", ".join(name for name, _ in model.named_children()) or "none"
        raise TraceError(
            f"torch.fx could not trace the forward of {cls} itself: {type(e).__name__}: {e}\n"
            f"Prune a traceable part instead (its submodules: {parts}), e.g. "
            f"model.<part> = apib_fx.prune(model.<part>, ...); modules inside a part that fail "
            f"can be kept opaque with leaf_modules=(...)."
        ) from e
    # The example run's tensors go now: the collector is paused, and tracer and proxies form cycles.
    tracer._example_run = None
    graph._apib_specialized = tracer.specialized
    return positional_inputs(module_batch_norms(graph, tracer.root), tracer.root)


def _absent_optional_arguments(model: nn.Module, given: int) -> dict[str, None]:
    """``forward``'s parameters after the ``given`` example inputs whose default is None
    (``forward(self, x, mask=None)``): bound to None, as ``model(x)`` calls leave them. fx would
    otherwise make each an input of unknown value, so ``if mask is not None:`` took the mask's
    path; the graph then checks that they are None."""
    try:
        params = list(inspect.signature(model.forward).parameters.values())
    except (TypeError, ValueError):
        return {}
    if any(p.kind is p.VAR_POSITIONAL for p in params[:given]):
        return {}
    return {p.name: None for p in params[given:]
            if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY) and p.default is None}


def positional_inputs(graph: fx.Graph, root: nn.Module) -> fx.Graph:
    """Keyword arguments that could be positional become positional (``self.conv(input=x)`` ->
    ``self.conv(x)``, ``F.relu(input=x)`` -> ``F.relu(x)``), for modules and Python functions:
    rules, scoring and rewrites read a layer's input as its first argument."""
    signatures: dict[tuple[Any, bool], Optional[inspect.Signature]] = {}  # GoogLeNet calls F.relu(x, inplace=True) 60 times
    for node in graph.nodes:
        if not node.kwargs or node.op not in ("call_module", "call_function"):
            continue
        fn = root.get_submodule(node.target).forward if node.op == "call_module" else node.target
        signature = _signature(fn, signatures)
        if signature is None:  # builtins without one
            continue
        try:
            bound = signature.bind(*node.args, **node.kwargs)
        except TypeError:  # a call it cannot bind
            continue
        node.args, node.kwargs = tuple(bound.args), dict(bound.kwargs)
    return graph


def _signature(fn: Any, cache: dict[tuple[Any, bool], Any]) -> Optional[inspect.Signature]:
    """inspect.signature(fn) or None, looked up once per function (a bound forward: per class)."""
    key = (getattr(fn, "__func__", fn), hasattr(fn, "__self__"))
    try:
        if key in cache:
            return cache[key]
    except TypeError:  # an unhashable callable
        key = None
    try:
        signature = inspect.signature(fn)
    except (TypeError, ValueError):
        signature = None
    if key is not None:
        cache[key] = signature
    return signature


_BATCH_NORM = inspect.signature(F.batch_norm)


def _batch_norm_owner(root: nn.Module, node: fx.Node) -> Optional[str]:
    """The BatchNorm module whose own state and settings an eval-mode ``F.batch_norm`` call uses
    (its qualified name), or None."""
    try:
        a = _BATCH_NORM.bind(*node.args, **node.kwargs).arguments
    except TypeError:
        return None
    mean = a.get("running_mean")
    if not (isinstance(mean, fx.Node) and mean.op == "get_attr" and mean.target.endswith(".running_mean")):
        return None
    path = mean.target[: -len(".running_mean")]
    try:
        module = root.get_submodule(path)
    except AttributeError:
        return None
    if not (isinstance(module, _BatchNorm) and module.track_running_stats):
        return None

    def reads(key: str, attr: str) -> bool:
        n = a.get(key)
        if getattr(module, attr, None) is None:
            return n is None
        return isinstance(n, fx.Node) and n.op == "get_attr" and n.target == f"{path}.{attr}"

    momentum = 0.0 if module.momentum is None else module.momentum
    same = (reads("running_var", "running_var") and reads("weight", "weight") and reads("bias", "bias")
            and a.get("training", False) is False and a.get("momentum", 0.1) == momentum
            and a.get("eps", 1e-5) == module.eps)
    return path if same else None


def module_batch_norms(graph: fx.Graph, root: nn.Module) -> fx.Graph:
    """Replace ``F.batch_norm`` calls a BatchNorm subclass makes on its own state (timm's
    ``BatchNormAct2d``: BatchNorm, then dropout and activation, in one forward) by
    :func:`~apib_fx.rules.batch_norm_of` that module. Why: tracing runs in eval mode, so the call
    was recorded with ``training=False``: the traced (and pruned) model would never use batch
    statistics nor update its running ones, in fine-tuning or BatchNorm re-estimation. As a call
    of the module's BatchNorm it follows ``train()`` / ``eval()`` again. ``root``: the traced
    module. In place; returns ``graph``."""
    for node in list(graph.nodes):
        if node.op != "call_function" or node.target is not F.batch_norm:
            continue
        path = _batch_norm_owner(root, node)
        if path is None:
            continue
        state = [n for n in node.all_input_nodes if n.op == "get_attr"]
        with graph.inserting_before(node):
            owner = graph.get_attr(path)
            new = graph.call_function(batch_norm_of, (owner, node.args[0]))
        new.meta = dict(node.meta)
        node.replace_all_uses_with(new)
        graph.erase_node(node)
        for n in state:
            if not n.users:
                graph.erase_node(n)
    return graph


def _tensor_meta(t: Tensor, contiguous: bool = False) -> TensorMetadata:
    # ShapeProp's metadata without its memory-format probes (three Python-level contiguity
    # checks per tensor, a quarter of the shape pass on MobileNetV3): nothing here reads them.
    # ``contiguous``: the strides of a contiguous tensor of that shape (``t`` is a stand-in).
    return TensorMetadata(t.shape, t.dtype, t.requires_grad, _contiguous_strides(t.shape) if contiguous else t.stride(),
                          None, False, {})


@functools.lru_cache(maxsize=4096)
def _contiguous_strides(shape: tuple[int, ...]) -> tuple[int, ...]:
    # (a model has few distinct activation shapes; torch's rule: a size-0 axis counts as 1)
    acc, rev = 1, []
    for n in reversed(shape):
        rev.append(acc)
        acc *= max(n, 1)
    return tuple(reversed(rev))


class _NeedsValues(Exception):
    """A node's output depends on values the formula pass did not compute."""


_NO_SUBMODULES = nn.Module()  # (what _GraphPass hands Interpreter when it has the submodules)


class _GraphPass(fx.Interpreter):
    """fx.Interpreter for the trace's passes, with the per-node overheads they do not need taken
    out: a module or attribute is looked up once (rules ask for it several times per node), and a
    node runs without Interpreter's current-node context (metadata for re-tracing the ops, which
    these passes never do). Together a tenth of tracing MobileNetV3."""

    def __init__(self, module: nn.Module, garbage_collect_values: bool = True, graph: Optional[fx.Graph] = None,
                 submodules: Optional[dict[str, nn.Module]] = None):
        # ``graph``: run that graph on ``module`` (the traced model itself) instead of module.graph.
        # ``submodules``: module.named_modules() as a dict, where the caller has walked the tree
        # already (Interpreter walks it again otherwise: 0.2 ms on a RegNet, per pass).
        given = submodules is not None and graph is not None
        super().__init__(_NO_SUBMODULES if given else module, garbage_collect_values=garbage_collect_values,
                         graph=graph)
        if given:
            self.module, self.submodules = module, submodules
        # Interpreter walked the module tree already: resolving dotted names attribute by
        # attribute through nn.Module.__getattr__ costs more (parameters are resolved on first use).
        self._attrs: dict[str, Any] = dict(self.submodules)
        self._attrs.update(graph_constants(self.graph))

    def fetch_attr(self, target: str) -> Any:
        try:
            return self._attrs[target]
        except KeyError:
            value = self._attrs[target] = super().fetch_attr(target)
            return value

    def run_node(self, n: fx.Node) -> Any:
        args, kwargs = self.fetch_args_kwargs_from_env(n)
        return getattr(self, n.op)(n.target, args, kwargs)

    def fetch_args_kwargs_from_env(self, n: fx.Node) -> tuple[tuple, dict]:
        # Interpreter's, with the usual arguments (nodes, plain values) looked up directly
        # instead of through map_arg's recursion.
        env = self.env

        def value(a: Any) -> Any:
            t = type(a)
            if t is fx.Node:
                return env[a]
            return a if t in _PLAIN_ARGS else _mutable(self.map_nodes_to_values(a, n))

        args = tuple([value(a) for a in n.args])
        return args, ({k: value(v) for k, v in n.kwargs.items()} if n.kwargs else {})


def _mutable(value: Any) -> Any:
    """Lists and dicts as the traced model's generated code passes them: fresh and mutable
    (fx keeps a node's arguments as immutable collections, and a function that edits the list it
    is given, as torchvision's Swin3d window-size helper does, would fail on them)."""
    t = type(value)
    if t is immutable_list or t is list:
        return [_mutable(v) for v in value]
    if t is immutable_dict or t is dict:
        return {k: _mutable(v) for k, v in value.items()}
    if t is tuple:
        return tuple([_mutable(v) for v in value])
    return value


_INPLACE_OPERATORS = frozenset({operator.iadd, operator.isub, operator.imul, operator.itruediv,
                                operator.ifloordiv, operator.imod, operator.ipow, operator.iand, operator.ior,
                                operator.ixor, operator.ilshift, operator.irshift, operator.imatmul})


def _writes_first_argument(n: fx.Node) -> bool:
    """``x += y``, ``x.add_(y)``: the op writes into its first argument."""
    if n.op == "call_method":
        return isinstance(n.target, str) and n.target.endswith("_") and not n.target.endswith("__")
    try:
        return n.target in _INPLACE_OPERATORS
    except TypeError:  # an unhashable callable: not one of them
        return False


class ShapeAndMacsProp(_GraphPass):
    """Shape propagation (``node.meta["tensor_meta"]``, ``"type"``, as torch.fx's ``ShapeProp``
    records them, memory format left None) that also records the multiply-accumulates
    (``node.meta["macs"]``) of nodes whose arithmetic a channel rule may not account for: ops
    without a rule (a leaf module, a wrapped attention function) and matrix products, counted by
    :func:`apib_fx.count_flops`'s interceptor. Their inputs' channels are kept whole, so the FLOPs
    model takes them as a constant the pruning cannot change. Other nodes run uncounted
    (interception costs time).

    ``by_formula``: ops whose rule gives their output shape (convolutions, linear layers,
    BatchNorm, activations, pooling; elementwise arithmetic and concatenation of such outputs) are
    not run: their output is zeros of that shape (a broadcast view, filled in only when an op
    other than such a layer reads it), and so is everything computed from it. Such values may only reach ops whose output shape follows
    from their inputs' shapes (ops with a rule); any other op (an opaque layer, ``nonzero``, a
    boolean mask) raises ``_NeedsValues``, and :func:`propagate_shapes` runs everything for real."""

    def __init__(self, module: nn.Module, by_formula: bool = False, graph: Optional[fx.Graph] = None,
                 submodules: Optional[dict[str, nn.Module]] = None):
        super().__init__(module, graph=graph, submodules=submodules)
        self.by_formula = by_formula
        self._placeholders: set[fx.Node] = set()  # nodes holding zeros for values not computed
        self._views: set[fx.Node] = set()  # placeholders still a broadcast view of one zero
        self._zeros: dict[tuple, Tensor] = {}  # that zero, per dtype and device
        self.current: Optional[fx.Node] = None  # the node being run

    def run_node(self, n: fx.Node) -> Any:
        self.current = n
        out = None
        reads_placeholders = bool(self._placeholders) and any(a in self._placeholders for a in n.all_input_nodes)
        if self.by_formula:
            if n.op == "call_module":
                out = self._by_formula(n)
            elif n.op in ("call_function", "call_method") and reads_placeholders:
                out = self._function_by_formula(n)
        if out is not None:
            self._placeholders.add(n)
            self._views.add(n)
        else:
            if reads_placeholders:
                if not self._shape_only(n):
                    raise _NeedsValues(n.format_node())
                self._placeholders.add(n)
                for a in n.all_input_nodes:
                    if a in self._views:  # an op that reads or writes elements: real memory
                        v = self.env[a]
                        self.env[a] = torch.zeros(v.shape, dtype=v.dtype, device=v.device)
                        self._views.discard(a)
            if self._measured(n):
                counter = _MacCounter()
                with counter:
                    out = super().run_node(n)
                n.meta["macs"] = counter.macs
            else:
                out = super().run_node(n)
        if n in self._placeholders and _writes_first_argument(n) and n.args and isinstance(n.args[0], fx.Node):
            # ``y.add_(placeholder)``: y's values are no longer known either (later ops read y).
            self._placeholders.add(n.args[0])
        if n in self._views:
            n.meta["tensor_meta"] = _tensor_meta(out, contiguous=True)
        elif isinstance(out, Tensor):
            n.meta["tensor_meta"] = _tensor_meta(out)
        elif any(isinstance(v, Tensor) for v in flatten_values(out)):
            n.meta["tensor_meta"] = map_aggregate(out, lambda v: _tensor_meta(v) if isinstance(v, Tensor) else v)
        else:
            self._placeholders.discard(n)  # sizes and other plain values are computed from shapes: real
        n.meta["type"] = type(out)
        return out

    def propagate(self, *args: Any) -> Any:
        return self.run(*args)

    def _by_formula(self, n: fx.Node) -> Optional[Tensor]:
        module = self.fetch_attr(n.target)
        rule = rule_for(n, module)
        if rule is None or rule.shape is None or n.kwargs or len(n.args) != 1:
            return None
        if module._forward_hooks or module._forward_pre_hooks:
            return None  # a hook may change the output: run it
        (x,) = self.map_nodes_to_values(n.args, n)
        try:
            shape = rule.shape(module, x) if isinstance(x, Tensor) else None
        except Exception:  # a formula registered for a module it does not fit: running it is right
            shape = None
        return None if shape is None else self._zero(x.dtype, x.device).expand(shape)

    def _function_by_formula(self, n: fx.Node) -> Optional[Tensor]:
        """A function or method reading placeholders whose rule gives the output's shape and
        dtype (elementwise arithmetic: the residual add, the SE block's multiply). An in-place op
        only when it writes a placeholder: one that writes a computed tensor must really change it."""
        if _writes_first_argument(n) and not (n.args and n.args[0] in self._placeholders):
            return None
        try:
            rule = rule_for(n)
        except TypeError:  # unhashable target
            return None
        if rule is None or rule.shape is None:
            return None
        args, kwargs = self.fetch_args_kwargs_from_env(n)
        try:
            result = rule.shape(*args, **kwargs)
        except Exception:  # running it decides
            result = None
        if result is None:
            return None
        shape, dtype = result
        device = next(v.device for v in flatten_values((args, kwargs)) if isinstance(v, Tensor))
        return self._zero(dtype, device).expand(shape)

    def _zero(self, dtype: torch.dtype, device: torch.device) -> Tensor:
        zero = self._zeros.get((dtype, device))
        if zero is None:
            zero = self._zeros[(dtype, device)] = torch.zeros((), dtype=dtype, device=device)
        return zero  # (never written: a placeholder an op reads is materialised as new zeros first)

    def _shape_only(self, n: fx.Node) -> bool:
        """Whether the output shape of ``n`` follows from its inputs' shapes alone."""
        if n.op == "call_module":
            return rule_for(n, self.fetch_attr(n.target)) is not None
        if n.op not in ("call_function", "call_method"):
            return n.op == "output"
        try:
            if rule_for(n) is None:
                return False
        except TypeError:
            return False
        if n.target is operator.getitem:  # x[mask]: a tensor index selects by value
            return not any(a in self._placeholders for a in n.all_input_nodes[1:])
        return not (n.target is torch.where and len(n.args) + len(n.kwargs) == 1)  # where(c) = nonzero(c)

    def _measured(self, n: fx.Node) -> bool:
        if n.op == "call_module":
            rule = rule_for(n, self.fetch_attr(n.target))
            return (rule is None or getattr(rule.propagate, "keeps_whole", False)
                    or getattr(rule.propagate, "measured", False))
        if n.op not in ("call_function", "call_method"):
            return False
        try:
            return n.target in MAC_TARGETS or rule_for(n) is None
        except TypeError:  # unhashable target
            return True


def propagate_shapes(module: nn.Module, inputs: Sequence[Tensor], graph: Optional[fx.Graph] = None,
                     submodules: Optional[dict[str, nn.Module]] = None) -> None:
    """:class:`ShapeAndMacsProp` over a GraphModule (or ``graph`` on ``module``): by formula where
    layers allow it (a batch-1 forward of MobileNetV3 spends most of its time in convolutions the
    shapes do not need), by running every op where a value the formulas skipped is needed."""
    if not (torch.is_autocast_enabled() or torch.is_autocast_enabled("cpu")):  # (autocast changes dtypes)
        try:
            ShapeAndMacsProp(module, by_formula=True, graph=graph, submodules=submodules).propagate(*inputs)
            return
        except Exception:  # a value was needed, or an op failed on the zeros: a real run decides
            for n in (graph if graph is not None else module.graph).nodes:
                n.meta.pop("macs", None)
    prop = ShapeAndMacsProp(module, graph=graph, submodules=submodules)
    try:
        prop.propagate(*inputs)
    except Exception as e:
        e.apib_node = prop.current  # type: ignore[attr-defined]  # where the graph failed, for the error
        raise


class ChannelPropagation(_GraphPass):
    """Runs the graph on label tensors: every op's rule from :data:`apib_fx.rules.RULES` says
    where channels go; the findings accumulate in a :class:`LabelSpace`."""

    def __init__(self, module: nn.Module, space: LabelSpace, graph: Optional[fx.Graph] = None,
                 submodules: Optional[dict[str, nn.Module]] = None):
        # Every node's labels are kept (node_labels): freeing them from the environment after
        # their last use would free nothing, and finding the last uses costs a pass over the graph.
        super().__init__(module, garbage_collect_values=False, graph=graph, submodules=submodules)
        self.space = space
        self.node_labels: dict[str, Any] = {}
        self._node: fx.Node | None = None

    def run_node(self, n: fx.Node) -> Any:
        self._node = n
        terms = len(self.space.flops_terms)
        out = super().run_node(n)
        self.node_labels[n.name] = _stored(out)
        macs = n.meta.get("macs", 0)
        if macs and len(self.space.flops_terms) == terms:
            # Arithmetic no rule accounted for (an opaque op): its channels are kept whole, so
            # it is a constant term of the FLOPs model.
            self.space.add_flops(macs, [])
        return out

    def get_attr(self, target: Any, args: Any, kwargs: Any) -> Any:
        value = super().get_attr(target, args, kwargs)
        return unlabeled(value.shape) if isinstance(value, Tensor) else value

    def run(self, *args: Any, **kwargs: Any) -> Any:
        out = super().run(*args, **kwargs)
        self._tie_pending(list(self.space.pending.values()))  # splits no layer read
        return out

    def _tie_pending(self, values: Any) -> None:
        for v in values:
            labels = self.space.pending.pop(id(v), None) if is_labels(v) else None
            if labels is not None:
                tie_outer(self.space, labels)

    def _apply(self, module: nn.Module | None, args: Any, kwargs: Any) -> Any:
        ctx = RuleContext(self.space, self._node, module)
        rule = rule_for(self._node, module)
        propagate = rule.propagate if rule else opaque
        if self.space.pending and not getattr(propagate, "takes_split", False):
            self._tie_pending(flatten_values((args, kwargs)))
        if self.space.statistics and not getattr(propagate, "takes_statistics", False):
            self.space.block_statistics(flatten_values((args, kwargs)), f"goes into {ctx.op_name}")
        return propagate(ctx, *args, **kwargs)

    def call_function(self, target: Any, args: Any, kwargs: Any) -> Any:
        return self._apply(None, args, kwargs)

    def call_method(self, target: Any, args: Any, kwargs: Any) -> Any:
        return self._apply(None, args, kwargs)

    def call_module(self, target: Any, args: Any, kwargs: Any) -> Any:
        return self._apply(self.fetch_attr(target), args, kwargs)

    def output(self, target: Any, args: Any, kwargs: Any) -> Any:
        for v in flatten_values(args[0]):
            if is_labels(v):
                self.space.block(v, "they reach a model output")
        self.space.block_statistics(flatten_values(args[0]), "is a model output")
        return args[0]


def _stored(value: Any) -> Any:
    if is_labels(value):
        return value
    if isinstance(value, (tuple, list)) and not isinstance(value, torch.Size):
        return tuple(_stored(v) for v in value)
    return None


def tensor_aliases(tensors: Mapping[str, Tensor]) -> dict[str, str]:
    """Names of tied parameters and buffers (``tensors``: :func:`~apib_fx.graph.stored_tensors`
    or :func:`~apib_fx.graph.graph_tensors`) -> the first of their names in ``tensors``."""
    first: dict[int, str] = {}
    aliases = {}
    for name, t in tensors.items():
        canonical = first.setdefault(id(t), name)
        if canonical != name:
            aliases[name] = canonical
    return aliases


def block_computed_weights(tensors: Mapping[str, Tensor], space: LabelSpace) -> None:
    """Channels of a layer whose weight is computed from other tensors (weight_norm,
    spectral_norm or another parametrization; an old-style weight_norm hook) stay whole: slicing
    the tensors it is computed from would not slice the weight exactly (a norm over the input
    channels changes), and there is no parameter of that name to slice. ``tensors``: the traced
    graph's :func:`~apib_fx.graph.graph_tensors`."""
    for (name, _), binding in space.bindings.items():
        if binding.role != "axis" and name not in tensors:
            space.block(binding.labels, f"'{name}' is computed from other tensors (a parametrization such "
                        "as weight_norm or spectral_norm): remove it (torch.nn.utils.parametrize."
                        "remove_parametrizations) to prune these channels")


def check_model(model: Any) -> None:
    """A TypeError for anything but a module apib_fx can trace, and for wrappers of one (data
    parallel, ``torch.compile``), naming the module inside to pass instead."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if isinstance(model, (nn.DataParallel, nn.parallel.DistributedDataParallel)):
        raise TypeError(
            f"model is wrapped in {type(model).__name__}: pass the module inside (model.module) and wrap "
            "the pruned model again"
        )
    inner = getattr(model, "_orig_mod", None)
    if isinstance(inner, nn.Module) and type(model).__name__ == "OptimizedModule":
        raise TypeError(
            "model is compiled with torch.compile: pass the module it compiles (model._orig_mod) and "
            "compile the pruned model"
        )


HEADS = ("dims", "whole")


def trace(model: nn.Module, example_inputs: Inputs, *, leaf_modules: Sequence[type] = (),
          heads: str = "dims") -> ChannelGraph:
    """Build the channel-dependency graph of ``model``.

    Traces with torch.fx (in eval mode: branches taken only in training, such as auxiliary
    classifiers, are not part of the graph), propagates shapes on ``example_inputs`` (common
    layers by formula, without running them: :func:`propagate_shapes`) and then channel labels
    through every op. ``leaf_modules``: module classes to keep opaque. ``heads``: where channels
    are split over two axes, as attention splits them into heads of ``head_dim`` each, ``"dims"``
    prunes the inner axis (the same head dims in every head) and ``"whole"`` the outer one (whole
    heads: a group's channels are then heads, each spanning its head dims in q, k and v). A
    branch on the inputs' shapes follows ``example_inputs`` and is checked in the graph
    (``ChannelGraph.specialized``; a warning says so). The model and the example inputs are not
    modified. Python's cyclic garbage collector is paused for the call (:func:`gc_paused`).
    """
    check_model(model)
    if heads not in HEADS:
        raise ValueError(f"heads must be one of {HEADS}, got {heads!r}")
    inputs = as_inputs(example_inputs)
    with gc_paused():
        return _trace(model, inputs, leaf_modules, heads)


# What ChannelGraph.timings times: torch.fx's symbolic trace, the shape pass, the label
# propagation, and grouping plus the FLOPs model.
_PHASES = ("fx", "shapes", "labels", "groups")


def _model_error(model: nn.Module, inputs: tuple[Tensor, ...]) -> Optional[Exception]:
    """What the model itself raises on ``inputs`` (on copies), None if it runs: asked only once
    tracing or the traced graph has failed, to tell a bad input from a graph that differs."""
    try:
        model(*(t.clone() for t in inputs))
        return None
    except Exception as e:
        return e


def _input_failure(inputs: tuple[Tensor, ...], error: BaseException) -> InputShapeError:
    """The error for example inputs the model does not run on, with the first line of its own."""
    cause = error.__cause__ or error
    first = str(cause).strip().splitlines()[0] if str(cause).strip() else type(cause).__name__
    shapes = ", ".join(str(tuple(t.shape)) for t in inputs)
    return InputShapeError(f"the model does not run on example inputs of shape {shapes}: {first}")


def _graph_failure(node: fx.Node, first: str, kind: str) -> str:
    """The error for a traced graph that fails where the model runs: the op and its module."""
    stack = node.meta.get("nn_module_stack") or {}
    path, cls = next(reversed(stack.values())) if stack else ("", None)
    where = f" in module '{path}' ({cls.__name__})" if cls is not None else ""
    fix = (f"keep it opaque with apib_fx.trace(model, example_inputs, leaf_modules=({cls.__name__},)): its "
           "channels are then left whole" if cls is not None else "the model's own forward is not traceable as is")
    return (f"torch.fx's graph of the model fails where the model itself runs on these inputs, at "
            f"'{node.format_node()}'{where}: {kind}: {first}\nThe traced code differs from the model's "
            f"(it branched on a value, or it mutates an argument); {fix}.")


def _trace(model: nn.Module, inputs: tuple[Tensor, ...], leaf_modules: Sequence[type], heads: str) -> ChannelGraph:
    # The passes interpret the graph on the model itself; the GraphModule that apply() rewrites is
    # built on first use (ChannelGraph.module): a tenth of tracing, not needed to find the groups.
    clock = [time.perf_counter()]
    # The module tree is walked once before tracing and once after (a forward may add modules):
    # eval_mode, the tracer, both passes and the tensors' names share the walks.
    paths = {module: name for name, module in model.named_modules()}
    with eval_mode(model, paths), torch.no_grad():
        try:
            graph = trace_graph(model, leaf_modules, inputs, paths)
        except TraceError as e:
            # A forward that rejects the inputs (``assert H == self.img_size``) fails to trace too,
            # with the proxies in its message: where the model fails on them as well, the
            # inputs are the problem, said in the model's own words.
            error = _model_error(model, inputs)
            if error is None:
                raise
            raise _input_failure(inputs, error) from e
        tree = dict(model.named_modules(remove_duplicate=False))
        clock.append(time.perf_counter())
        try:
            with unfused_attention():  # so the opaque attention layers' MACs are counted
                # (on copies: a forward that writes into its input, x.mul_(2), must not write into the caller's)
                propagate_shapes(model, [t.clone() for t in inputs], graph, tree)
        except Exception as e:
            cause = e.__cause__ or e
            first = str(cause).strip().splitlines()[0] if str(cause).strip() else type(cause).__name__
            node = getattr(e, "apib_node", None)
            error = _model_error(model, inputs) if node is not None else e
            if error is None:
                raise TraceError(_graph_failure(node, first, type(cause).__name__)) from e
            # (the model's own message: the graph's was formatted at trace time, ``Proxy(getitem_2)``)
            raise _input_failure(inputs, error) from e
        clock.append(time.perf_counter())
    tensors = graph_tensors(model, graph, tree)
    space = LabelSpace(aliases=tensor_aliases(tensors), whole_heads=heads == "whole")
    prop = ChannelPropagation(model, space, graph, tree)
    prop.run(*(unlabeled(t.shape) for t in inputs))
    block_computed_weights(tensors, space)
    clock.append(time.perf_counter())
    result = ChannelGraph(lambda: graph_module(model, graph), space, prop.node_labels, inputs)
    clock.append(time.perf_counter())
    result.timings = {phase: end - start for phase, start, end in zip(_PHASES, clock, clock[1:])}
    result.specialized = graph._apib_specialized
    if result.specialized:
        shapes = ", ".join("x".join(map(str, t.shape)) for t in inputs)
        warnings.warn(
            f"the forward branches on its inputs' shapes or on arguments left at their defaults "
            f"({len(result.specialized)}x, first: {result.specialized[0]}): the graph follows the branches "
            f"inputs of shape {shapes} take, and the pruned model checks that its inputs take them too "
            "(ChannelGraph.specialized lists them)",
            UserWarning, stacklevel=3)
    return result

