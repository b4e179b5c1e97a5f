"""Keep freed memory in the process instead of handing it back to the kernel after every batch.

glibc serves allocations above its mmap threshold (128 KiB, growing to at most 32 MiB) with fresh
``mmap`` pages and returns them on ``free``; a model forward on CPU allocates and frees the same large
activations every batch, so every batch pays the page faults of touching fresh memory again. Raising the
mmap and trim thresholds (``mallopt``) lets freed blocks be reused. Measured on the 2-core dev box, one
model thread, batch 64, curate's own forward: test-tiny-clip 0.49 -> 0.37 ms/image, random ViT-B-32
58.8 -> 54.2 ms/image. The cost: up to ``trim_threshold`` of freed memory per malloc arena stays
resident (the next batch needs it again anyway).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import sys

M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD = 256 << 20
TRIM_THRESHOLD = 512 << 20

_done = False


def keep_freed_memory(mmap_threshold: int = MMAP_THRESHOLD, trim_threshold: int = TRIM_THRESHOLD) -> bool:
    """Raise glibc's mmap and trim thresholds for this process (and the processes it forks later).
    Returns whether they are set (``False`` off glibc, e.g. musl or macOS: nothing changes there)."""
    global _done
    if _done:
        return True
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    _done = bool(mallopt(M_MMAP_THRESHOLD, mmap_threshold)) and bool(mallopt(M_TRIM_THRESHOLD, trim_threshold))
    return _done
