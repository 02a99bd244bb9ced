"""Calibration forwards keep freed heap memory (glibc): no page faults for a repeated large
allocation inside the scope, glibc's thresholds back afterwards, same pruning results."""
import resource
import threading

import pytest
import torch

import apib_fx
from apib_fx import _malloc
from apib_fx._malloc import keep_freed_memory

from . import models as M

glibc_only = pytest.mark.skipif(not _malloc.enabled(), reason="only glibc's malloc is tuned")

_MB64 = 16 * 1024 * 1024  # float32 elements: 64 MiB, above glibc's largest mmap threshold


def _faults_of_repeated_allocation() -> int:
    """Page faults of the last of several allocate-touch-free rounds of one large block (the
    first rounds may land on heap pages handed back by an earlier trim: they fault once)."""
    for _ in range(3):
        torch.empty(_MB64).fill_(1.0)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    torch.empty(_MB64).fill_(1.0)
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before


@glibc_only
def test_freed_memory_is_reused_inside_the_scope_only():
    pages = _MB64 * 4 // 4096
    outside = _faults_of_repeated_allocation()
    assert outside > pages // 2  # glibc maps a 64 MiB block afresh: every page faults again
    with keep_freed_memory() as on:
        assert on
        inside = _faults_of_repeated_allocation()
    assert inside < pages // 20
    after = _faults_of_repeated_allocation()
    assert after > pages // 2  # the thresholds are back: large blocks go back to the system


@glibc_only
def test_scopes_nest_and_the_outermost_restores():
    with keep_freed_memory():
        with keep_freed_memory():
            pass
        assert _malloc._depth == 1
        assert _faults_of_repeated_allocation() < _MB64 * 4 // 4096 // 20  # still open
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
