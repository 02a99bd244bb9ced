"""apib_fx: prune a PyTorch model to a FLOPs budget by structured channel pruning on torch.fx.

Three passes over one graph: :func:`trace` (channel groups), scoring (:func:`prune`, APIB by
default) and :func:`apply` (a smaller dense model). :func:`count_flops` counts MACs.
"""
from .flops import count_flops
from .calib import CalibrationError
from .graph import ChannelGraph, ChannelGroup, Member
from .prune import PruneReport, prune
from .recalibrate import recalibrate_bn
from .rewrite import apply
from .rules import RULES, Rule, register_rule
from .search import UnreachableTarget
from .trace import BlockSequence, TraceError, trace
from .bench import benchmark
from .export import export_onnx
from .serialize import load, load_weights, save
from . import models

__all__ = [
    "BlockSequence", "CalibrationError", "ChannelGraph", "ChannelGroup", "Member", "PruneReport", "RULES", "Rule",
    "TraceError", "UnreachableTarget", "apply", "benchmark", "count_flops", "export_onnx", "load",
    "load_weights", "prune", "recalibrate_bn", "register_rule", "save", "trace",
]
__version__ = "0.1.0"
