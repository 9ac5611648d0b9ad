"""Host memory in the layer walk (host_memory.py): freed buffers reused within a layer, given back once they pile up."""

from __future__ import annotations

import subprocess
import sys

import pytest

PROBE = """
import torch
from llm_sparsify.host_memory import release_host_memory

def rss_mib():
    return int(next(line for line in open("/proc/self/status") if line.startswith("RssAnon")).split()[1]) / 1024

chunks, live = [], []
for i in range(6000):
    chunks.append(torch.ones(16 * 1024))  # 64 KiB each, from the heap (below glibc's mmap threshold)
    if i % 50 == 0:
        live.append(torch.ones(10))  # small live blocks all through the heap: it cannot simply shrink at the top
chunks.clear()
freed = rss_mib()
released = release_host_memory()
print(released, freed - rss_mib())
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="RssAnon and malloc_trim are Linux/glibc's")
def test_freed_heap_memory_goes_back_to_the_os():
    """375 MiB freed in 64 KiB blocks stays resident after `del`; release_host_memory gives it back (a process of
    its own, so nothing else in the test run shares its heap)."""
    out = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, timeout=120, check=True)
    released, returned_mib = out.stdout.split()
    assert released == "True"
    assert float(returned_mib) > 250, out.stdout


REUSE = """
import resource, sys, torch
from llm_sparsify.host_memory import reuse_freed_buffers

def faults_per_round():
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(20):  # a forward's buffers: a few MiB each, all freed at its end
        buffers = [torch.ones(1 << 20) for _ in range(6)]
        del buffers
    return (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / 20

import ctypes, ctypes.util
from llm_sparsify.host_memory import M_MMAP_THRESHOLD
# glibc's starting threshold, fixed (its adaptive one varies from run to run)
ctypes.CDLL(ctypes.util.find_library("c")).mallopt(M_MMAP_THRESHOLD, 128 * 1024)
faults_per_round()
default = faults_per_round()
print(reuse_freed_buffers(), default, faults_per_round(), faults_per_round())
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="mallopt is glibc's")
def test_freed_buffers_are_reused_without_page_faults():
    """At glibc's starting mmap threshold a forward's 4 MiB buffers go back to the OS and fault in again (1,024 faults
    each; glibc's adaptive threshold avoids that in some runs, not in others); after reuse_freed_buffers the next
    rounds reuse them."""
    out = subprocess.run([sys.executable, "-c", REUSE], capture_output=True, text=True, timeout=120, check=True)
    done, default, _, reused = out.stdout.split()
    assert done == "True"
    assert float(default) > 1000 and float(reused) < 50, out.stdout


GROWN = """
import torch
from llm_sparsify.host_memory import SLACK, free_heap_bytes, release_if_grown, reuse_freed_buffers

def rss_mib():
    return int(next(line for line in open("/proc/self/status") if line.startswith("RssAnon")).split()[1]) / 1024

def free_some(mib):  # freed in 64 KiB blocks with small live blocks between: the heap cannot shrink at its top
    chunks, live = [], []
    for i in range(mib * 16):
        chunks.append(torch.ones(16 * 1024))
        if i % 50 == 0:
            live.append(torch.ones(10))
    return live

reuse_freed_buffers()
keep = [free_some(64)]
baseline = release_if_grown(None)  # after the first layer: kept, not given back
assert baseline == free_heap_bytes(), (baseline, free_heap_bytes())
keep.append(free_some(SLACK // 2**20 // 2))
before = rss_mib()
assert release_if_grown(baseline) == baseline
small = before - rss_mib()
keep.append(free_some(SLACK // 2**20 + 64))
before = rss_mib()
assert release_if_grown(baseline) == baseline
print(small, before - rss_mib())
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="RssAnon and mallinfo2 are Linux/glibc's")
def test_the_walk_gives_memory_back_once_the_free_heap_has_grown():
    """Free heap memory up to SLACK beyond the first layer's stays for the next layer; past it, it goes back."""
    out = subprocess.run([sys.executable, "-c", GROWN], capture_output=True, text=True, timeout=120, check=True)
    kept, returned = map(float, out.stdout.split())
    assert abs(kept) < 8 and returned > 256, out.stdout
