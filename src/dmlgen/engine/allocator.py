"""Keep freed memory in the process: glibc's default allocator hands every large buffer back to the kernel.

A training step allocates and frees buffers of 0.25–2 MB (distance matrices, a miner's float64 weights, their
gradients); PyTorch's CPU allocator does not cache them, and glibc's defaults return such blocks to the kernel
(``mmap``/``munmap``, or trimming the heap top), so the next step page-faults them in again. On the 2-core VM of
docs/benchmarks.md, keeping them made MDR's recipe loss step take 0.76x as long and a short Omniglot run 5% less.
The settings keep up to ~200 MB of freed memory for reuse.
"""

from __future__ import annotations

import ctypes
import os
import sys

#: glibc ``mallopt`` parameters (malloc.h) and the values set: blocks under 64 MB come from the heap, and
#: the heap keeps up to 128 MB free at its top (plus 64 MB of padding per growth) instead of trimming it.
M_TRIM_THRESHOLD, M_TOP_PAD, M_MMAP_THRESHOLD = -1, -2, -3
SETTINGS = ((M_MMAP_THRESHOLD, 64 << 20), (M_TRIM_THRESHOLD, 128 << 20), (M_TOP_PAD, 64 << 20))
#: Set to 0 to keep the allocator's defaults.
OPT_OUT = "DMLGEN_MALLOC_TUNING"
#: glibc's own variables for the same settings: when the user set any, theirs stand.
GLIBC_VARIABLES = ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "MALLOC_TOP_PAD_", "MALLOC_ARENA_MAX")


def tune_glibc_malloc() -> bool:
    """Apply :data:`SETTINGS` with glibc's ``mallopt``; returns whether they were applied.

    Does nothing (False) outside Linux, without glibc's ``mallopt`` (musl), when ``DMLGEN_MALLOC_TUNING=0``, or
    when one of glibc's ``MALLOC_*`` variables is set. Process-wide: the ``dmlgen`` command calls it at start;
    a Python program that trains through :func:`dmlgen.train` may call it once itself.
    """
    if os.environ.get(OPT_OUT, "1") == "0" or any(name in os.environ for name in GLIBC_VARIABLES):
        return False
    if not sys.platform.startswith("linux"):
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    return all(mallopt(param, value) == 1 for param, value in SETTINGS)


__all__ = ["tune_glibc_malloc"]
