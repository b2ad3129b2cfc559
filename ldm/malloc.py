"""Give freed memory back to the kernel at once: the low-memory preset's allocator settings (glibc only).

glibc serves a large allocation with its own mapping and unmaps it when it is freed, but it raises that
size threshold to the largest block freed so far (up to 32 MiB). After the first training step nearly
every activation tensor of a textual inversion step is below the raised threshold, so it comes from the
heap, and the heap keeps what is freed: on LDM 1.4B (256 px, fp16 frozen weights) 0.6 GB stayed resident
between steps. `return_freed_memory` fixes the threshold at 512 KiB.

The price is a page fault for every 4 KiB of every freed block above the threshold that is used again.
`HUGE_PAGES`, glibc's tunable that backs its memory with transparent huge pages, takes much of it back
for the blocks of 2 MiB and more. Measured on LDM 1.4B with `--lean` (256 px, 2 threads, AMD EPYC,
small_gemm on; step peak / median step, two runs where given): glibc's default 3.78 GB / 7.7 s; fixed at
1 MiB 3.65 GB / 9.4 s, with huge pages 3.65-3.66 GB / 8.9-9.3 s; at 512 KiB 3.58 GB / 10.4 s, with huge
pages 3.59 GB / 8.4-9.6 s (kept); at 128 KiB 3.56 GB / 11.6 s, with huge pages 3.56 GB / 9.7-10.7 s.
glibc reads tunables only when a process starts (the `GLIBC_TUNABLES` environment variable), so
`main.py --lean` restarts itself once with it (`restart_with_huge_pages`) and the benchmark starts its
`lean` child with it; a Python caller of `ldm.training.train(lean=True)` sets the variable itself.

These are settings of the whole process, so only entry points use them: `ldm.training.prepare` with
`lean`, `main.py --lean`, and the benchmark's `lean` preset.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import platform
import sys
from collections.abc import Mapping

M_TRIM_THRESHOLD = -1  # glibc's mallopt parameters (malloc.h)
M_MMAP_THRESHOLD = -3
THRESHOLD = 512 * 1024


def return_freed_memory(threshold: int = THRESHOLD) -> bool:
    """Fix glibc's mmap and trim thresholds at `threshold` bytes; False (and nothing changed) where the C
    library is not glibc."""
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name)
        mallopt = libc.mallopt
    except (OSError, AttributeError, TypeError):
        return False
    return bool(mallopt(M_MMAP_THRESHOLD, threshold)) and bool(mallopt(M_TRIM_THRESHOLD, threshold))


#: glibc's tunable for transparent huge pages under malloc (madvise mode; glibc 2.35 and later).
HUGE_PAGES = "glibc.malloc.hugetlb=1"


def with_huge_pages(env: Mapping[str, str]) -> dict[str, str] | None:
    """`env` with `HUGE_PAGES` added to its GLIBC_TUNABLES, or None where it holds a hugetlb setting already
    or the C library is not glibc on Linux."""
    if not sys.platform.startswith("linux") or platform.libc_ver()[0] != "glibc":
        return None
    tunables = env.get("GLIBC_TUNABLES", "")
    if "glibc.malloc.hugetlb=" in tunables:
        return None
    return {**env, "GLIBC_TUNABLES": f"{tunables}:{HUGE_PAGES}" if tunables else HUGE_PAGES}


def restart_with_huge_pages() -> None:
    """Replace this process by itself, same interpreter and arguments, with `HUGE_PAGES` set; returns
    (and does nothing) where `with_huge_pages` has nothing to add, so the restarted process goes on."""
    env = with_huge_pages(os.environ)
    if env is not None:
        os.execve(sys.executable, sys.orig_argv, env)
