"""``nn.MultiheadAttention`` written out for the trace, so its head widths can be pruned.

The module packs q, k and v into one ``in_proj_weight`` and assumes every projection is
``embed_dim`` wide, so it cannot run with fewer q/k/v channels per head. While tracing, a
self-attention call (``attn(x, x, x)``) is recorded as the ops it computes instead: one
``F.linear`` on the packed weight, ``chunk`` into q, k, v, heads by ``unflatten``, attention
(``F.scaled_dot_product_attention`` with the scale frozen at 1/sqrt(head_dim), or
softmax(q kᵀ) v when the weights are asked for) and ``out_proj``. Those ops have channel rules:
q and k lose the same positions in every head, v and ``out_proj``'s inputs go together, and the
parameter names stay those of the module.

Calls the written-out form cannot reproduce exactly stay one opaque node: cross-attention
(query, key and value not the same tensor), masks, ``is_causal``, ``add_bias_kv``,
``add_zero_attn`` and attention dropout (the trace runs in eval mode and would drop it).

``nn.TransformerEncoder`` and ``nn.TransformerEncoderLayer``, which fx cannot trace at all, are
written out as their submodule calls the same way when called without masks.
"""
from __future__ import annotations

import inspect
import math
from typing import Any, Optional

import torch
import torch.nn.functional as F
from torch import nn

_SIGNATURE = inspect.signature(nn.MultiheadAttention.forward)


def _arguments(signature: inspect.Signature, m: nn.Module, args: tuple, kwargs: dict) -> Optional[dict]:
    """The call's arguments by name, defaults included; None if they do not fit the signature."""
    try:
        bound = signature.bind(m, *args, **kwargs)
    except TypeError:
        return None
    bound.apply_defaults()
    return bound.arguments


def _exact(m: nn.MultiheadAttention, a: dict) -> bool:
    """Whether the written-out form reproduces this call exactly (see the module docstring)."""
    return (
        a["query"] is a["key"] is a["value"]
        and a["key_padding_mask"] is None
        and a["attn_mask"] is None
        and not a["is_causal"]
        and m._qkv_same_embed_dim
        and m.bias_k is None
        and not m.add_zero_attn
        and m.dropout == 0.0
    )


def write_out(m: nn.MultiheadAttention, args: tuple, kwargs: dict) -> Optional[tuple[Any, Optional[Any]]]:
    """``m(*args, **kwargs)`` as individual ops on (fx proxy) tensors: ``(output, weights)``, or
    None when that would not be exact and the call must stay one node.

    Works for batched and unbatched inputs alike, so the trace needs no shapes.
    """
    a = _arguments(_SIGNATURE, m, args, kwargs)
    if a is None or not _exact(m, a):
        return None
    # Batch first: (L, N, E) -> (N, L, E); an unbatched (L, E) is left as it is (transpose(0, 0)).
    # Below only the last axes are addressed, by transposes: movedim with negative dims exports
    # to an ONNX Transpose with a negative perm, which ONNX Runtime rejects.
    x = a["query"] if m.batch_first else a["query"].transpose(0, -2)
    heads = m.num_heads
    scale = 1.0 / math.sqrt(m.head_dim)  # frozen: pruning head dims must not change the temperature
    q, k, v = F.linear(x, m.in_proj_weight, m.in_proj_bias).chunk(3, dim=-1)

    def to_heads(t: Any) -> Any:  # (..., L, E) -> (..., heads, L, head_dim)
        return t.unflatten(-1, (heads, -1)).transpose(-3, -2)

    q, k, v = to_heads(q), to_heads(k), to_heads(v)
    weights = None
    if a["need_weights"]:
        attn = torch.softmax(torch.matmul(q * scale, k.transpose(-2, -1)), dim=-1)
        out = torch.matmul(attn, v)
        weights = attn.mean(dim=-3) if a["average_attn_weights"] else attn
    else:
        out = F.scaled_dot_product_attention(q, k, v, scale=scale)
    out = m.out_proj(out.transpose(-3, -2).flatten(-2))
    return (out if m.batch_first else out.transpose(0, -2)), weights


_LAYER_SIGNATURE = inspect.signature(nn.TransformerEncoderLayer.forward)
_ENCODER_SIGNATURE = inspect.signature(nn.TransformerEncoder.forward)


def write_out_encoder_layer(m: nn.TransformerEncoderLayer, args: tuple, kwargs: dict) -> Optional[Any]:
    """``nn.TransformerEncoderLayer`` without masks, as its submodule calls (its forward first
    branches on tensor properties for a fused path, which fx cannot trace). Its feed-forward width
    and, through ``self_attn``, its head dims then get rules; dropout stays a module, so training
    behaves as before."""
    a = _arguments(_LAYER_SIGNATURE, m, args, kwargs)
    if a is None or a["src_mask"] is not None or a["src_key_padding_mask"] is not None or a["is_causal"]:
        return None
    if not (hasattr(m, "_sa_block") and hasattr(m, "_ff_block")):  # torch's own helpers; keep whole if renamed
        return None
    x = a["src"]
    if m.norm_first:
        x = x + m._sa_block(m.norm1(x), None, None)
        return x + m._ff_block(m.norm2(x))
    x = m.norm1(x + m._sa_block(x, None, None))
    return m.norm2(x + m._ff_block(x))


def write_out_encoder(m: nn.TransformerEncoder, args: tuple, kwargs: dict) -> Optional[Any]:
    """``nn.TransformerEncoder`` without masks: its layers in turn, then its norm."""
    a = _arguments(_ENCODER_SIGNATURE, m, args, kwargs)
    if a is None or a["mask"] is not None or a["src_key_padding_mask"] is not None or a["is_causal"]:
        return None
    x = a["src"]
    for layer in m.layers:
        x = layer(x)
    return m.norm(x) if m.norm is not None else x
