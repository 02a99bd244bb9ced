"""Lasso paths spread over forked processes: same results as in-process, and failures recovered."""
import os

import numpy as np
import pytest
import torch

import apib_fx
from apib_fx import _fork
from apib_fx._fork import _balance, fork_map
from apib_fx.hsic import nonneg_lasso_path
from apib_fx.testing import zoo_model

from . import models as M

linux_only = pytest.mark.skipif(not _fork._can_fork(), reason="workers fork only on Linux")


def _problems(n=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    out = {}
    for i in range(n):
        C = 8 + 9 * i
        k = torch.randn(C, 40, generator=g, dtype=torch.float64)
        k = k / k.norm(dim=1, keepdim=True)
        out[i] = (k @ k.T, (k @ torch.randn(40, generator=g, dtype=torch.float64)).abs())
    return out


def _survival(problem):
    return nonneg_lasso_path(*problem).survival.numpy()


def _pid(_):
    return os.getpid()


def test_balance_is_longest_first_and_deterministic():
    cost = {"a": 5.0, "b": 4.0, "c": 3.0, "d": 3.0, "e": 1.0}
    parts = _balance(cost, 2)
    assert parts == [["a", "d"], ["b", "c", "e"]]
    assert sorted(k for p in _balance(cost, 8) for k in p) == sorted(cost)
    assert len(_balance(cost, 8)) == 5  # no empty shares


@linux_only
@pytest.mark.parametrize("workers", [2, 3])
def test_forked_results_equal_in_process_ones(workers):
    problems = _problems()
    cost = {k: float(G.shape[0]) ** 2 for k, (G, _) in problems.items()}
    seen = []
    here = fork_map(_survival, problems, cost, workers=1)
    there = fork_map(_survival, problems, cost, workers=workers, done=seen.append)
    assert here.keys() == there.keys() and sorted(seen) == sorted(problems)
    for k in problems:
        assert np.array_equal(here[k], there[k])
    # The work really left this process.
    pids = fork_map(_pid, problems, cost, workers=workers)
    assert len(set(pids.values())) == workers and os.getpid() in pids.values()


@linux_only
def test_a_failing_child_share_is_redone_here():
    parent = os.getpid()

    def flaky(job):
        if os.getpid() != parent:
            raise RuntimeError("lost in the child")
        return job * 2

    jobs = {i: i for i in range(5)}
    with pytest.warns(RuntimeWarning, match="worker process"):
        assert fork_map(flaky, jobs, {i: 1.0 for i in jobs}, workers=3) == {i: 2 * i for i in jobs}
    # A child killed outright (no Python cleanup, no result) is recovered the same way.

    def dies(job):
        if os.getpid() != parent:
            os._exit(3)
        return -job

    with pytest.warns(RuntimeWarning, match="worker process"):
        assert fork_map(dies, jobs, {i: 1.0 for i in jobs}, workers=2) == {i: -i for i in jobs}


def test_one_worker_never_forks(monkeypatch):
    def no_fork():
        raise AssertionError("forked")

    monkeypatch.setattr(os, "fork", no_fork)
    jobs = {i: i for i in range(4)}
    assert fork_map(lambda j: j + 1, jobs, {}, workers=1) == {i: i + 1 for i in jobs}
    with pytest.raises(ValueError, match="workers"):
        fork_map(lambda j: j, jobs, {}, workers=0)


@linux_only
def test_prune_scores_do_not_depend_on_workers():
    model = zoo_model("resnet18", num_classes=10)
    x = torch.randn(16, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    one = apib_fx.prune(model, 0.4, x, num_calib=16, batch_size=8, progress=False, workers=1)
    two = apib_fx.prune(model, 0.4, x, num_calib=16, batch_size=8, progress=False, workers=2)
    assert [r.channels_after for r in one.apib_report.groups] == [r.channels_after for r in two.apib_report.groups]
    assert one.apib_report.alpha == two.apib_report.alpha
    for (k, a), (_, b) in zip(one.state_dict().items(), two.state_dict().items()):
        assert torch.equal(a, b), k
    with pytest.raises(ValueError, match="workers"):
        apib_fx.prune(model, 0.4, x, num_calib=16, progress=False, workers=0)


def test_small_models_solve_their_paths_in_process(monkeypatch):
    # A few milliseconds of paths: forking a large process would cost more than it saves.
    def no_fork():
        raise AssertionError("forked for a tiny model")

    monkeypatch.setattr(os, "fork", no_fork)
    model = M.ResidualChain()
    x = torch.randn(8, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    graph = apib_fx.trace(model, x[:1])
    assert 0 < sum(g.channels ** 1.75 for g in graph.prunable_groups) < 150_000
    pruned = apib_fx.prune(model, 0.3, x, num_calib=8, batch_size=8, progress=False, tolerance=0.05)
    assert "lasso" in pruned.apib_report.timings and pruned.apib_report.flops_reduction > 0


def test_without_fork_the_jobs_run_here(monkeypatch):
    # macOS, Windows: no fork (or not a safe one); the same results come from this process.
    def no_fork():
        raise AssertionError("forked where fork is not used")

    monkeypatch.setattr(os, "fork", no_fork)
    monkeypatch.setattr(_fork.sys, "platform", "darwin")
    problems = _problems(4)
    got = fork_map(_survival, problems, {k: 1.0 for k in problems}, workers=4)
    for k, p in problems.items():
        assert np.array_equal(got[k], _survival(p))


@linux_only
def test_an_error_here_stops_the_children_and_propagates():
    parent = os.getpid()

    def fails_here(job):
        if os.getpid() == parent:
            raise KeyError("here")
        import time
        time.sleep(30)  # a child still busy: it is killed, not waited for
        return job

    jobs = {i: i for i in range(4)}
    with pytest.raises(KeyError, match="here"):
        fork_map(fails_here, jobs, {i: 1.0 for i in jobs}, workers=2)
    with pytest.raises(ChildProcessError):
        os.waitpid(-1, os.WNOHANG)  # no child left behind


def test_when_fork_fails_the_jobs_run_here(monkeypatch):
    def refused():
        raise BlockingIOError(11, "Resource temporarily unavailable")

    monkeypatch.setattr(os, "fork", refused)
    monkeypatch.setattr(_fork, "_can_fork", lambda: True)
    problems = _problems(4)
    got = fork_map(_survival, problems, {k: 1.0 for k in problems}, workers=3)
    assert got.keys() == problems.keys()
    for k, p in problems.items():
        assert np.array_equal(got[k], _survival(p))


# ForkRounds: stateful jobs walked through rounds, each process at its own pace.


def _counter(job):
    return {"start": job, "seen": []}


def _count(state, arg):
    state["seen"].append(arg)
    return state["start"] + sum(state["seen"]), os.getpid()


def _expected(jobs, rounds):
    return [{k: j + sum(rounds[: i + 1]) for k, j in jobs.items()} for i in range(len(rounds))]


@pytest.mark.parametrize("workers", [1, 2, 3])
def test_rounds_carry_state_and_equal_the_in_process_results(workers):
    jobs = {i: 10 * i for i in range(5)}
    rounds = [1, 2, 3, 4]
    with _fork.ForkRounds(_counter, _count, jobs, {i: 1.0 for i in jobs}, rounds, workers=workers) as pool:
        got = list(pool)
    assert [{k: v for k, (v, _) in r.items()} for r in got] == _expected(jobs, rounds)
    pids = {pid for r in got for _, pid in r.values()}
    assert len(pids) == (workers if _fork._can_fork() else 1)  # every share ran in its own process


@linux_only
def test_rounds_of_a_failing_child_are_replayed_here():
    parent = os.getpid()

    def dies_in_round_three(state, arg):
        if os.getpid() != parent and arg == 3:
            os._exit(5)
        return _count(state, arg)[0]

    jobs = {i: i for i in range(4)}
    rounds = [1, 2, 3, 4]
    with pytest.warns(RuntimeWarning, match="worker process"):
        with _fork.ForkRounds(_counter, dies_in_round_three, jobs, {i: 1.0 for i in jobs}, rounds, workers=2) as pool:
            got = list(pool)
    assert got == _expected(jobs, rounds)  # the lost share rebuilt and replayed from round one


@linux_only
def test_leaving_the_rounds_early_stops_busy_children():
    import time
    parent = os.getpid()

    def slow_there(state, arg):
        if os.getpid() != parent and arg > 1:
            time.sleep(30)  # still busy when the first round sufficed: killed, not waited for
        return arg

    jobs = {i: i for i in range(4)}
    start = time.perf_counter()
    with _fork.ForkRounds(_counter, slow_there, jobs, {i: 1.0 for i in jobs}, [1, 2, 3], workers=2) as pool:
        first = next(iter(pool))
    assert first == {i: 1 for i in jobs}
    assert time.perf_counter() - start < 10
    with pytest.raises(ChildProcessError):
        os.waitpid(-1, os.WNOHANG)  # no child left behind


def test_rounds_without_fork_run_here(monkeypatch):
    def no_fork():
        raise AssertionError("forked where fork is not used")

    monkeypatch.setattr(os, "fork", no_fork)
    monkeypatch.setattr(_fork.sys, "platform", "darwin")
    jobs = {i: i for i in range(3)}
    with _fork.ForkRounds(_counter, _count, jobs, {}, [5, 6], workers=3) as pool:
        assert [{k: v for k, (v, _) in r.items()} for r in pool] == _expected(jobs, [5, 6])
    with pytest.raises(ValueError, match="workers"):
        _fork.ForkRounds(_counter, _count, jobs, {}, [1], workers=0)


@linux_only
def test_an_error_in_a_round_here_stops_the_children_and_propagates():
    import time
    parent = os.getpid()

    def fails_here_in_round_two(state, arg):
        if os.getpid() == parent and arg == 2:
            raise KeyError("here")
        if os.getpid() != parent and arg == 2:
            time.sleep(30)  # a child still busy: it is killed, not waited for
        return arg

    jobs = {i: i for i in range(4)}
    start = time.perf_counter()
    with pytest.raises(KeyError, match="here"):
        with _fork.ForkRounds(_counter, fails_here_in_round_two, jobs, {i: 1.0 for i in jobs}, [1, 2, 3],
                              workers=2) as pool:
            for _ in pool:
                pass
    assert time.perf_counter() - start < 10
    with pytest.raises(ChildProcessError):
        os.waitpid(-1, os.WNOHANG)  # no child left behind
