"""Calibration forwards keep freed heap memory (glibc): no page faults for a repeated large
allocation inside the scope, the heap trimmed afterwards, same pruning results."""
import subprocess
import sys
import threading

import pytest
import torch

import apib_fx
from apib_fx import _malloc
from apib_fx._malloc import keep_freed_memory

from . import models as M

glibc_only = pytest.mark.skipif(not _malloc.enabled(), reason="only glibc's malloc is tuned")

_MB64 = 16 * 1024 * 1024  # float32 elements: 64 MiB, above glibc's largest mmap threshold


_SCRIPT = """
import resource, torch
from apib_fx._malloc import keep_freed_memory

def faults(rounds):
    # Page faults of the last of `rounds` allocate-touch-free rounds of one 64 MiB block (the
    # first rounds inside a scope grow the heap: they fault once).
    for _ in range(rounds - 1):
        torch.empty(16 * 1024 * 1024).fill_(1.0)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    torch.empty(16 * 1024 * 1024).fill_(1.0)
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before

outside = faults(4)
with keep_freed_memory() as on:
    with keep_freed_memory():
        pass  # an inner scope closing leaves the outer one in effect
    inside = faults(6)
after = faults(1)  # the heap was trimmed: its pages went back to the system
print(outside, inside, after, int(on))
"""


@glibc_only
def test_freed_memory_is_reused_inside_the_scope_only():
    # A fresh interpreter: what earlier tests left in the heap does not blur the counts.
    out = subprocess.run([sys.executable, "-c", _SCRIPT], capture_output=True, text=True, check=True)
    outside, inside, after, on = map(int, out.stdout.split())
    pages = _MB64 * 4 // 4096
    assert on == 1
    assert outside > pages // 2  # glibc maps a 64 MiB block afresh: every page faults again
    assert inside < pages // 20
    assert after > pages // 2


@glibc_only
def test_scopes_nest_and_the_outermost_restores():
    with keep_freed_memory():
        with keep_freed_memory():
            pass
        assert _malloc._depth == 1
    assert _malloc._depth == 0


@glibc_only
def test_scopes_from_threads_keep_count():
    errors = []

    def work():
        try:
            for _ in range(20):
                with keep_freed_memory():
                    torch.empty(1 << 20).fill_(0.0)
        except Exception as e:  # pragma: no cover - reported below
            errors.append(e)

    threads = [threading.Thread(target=work) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and _malloc._depth == 0


def test_switched_off_by_environment_and_argument(monkeypatch):
    with keep_freed_memory(active=False) as on:
        assert not on
    monkeypatch.setenv("APIB_FX_KEEP_FREED_MEMORY", "0")
    assert not _malloc.enabled()
    with keep_freed_memory() as on:
        assert not on
    assert _malloc._depth == 0


def test_pruning_is_identical_with_and_without(monkeypatch):
    model = M.ResidualChain()
    x = torch.randn(32, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    kept = []
    for flag in ("1", "0"):
        monkeypatch.setenv("APIB_FX_KEEP_FREED_MEMORY", flag)
        pruned = apib_fx.prune(model, 0.4, x, batch_size=16, progress=False)
        kept.append({k: v.clone() for k, v in pruned.state_dict().items()})
    assert kept[0].keys() == kept[1].keys()
    for k in kept[0]:
        assert torch.equal(kept[0][k], kept[1][k]), k
