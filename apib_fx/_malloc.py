"""Calibration forwards without page faults on glibc.

glibc's malloc serves every allocation above its mmap threshold (at most 32 MiB) with a fresh
``mmap`` and unmaps it on free, so each feature map of a batch (ResNet-50 at batch 32: up to
100 MiB) is faulted in again, page by page, every time: about 2 million page faults and 40% of
a ResNet-50 forward over 64 images on two cores (4.2 s; 2.6 s without them). While a
calibration forward runs, :func:`keep_freed_memory` serves such allocations from the heap and
keeps what is freed there for the next batch; afterwards it puts glibc's steady-state
thresholds back and hands the free memory to the system (``malloc_trim``). Peak memory grows by
about one batch of feature maps' worth of heap slack, for the duration of the scope only.

A no-op where the C library is not glibc, where another allocator (jemalloc, tcmalloc) is
preloaded (glibc's parameters then do not matter), and with ``APIB_FX_KEEP_FREED_MEMORY=0``.
"""
from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import os
import platform
import threading
from typing import Iterator, Optional

_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
_HEAP_BELOW = 1 << 30  # allocations up to 1 GiB come from the heap while the scope is open
_TRIM_ABOVE = (1 << 31) - 1  # mallopt takes an int: never shrink the heap while it is open
# Afterwards: where glibc's dynamic thresholds settle in any process that has freed a large
# block (mmap threshold at its 32 MiB ceiling, trim threshold twice that). The dynamic state
# itself cannot be restored: setting a threshold switches the adjustment off for good.
_AFTER_MMAP = 32 << 20
_AFTER_TRIM = 64 << 20

_lock = threading.Lock()
_depth = 0
_libc: Optional[ctypes.CDLL] = None
_probed = False


def _glibc() -> Optional[ctypes.CDLL]:
    global _libc, _probed
    if not _probed:
        _probed = True
        if platform.system() == "Linux" and platform.libc_ver()[0] == "glibc":
            try:
                lib = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
                lib.mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
                lib.malloc_trim.argtypes = [ctypes.c_size_t]
                _libc = lib
            except (OSError, AttributeError):
                _libc = None
    return _libc


def enabled() -> bool:
    """Whether :func:`keep_freed_memory` changes anything in this process."""
    return os.environ.get("APIB_FX_KEEP_FREED_MEMORY", "1") != "0" and _glibc() is not None


@contextlib.contextmanager
def keep_freed_memory(active: bool = True) -> Iterator[bool]:
    """While open (and ``active``), large CPU allocations reuse freed heap memory instead of
    being mapped and faulted in anew; yields whether it took effect. Re-entrant and thread-safe:
    the outermost scope restores the thresholds and trims the heap."""
    global _depth
    lib = _glibc() if active and enabled() else None
    if lib is None:
        yield False
        return
    with _lock:
        if _depth == 0:
            lib.mallopt(_M_MMAP_THRESHOLD, _HEAP_BELOW)
            lib.mallopt(_M_TRIM_THRESHOLD, _TRIM_ABOVE)
        _depth += 1
    try:
        yield True
    finally:
        with _lock:
            _depth -= 1
            if _depth == 0:
                lib.mallopt(_M_MMAP_THRESHOLD, _AFTER_MMAP)
                lib.mallopt(_M_TRIM_THRESHOLD, _AFTER_TRIM)
                lib.malloc_trim(0)
