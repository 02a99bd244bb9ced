"""Independent CPU jobs spread over forked processes: the Lasso paths of the channel groups.

A path is a few hundred to a few thousand small numpy steps, bound by Python and the GIL, so
threads do not help; on a machine with n cores n-1 forked children and this process each take
a share. A child inherits the problems (no copying in), runs only numpy, sends its results back
through a pipe and leaves with ``os._exit``. Where fork is unavailable or unsafe (not Linux), a
child fails, or ``workers`` is 1, the jobs run here, one after the other, with the same results.
"""
from __future__ import annotations

import contextlib
import os
import pickle
import signal
import sys
import warnings
from typing import Any, Callable, Hashable, Iterator, Mapping, Optional

MAX_WORKERS = 8


def default_workers() -> int:
    """CPU cores this process may use (affinity and cgroup masks respected), at most 8."""
    try:
        cores = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        cores = os.cpu_count() or 1
    return max(1, min(MAX_WORKERS, cores))


def _can_fork() -> bool:
    return sys.platform.startswith("linux") and hasattr(os, "fork")


@contextlib.contextmanager
def _one_blas_thread() -> Iterator[None]:
    """numpy's BLAS at one thread while the processes share the cores (more would oversubscribe
    them: measured 2.5x slower on two cores)."""
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:  # pragma: no cover - a dependency; without it the pool merely oversubscribes
        yield
        return
    with threadpool_limits(1, user_api="blas"):
        yield


def _balance(cost: Mapping[Hashable, float], parts: int) -> list[list[Hashable]]:
    """Longest job first onto the least loaded part (deterministic: ties by key order)."""
    bins: list[list[Hashable]] = [[] for _ in range(parts)]
    load = [0.0] * parts
    for key in sorted(cost, key=lambda k: -cost[k]):
        i = min(range(parts), key=lambda j: load[j])
        bins[i].append(key)
        load[i] += cost[key]
    return [b for b in bins if b]


def _read_all(fd: int) -> bytes:
    chunks = []
    while True:
        chunk = os.read(fd, 1 << 20)
        if not chunk:
            return b"".join(chunks)
        chunks.append(chunk)


def fork_map(
    fn: Callable[[Any], Any],
    jobs: Mapping[Hashable, Any],
    cost: Mapping[Hashable, float],
    workers: Optional[int] = None,
    done: Optional[Callable[[Hashable], None]] = None,
) -> dict[Hashable, Any]:
    """``{key: fn(job)}`` for every job, over ``workers`` processes (default: :func:`default_workers`).

    ``cost``: relative run time of each job, to balance the shares. ``fn``'s results must pickle.
    ``done(key)`` is called here as results arrive (progress bars). Results are identical to
    running the jobs in this process.
    """
    workers = default_workers() if workers is None else int(workers)
    if workers < 1:
        raise ValueError(f"workers must be >= 1, got {workers}")
    parts = _balance({k: float(cost.get(k, 1.0)) for k in jobs}, workers) if jobs else []
    results: dict[Hashable, Any] = {}

    def run_here(keys: list[Hashable]) -> None:
        for k in keys:
            results[k] = fn(jobs[k])
            if done is not None:
                done(k)

    if len(parts) <= 1 or not _can_fork():
        run_here(list(jobs))
        return results
    children: list[tuple[int, int, list[Hashable]]] = []
    with _one_blas_thread():
        try:
            here = list(parts[0])
            for keys in parts[1:]:
                r, w = os.pipe()
                try:
                    with warnings.catch_warnings():
                        # Python 3.12 warns about forking a multi-threaded process: the child runs
                        # only numpy code that was loaded before the fork and takes no shared lock.
                        warnings.simplefilter("ignore", DeprecationWarning)
                        pid = os.fork()
                except OSError:  # no processes to spare (limits, a sandbox): this share runs here
                    os.close(r)
                    os.close(w)
                    here += keys
                    continue
                if pid == 0:  # the child: compute, send, leave without running any cleanup
                    code = 1
                    try:
                        os.close(r)
                        payload = pickle.dumps({k: fn(jobs[k]) for k in keys}, protocol=pickle.HIGHEST_PROTOCOL)
                        view = memoryview(payload)
                        while view:
                            view = view[os.write(w, view):]
                        code = 0
                    finally:
                        os._exit(code)
                os.close(w)
                children.append((pid, r, keys))
            run_here(here)
            for pid, r, keys in children:
                try:
                    got = pickle.loads(_read_all(r))
                except Exception:
                    got = None
                if not isinstance(got, dict) or set(got) != set(keys):
                    warnings.warn(f"a worker process (pid {pid}) returned no results; its {len(keys)} "
                                  "jobs run in this process instead", RuntimeWarning, stacklevel=2)
                    run_here(keys)
                    continue
                results.update(got)
                if done is not None:
                    for k in keys:
                        done(k)
        except BaseException:
            for pid, _, _ in children:  # this process failed or was interrupted: stop the others
                with contextlib.suppress(OSError):
                    os.kill(pid, signal.SIGKILL)
            raise
        finally:
            for pid, r, _ in children:
                with contextlib.suppress(OSError):
                    os.close(r)  # a child still writing gets EPIPE and exits
                with contextlib.suppress(ChildProcessError):
                    os.waitpid(pid, 0)
    return results
