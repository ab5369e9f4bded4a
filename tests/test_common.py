"""nanochat/common.py helpers that are not covered through the scripts' tests."""

import subprocess
import sys

import pytest

# Allocate and free a 256 MiB tensor, then allocate 128 MiB (smaller, so it fits in the freed
# block even if a small object has since been carved from its front); report the minor page
# faults of the second allocation + first touch. A subprocess: mallopt is process-wide.
PROBE = """
import resource, sys, torch
from nanochat.common import keep_freed_memory
applied = keep_freed_memory("cpu") if sys.argv[1] == "on" else False
t = torch.ones(64 * 2**20); del t
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
t = torch.ones(32 * 2**20)
print(applied, resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc mallopt is Linux-only")
def test_keep_freed_memory_reuses_big_blocks_without_page_faults():
    results = {}
    for mode in ("off", "on"):
        r = subprocess.run([sys.executable, "-c", PROBE, mode], capture_output=True, text=True, timeout=120)
        assert r.returncode == 0, r.stderr
        applied, faults = r.stdout.split()
        results[mode] = (applied == "True", int(faults))
    assert results["on"][0] is True
    pages = 128 * 2**20 // 4096
    assert results["off"][1] > pages // 2   # default glibc: the block was unmapped, every page faults again
    assert results["on"][1] < pages // 20   # kept in the heap: reused without faulting


def test_keep_freed_memory_is_a_no_op_off_cpu():
    from nanochat.common import keep_freed_memory
    assert keep_freed_memory("cuda") is False
