"""Independent CPU jobs spread over forked processes: the Lasso paths of the channel groups,
walked whole (:func:`fork_map`) or level by level until the FLOPs search has what it needs
(:class:`ForkRounds`).

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
import threading
import warnings
from typing import Any, Callable, Hashable, Iterator, Mapping, Optional, Sequence

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


def _send(fd: int, obj: Any) -> None:
    payload = pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL)
    view = memoryview(len(payload).to_bytes(8, "little") + payload)
    while view:
        view = view[os.write(fd, view):]


def _read_exactly(fd: int, n: int) -> bytes:
    chunks, left = [], n
    while left:
        chunk = os.read(fd, min(left, 1 << 20))
        if not chunk:
            raise EOFError("the other end closed the pipe")
        chunks.append(chunk)
        left -= len(chunk)
    return b"".join(chunks)


def _receive(fd: int) -> Any:
    return pickle.loads(_read_exactly(fd, int.from_bytes(_read_exactly(fd, 8), "little")))


class _Child:
    def __init__(self, pid: int, fd: int, keys: list[Hashable]):
        self.pid, self.fd, self.keys = pid, fd, keys
        self.frames: list[dict] = []  # its results, one per round, as they arrive
        self.ended = False  # no more will come (finished, failed or stopped)
        self.reader: Optional[threading.Thread] = None


class ForkRounds:
    """Stateful jobs spread over forked processes and run through one sequence of ``rounds``:
    ``make(job)`` builds each job's state once, in the process that owns it, and round i calls
    ``step(state, rounds[i])`` on every state. Iterating yields ``{key: result}`` round by round.

    Every process works through the rounds on its own, without waiting for the others (a
    child's results are collected by a thread here as they come), so a share that is light in
    one round and heavy in the next costs no idle time: this process runs ahead on its share
    while a child is still on an earlier round. Stop iterating (or :meth:`close`) when the
    results suffice: the children are stopped wherever they are. As :func:`fork_map`: where
    fork is unavailable or ``workers`` is 1 everything runs here, and a child that fails has its
    jobs rebuilt and replayed here, so results never depend on where a job ran.
    """

    def __init__(self, make: Callable[[Any], Any], step: Callable[[Any, Any], Any], jobs: Mapping[Hashable, Any],
                 cost: Mapping[Hashable, float], rounds: Sequence[Any], workers: Optional[int] = None):
        workers = default_workers() if workers is None else int(workers)
        if workers < 1:
            raise ValueError(f"workers must be >= 1, got {workers}")
        self._make, self._step, self._jobs, self._rounds = make, step, jobs, list(rounds)
        self._children: list[_Child] = []
        self._news = threading.Condition()
        self._blas = contextlib.ExitStack()
        self._here: list[dict] = []  # this process's results, one per round computed
        parts = _balance({k: float(cost.get(k, 1.0)) for k in jobs}, workers) if jobs else []
        here: list[Hashable] = list(parts[0]) if parts else []
        if len(parts) > 1 and _can_fork():
            self._blas.enter_context(_one_blas_thread())
            try:
                for keys in parts[1:]:
                    if not self._fork(keys):
                        here += keys
            except BaseException:
                self.close()
                raise
            # Readers start once every child is forked: a child must not inherit a lock a thread holds.
            for child in self._children:
                child.reader = threading.Thread(target=self._read, args=(child,), daemon=True)
                child.reader.start()
        else:
            here = list(jobs)
        self._states = {k: make(jobs[k]) for k in here}

    def _fork(self, keys: list[Hashable]) -> bool:
        r, w = os.pipe()
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", DeprecationWarning)  # (see fork_map)
                pid = os.fork()
        except OSError:  # no processes to spare: this share runs here
            os.close(r)
            os.close(w)
            return False
        if pid == 0:  # the child: every round on its own states, then leave
            code = 1
            try:
                os.close(r)
                for child in self._children:
                    os.close(child.fd)
                states = {k: self._make(self._jobs[k]) for k in keys}
                for arg in self._rounds:
                    _send(w, {k: self._step(state, arg) for k, state in states.items()})
                code = 0
            finally:
                os._exit(code)
        os.close(w)
        self._children.append(_Child(pid, r, keys))
        return True

    def _read(self, child: _Child) -> None:
        while True:
            try:
                frame = _receive(child.fd)
            except Exception:  # the end of its rounds, or a failure: told apart by the count
                frame = None
            with self._news:
                if frame is None:
                    child.ended = True
                else:
                    child.frames.append(frame)
                self._news.notify_all()
            if frame is None:
                return

    def _compute_here(self) -> None:
        arg = self._rounds[len(self._here)]
        self._here.append({k: self._step(state, arg) for k, state in self._states.items()})

    def _take_over(self, child: _Child) -> None:
        """A child ended before its round: its jobs are rebuilt here, every round so far replayed."""
        warnings.warn(f"a worker process (pid {child.pid}) failed; its {len(child.keys)} jobs run in this "
                      "process instead", RuntimeWarning, stacklevel=3)
        self._children.remove(child)
        self._stop(child)
        for k in child.keys:
            state = self._states[k] = self._make(self._jobs[k])
            for arg, results in zip(self._rounds, self._here):
                results[k] = self._step(state, arg)

    def __iter__(self) -> Iterator[dict[Hashable, Any]]:
        for i in range(len(self._rounds)):
            while len(self._here) <= i:
                self._compute_here()
            while True:
                with self._news:
                    waiting = [c for c in self._children if len(c.frames) <= i]
                    failed = [c for c in waiting if c.ended]
                for child in failed:
                    self._take_over(child)
                if len(waiting) == len(failed):
                    break
                if len(self._here) < len(self._rounds):
                    self._compute_here()  # run ahead rather than wait
                else:
                    with self._news:
                        self._news.wait(0.05)
            results = dict(self._here[i])
            for child in self._children:
                results.update(child.frames[i])
            yield results

    @staticmethod
    def _stop(child: _Child) -> None:
        with contextlib.suppress(OSError):
            os.kill(child.pid, signal.SIGKILL)  # (a child only computes: nothing to clean up)
        with contextlib.suppress(ChildProcessError):
            os.waitpid(child.pid, 0)
        if child.reader is not None:
            child.reader.join()  # it reads EOF now that the child is gone
        with contextlib.suppress(OSError):
            os.close(child.fd)

    def close(self) -> None:
        """Stop the children wherever they are."""
        children, self._children = self._children, []
        for child in children:
            self._stop(child)
        self._blas.close()

    def __enter__(self) -> "ForkRounds":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()
