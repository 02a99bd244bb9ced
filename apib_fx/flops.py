"""count_flops: multiply-accumulates of a model on given inputs, counted by running it.

This counter is independent of the trace pass: it intercepts the torch functions that do the
arithmetic (convolutions, transposed ones too, linear layers, matrix products, recurrent layers) with a
``TorchFunctionMode`` and reads their actual tensor shapes. "FLOPs" in the pruning literature
(and in the APIB paper's tables) are these MACs: ResNet-50 at 1x3x224x224 is about 4.1e9.
"""
from __future__ import annotations

import inspect
import math
from contextlib import contextmanager
from typing import Any, Iterator, Sequence, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.overrides import TorchFunctionMode

_CONV = {F.conv1d, F.conv2d, F.conv3d, torch.conv1d, torch.conv2d, torch.conv3d}
_CONV_TRANSPOSE = {F.conv_transpose1d, F.conv_transpose2d, F.conv_transpose3d, torch.conv_transpose1d,
                   torch.conv_transpose2d, torch.conv_transpose3d}
_MATMUL = {torch.matmul, Tensor.matmul, Tensor.__matmul__, Tensor.__rmatmul__, torch.mm, Tensor.mm,
           torch.bmm, Tensor.bmm}
_ADDMM = {torch.addmm, Tensor.addmm, torch.baddbmm, Tensor.baddbmm}
# nn.LSTM / GRU / RNN run as one call each (torch's FlopCounterMode counts none of an LSTM and
# part of a GRU or RNN on the CPU; here every step of every layer and direction).
_RECURRENT = {torch.lstm, torch.gru, torch.rnn_tanh, torch.rnn_relu}


# Everything the counter below charges MACs for, as fx call_function / call_method targets.
MAC_TARGETS: frozenset = frozenset(
    _CONV | _CONV_TRANSPOSE | _MATMUL | _ADDMM
    | _RECURRENT | {F.linear, torch.einsum, F.scaled_dot_product_attention, F.multi_head_attention_forward}
    | {"matmul", "mm", "bmm", "addmm", "baddbmm", "__matmul__", "__rmatmul__"}
)


def _matmul_macs(a: Tensor, b: Tensor) -> int:
    if a.dim() == 1 and b.dim() == 1:
        return a.shape[0]
    a2 = a if a.dim() > 1 else a.unsqueeze(0)
    b2 = b if b.dim() > 1 else b.unsqueeze(-1)
    batch = torch.broadcast_shapes(a2.shape[:-2], b2.shape[:-2])
    return math.prod(batch) * a2.shape[-2] * a2.shape[-1] * b2.shape[-1]


def recurrent_macs(args: tuple) -> int:
    """MACs of a ``torch.lstm`` / ``gru`` / ``rnn_*`` call: every input position (time step x
    sample; a packed sequence's valid steps) meets every weight matrix of every layer and
    direction once (input and hidden weights, an LSTM's projection)."""
    packed = isinstance(args[1], Tensor) and isinstance(args[3], (list, tuple))  # (data, batch_sizes, hx, params, ...)
    x, params = (args[0], args[3]) if packed else (args[0], args[2])
    positions = x.shape[0] if packed else x.numel() // max(1, x.shape[-1])
    return positions * sum(p.shape[0] * p.shape[1] for p in params if p.dim() == 2)


def _einsum_macs(equation: str, operands: Sequence[Tensor]) -> int:
    """MACs of an einsum, contracting operands left to right in pairs (as torch does without
    opt_einsum): a pair that sums over shared indices costs the product of the sizes of the
    indices it involves; a pair that sums nothing is a plain product (no MACs); an index only one
    side has and nothing later needs is summed out first, at no MACs."""
    eq = equation.replace(" ", "")
    lhs, _, out = eq.partition("->")
    terms = lhs.split(",")
    if len(terms) != len(operands) or len(operands) < 2:
        return 0
    sizes: dict[str, int] = {}
    subs = []
    for term, t in zip(terms, operands):
        if "..." in term:
            head, tail = term.split("...")
            n_ell = t.dim() - len(head) - len(tail)
            letters = list(head) + [f"...{i}" for i in range(n_ell)] + list(tail)
        else:
            letters = list(term)
        for letter, n in zip(letters, t.shape):
            sizes[letter] = max(sizes.get(letter, 1), int(n))
        subs.append(letters)
    if not _:  # implicit output: the indices that appear once, in order
        out_letters = sorted(k for k in sizes if sum(s.count(k) for s in subs) == 1 and not k.startswith("..."))
        out_letters = [k for k in sizes if k.startswith("...")] + out_letters
    else:
        ell = sorted({k for s in subs for k in s if k.startswith("...")})
        out_letters = [c for c in out.replace("...", "\0") if c != "\0"] + ell
    macs = 0
    acc = set(subs[0])
    for i in range(1, len(subs)):
        later = set(out_letters).union(*map(set, subs[i + 1 :]))
        cur = set(subs[i])
        left = {k for k in acc if k in cur or k in later}
        right = {k for k in cur if k in acc or k in later}
        if (left & right) - later:  # something is summed: a (batched) matrix product
            macs += math.prod(sizes[k] for k in left | right)
        # else an outer or elementwise product: torch multiplies, no MACs
        acc = {k for k in left | right if k in later}
    return macs


_MHA_SIGNATURE = inspect.signature(F.multi_head_attention_forward)


def _mha_macs(*args: Any, **kwargs: Any) -> int:
    """MACs of ``F.multi_head_attention_forward`` (what ``nn.MultiheadAttention`` runs op by op):
    the q, k and v projections, q kᵀ and attention · v over all heads, and the output projection.
    A composite function: a function mode does not see the products inside it. (``static_k`` /
    ``static_v``, which only direct callers pass, are counted as if projected.)"""
    a = _MHA_SIGNATURE.bind(*args, **kwargs).arguments
    query, key = a["query"], a["key"]
    batch = query.shape[1] if query.dim() == 3 else 1
    L, S, E = query.shape[0], key.shape[0], a["embed_dim_to_check"]
    if a.get("use_separate_proj_weight", False):
        wq, wk, wv = a["q_proj_weight"], a["k_proj_weight"], a["v_proj_weight"]
        proj = L * wq.numel() + S * (wk.numel() + wv.numel())
    else:
        proj = (L + 2 * S) * a["in_proj_weight"].numel() // 3
    S += (a["bias_k"] is not None) + bool(a["add_zero_attn"])
    attention = 2 * L * S * E  # q kᵀ and weights · v, all heads together
    out = L * a["out_proj_weight"].numel()
    return batch * (proj + attention + out)


class _MacCounter(TorchFunctionMode):
    def __init__(self) -> None:
        super().__init__()
        self.macs = 0

    def __torch_function__(self, func: Any, types: Any, args: tuple = (), kwargs: Any = None) -> Any:
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if func in _CONV:
            w = args[1] if len(args) > 1 else kwargs["weight"]
            # out: (N, C_out, *spatial); each output element needs C_in/groups * kernel MACs
            self.macs += out.numel() * math.prod(w.shape[1:])
        elif func in _CONV_TRANSPOSE:
            w = args[1] if len(args) > 1 else kwargs["weight"]
            # weight (C_in, C_out/groups, *kernel): each input element meets its row of it
            x = args[0] if args else kwargs["input"]
            self.macs += x.numel() * math.prod(w.shape[1:])
        elif func is F.linear or func is torch._C._nn.linear:
            w = args[1] if len(args) > 1 else kwargs["weight"]
            self.macs += out.numel() * w.shape[1]
        elif func in _MATMUL:
            self.macs += _matmul_macs(args[0], args[1])
        elif func in _ADDMM:
            self.macs += _matmul_macs(args[1], args[2])
        elif func is torch.einsum:
            operands = args[1:] if len(args) > 2 or not isinstance(args[1], (list, tuple)) else args[1]
            self.macs += _einsum_macs(args[0], operands)
        elif func in _RECURRENT:
            self.macs += recurrent_macs(args)
        elif func is F.multi_head_attention_forward:
            self.macs += _mha_macs(*args, **kwargs)
        elif func is F.scaled_dot_product_attention:
            q, k, v = args[:3]
            # q k^T and (attn) v: L*S*E + L*S*Ev per batch-head
            self.macs += _matmul_macs(q, k.transpose(-2, -1)) + _matmul_macs(
                torch.empty(*q.shape[:-1], k.shape[-2], device="meta"), v)
        return out


@contextmanager
def unfused_attention() -> Iterator[None]:
    """Run ``nn.MultiheadAttention`` and ``nn.TransformerEncoderLayer`` on their op-by-op path.

    In eval mode without gradients they otherwise take a fused kernel
    (``aten._native_multi_head_attention``) whose projections and attention products no counter
    sees: torch's ``FlopCounterMode`` reports 0 MACs for a whole attention layer. The flag is
    process-wide; it is restored on exit."""
    enabled = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(False)
    try:
        yield
    finally:
        torch.backends.mha.set_fastpath_enabled(enabled)


def count_flops(model: nn.Module, example_inputs: Union[Tensor, Sequence[Tensor]]) -> int:
    """MACs of one forward pass of ``model`` on ``example_inputs`` (all samples of the batch),
    in eval mode; the model is left as it was. Fused attention layers are counted op by op (see
    :func:`unfused_attention`)."""
    from .trace import as_inputs, eval_mode

    inputs = as_inputs(example_inputs)
    counter = _MacCounter()
    with eval_mode(model), torch.no_grad(), unfused_attention(), counter:
        model(*inputs)
    return int(counter.macs)
