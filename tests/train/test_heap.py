"""glibc heap trimming (train/heap.py): freed holes inside the heap go back to the system."""

import subprocess
import sys
import textwrap

import pytest

from slmtune.train import heap

pytestmark = pytest.mark.skipif(not heap.available(), reason="needs glibc's malloc_trim (Linux)")

CHILD = textwrap.dedent("""
    from pathlib import Path
    from slmtune.train import heap

    def rss_mb():
        line = next(x for x in Path("/proc/self/status").read_text().splitlines() if x.startswith("RssAnon:"))
        return int(line.split()[1]) / 1024

    blocks = [bytearray(1 << 20) for _ in range(300)]  # 300 MB on the heap (touched: bytearray zero-fills)
    pin = bytearray(1 << 20)  # allocated last, above the others: the heap's top cannot shrink past it
    del blocks  # 300 MB of freed holes below `pin`, still resident
    before = rss_mb()
    released = heap.trim()
    print(before, rss_mb(), released)
""")


def test_trim_returns_freed_holes_inside_the_heap():
    env = {"MALLOC_MMAP_THRESHOLD_": str(64 << 20), "PATH": "/usr/bin:/bin"}  # 1 MB blocks from the heap, not mmap
    out = subprocess.run([sys.executable, "-c", CHILD], capture_output=True, text=True, env=env, check=True)
    before, after, released = out.stdout.split()
    assert released == "True"
    assert float(before) - float(after) > 250, out.stdout
