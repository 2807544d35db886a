"""The C allocator's handling of large blocks, tuned for frame-by-frame work (Linux, glibc).

A detection pass allocates and frees tens of MB of tensors per frame (the point features
of the pillar net alone are 61,000 x 64 floats). By default glibc gives large freed blocks
back to the operating system and maps fresh pages for the next frame, and every fresh page
is faulted in again when first written: the pillar net spent about a quarter of its time
on that. `keep_freed_memory` asks glibc to serve blocks of up to 32 MB from its heap and to
keep up to 1 GB of freed memory for reuse. Values are unchanged (it is the same arithmetic
on reused memory); the process's resident memory stays near its peak instead of shrinking
between frames. The `haltdet` command calls it at start; in Python, call it once before
the work. HALTDET_KEEP_FREED_MEMORY=0 in the environment turns it off.
"""

from __future__ import annotations

import ctypes
import os
import sys

# mallopt parameters (glibc's malloc.h)
M_TRIM_THRESHOLD, M_TOP_PAD, M_MMAP_THRESHOLD = -1, -2, -3
SETTINGS = {M_MMAP_THRESHOLD: 32 << 20, M_TRIM_THRESHOLD: 1 << 30, M_TOP_PAD: 256 << 20}


def keep_freed_memory() -> bool:
    """Apply SETTINGS with glibc's mallopt; True if every one took effect, False where
    there is no glibc (other systems, musl) or HALTDET_KEEP_FREED_MEMORY=0, and nothing
    changed."""
    if not sys.platform.startswith("linux") or os.environ.get("HALTDET_KEEP_FREED_MEMORY") == "0":
        return False
    try:
        mallopt = ctypes.CDLL("libc.so.6").mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    return all(mallopt(parameter, value) == 1 for parameter, value in SETTINGS.items())
