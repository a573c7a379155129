"""allocator.keep_freed_memory: freed training buffers stay in the process (no page faults on reuse)."""
import platform
import subprocess
import sys

import pytest

SCRIPT = """
import resource, sys, torch
from r1kit.allocator import keep_freed_memory
def faults():
    total = 0
    for _ in range(20):  # a step's large buffers: allocated, written, freed, again
        f = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        x = torch.ones(4 << 20)  # 16 MiB
        del x
        total += resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f
    return total
before = faults()
applied = keep_freed_memory()
faults()  # the first reuse may still grow the heap
print(before, faults(), applied, keep_freed_memory())
"""


@pytest.mark.skipif(not sys.platform.startswith("linux") or platform.libc_ver()[0] != "glibc", reason="glibc only")
def test_freed_buffers_are_reused_without_page_faults():
    out = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, check=True).stdout.split()
    before, after, applied, again = int(out[0]), int(out[1]), out[2], out[3]
    assert applied == "True" and again == "True"
    assert before > 20 * 1000  # ~4096 pages touched afresh each time
    assert after < before / 20


def test_opt_out(monkeypatch):
    from r1kit import allocator

    monkeypatch.setattr(allocator, "_applied", None)
    monkeypatch.setenv("R1KIT_KEEP_FREED_MEMORY", "0")
    assert allocator.keep_freed_memory() is False
    monkeypatch.setattr(allocator, "_applied", None)  # the next caller decides again
