"""Process set-up for the command lines: glibc's allocator kept from handing freed tensor memory back to the OS.

PyTorch's CPU tensors come from glibc ``malloc``. Its defaults return freed memory to the kernel (blocks above
the dynamic mmap threshold are unmapped, a free heap top above the trim threshold is trimmed), so the next
tensor of that size is page-faulted in afresh, page by page. A streaming step allocates and frees tens of MiB of
feature maps, and on this project's 2-core CPU box that cost 3,000-8,000 page faults per frame, 5-10% of an
MRCFA-B1 frame at 256x448, varying from run to run with the heap's history (PyTorch's CPU tuning guide suggests
jemalloc or tcmalloc for the same reason). :func:`tune_host_allocator` sets glibc's own knobs through
``mallopt``: tensors up to 32 MiB (the most glibc allows) come from the heap, and the heap is not trimmed
below 1 GiB of free memory, so freed blocks are reused without faults. Resident memory stays at its peak
rather than shrinking between frames. ``VSS_MALLOC=default`` leaves glibc's defaults; other C libraries
(musl, macOS) are left alone.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import sys
from functools import cache

M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # glibc's malloc.h
MMAP_THRESHOLD = 32 * 2**20  # glibc's maximum (HEAP_MAX_SIZE / 2 on 64-bit)
TRIM_THRESHOLD = 2**30


@cache
def tune_host_allocator() -> bool:
    """Set glibc malloc's mmap and trim thresholds (see the module docstring); True when they were set."""
    if os.environ.get("VSS_MALLOC", "").lower() == "default" or not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # not glibc
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    return bool(mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD)) and bool(mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD))
