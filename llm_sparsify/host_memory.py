"""glibc's heap in the layer walk: freed buffers reused within a layer, given back to the OS once they pile up.

glibc's allocator keeps freed blocks in its arenas (one per thread that allocated) for reuse; a layer walk that
allocates and frees a layer's worth of tensors many times over sees its RSS creep up layer after layer though
little is alive (issue 19: 2.0 GiB over the first layers of a 7B, 3.7 GiB by layer 20). malloc_trim returns what
is free at the top of every arena and unmaps what is free inside them.

Within a layer the opposite is wanted: glibc's default thresholds hand a forward's freed buffers of a few MiB back to
the OS as soon as they are freed, and the next forward pays a page fault per 4 KiB to get them again (2,100–2,600
faults and a sixth of the time of a SmolLM2 layer's forward on 512 tokens). reuse_freed_buffers keeps them in the
heap until the walk gives memory back, which it does only once the free part has grown (release_if_grown):
trimming after every layer made every layer fault its whole working set in again (4 M faults on SmolLM2's Wanda).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools

M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # mallopt's parameters (glibc's malloc.h)
MMAP_THRESHOLD = 32 << 20  # buffers smaller than this come from the heap (glibc's own dynamic limit)
TRIM_THRESHOLD = 64 << 20  # free memory at the top of the heap kept for the next forward
SLACK = 256 << 20  # free heap bytes beyond the first layer's that the walk keeps


@functools.cache
def _glibc(function: str):
    """One of glibc's malloc functions, or None where there is none (not glibc: macOS, musl, Windows)."""
    name = ctypes.util.find_library("c")
    try:
        return getattr(ctypes.CDLL(name), function) if name else None
    except (OSError, AttributeError):
        return None


def release_host_memory() -> bool:
    """Return freed heap memory to the OS now; False where the C library cannot."""
    trim = _glibc("malloc_trim")
    if trim is None:
        return False
    trim(0)
    return True


def reuse_freed_buffers() -> bool:
    """Keep freed buffers under MMAP_THRESHOLD in the heap, and up to TRIM_THRESHOLD free at its top, for reuse
    (process-wide, from now on); False where the C library has no mallopt."""
    mallopt = _glibc("mallopt")
    if mallopt is None:
        return False
    return bool(mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD)) and bool(mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD))


class _MallInfo2(ctypes.Structure):  # glibc's struct mallinfo2 (malloc.h, glibc 2.33 and later)
    _fields_ = [(name, ctypes.c_size_t) for name in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks",
                                                      "fsmblks", "uordblks", "fordblks", "keepcost")]


def free_heap_bytes() -> int | None:
    """Bytes the allocator holds free in its arenas (mallinfo2's fordblks), or None where glibc cannot say."""
    mallinfo2 = _glibc("mallinfo2")
    if mallinfo2 is None:
        return None
    mallinfo2.restype = _MallInfo2  # returned by value; ctypes would read an int
    return int(mallinfo2().fordblks)


def release_if_grown(baseline: int | None) -> int | None:
    """After a layer of a walk: give freed memory back to the OS if the allocator holds more than SLACK bytes free
    beyond what it held after the first layer (`baseline`, returned for the next layers): the next layer reuses
    what the first one freed, but over many big layers the free lists fragment and RSS creeps up. Where glibc
    cannot say, after every layer. (mallinfo2 still counts trimmed chunks as free, so once this has trimmed it
    trims after most later layers too: 22 of 30 in a SmolLM2 SparseGPT run, no slower than never trimming.)"""
    free = free_heap_bytes()
    if free is None or (baseline is not None and free > baseline + SLACK):
        release_host_memory()
    return baseline if baseline is not None else free
