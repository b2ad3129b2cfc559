"""The low-memory preset's allocator: tcmalloc where the system has it, else glibc returning freed memory.

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
glibc reads tunables only when a process starts (the `GLIBC_TUNABLES` environment variable).

Where the system has tcmalloc (gperftools; Debian's `libtcmalloc-minimal4`), a lean process runs on it
instead (`LD_PRELOAD`): it keeps freed blocks by size for reuse and returns them gradually, which here
gave glibc's 512 KiB memory without its page faults. LDM 1.4B `--lean`, same session, two runs each:
tcmalloc 3.59 GB / 8.88-8.90 s with under 1,000 faults per step; glibc at 512 KiB with huge pages
3.59 GB / 10.19-10.47 s with 363-371 thousand. (jemalloc: 3.60 GB with 230-240 thousand faults, 9.7-9.9 s;
mimalloc: 3.82 GB.) Both choices are made before Python starts, so `main.py --lean` restarts itself once
with `lean_environment` (`restart_lean`) and the benchmark starts its `lean` child with it; a Python
caller of `ldm.training.train(lean=True)` starts its interpreter with that environment itself.

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
from pathlib import Path

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


#: tcmalloc's library names, the smaller (no heap profiler) first.
TCMALLOC = ("tcmalloc_minimal", "tcmalloc")


def find_tcmalloc() -> str | None:
    """The file name of a tcmalloc library that the dynamic loader finds, or None."""
    return next((found for name in TCMALLOC if (found := ctypes.util.find_library(name))), None)


def lean_environment(env: Mapping[str, str], tcmalloc: str | None) -> dict[str, str] | None:
    """`env` for a lean process: with `tcmalloc` (a library name) preloaded, else with `HUGE_PAGES`; None
    where `env` already preloads an allocator of the user's (a library whose name has "malloc") or holds a
    hugetlb setting, so a restarted process does not restart again."""
    preload = env.get("LD_PRELOAD", "")
    if "malloc" in preload:
        return None
    if tcmalloc is None or not sys.platform.startswith("linux"):
        return with_huge_pages(env)
    return {**env, "LD_PRELOAD": f"{tcmalloc}:{preload}" if preload else tcmalloc}


def allocator() -> str:
    """The allocator this process runs on: "tcmalloc" where it is loaded, else "glibc" or "other"."""
    try:
        if "tcmalloc" in Path("/proc/self/maps").read_text():
            return "tcmalloc"
    except OSError:
        pass
    return "glibc" if platform.libc_ver()[0] == "glibc" else "other"


def restart_lean() -> None:
    """Replace this process by itself, same interpreter and arguments, in `lean_environment`; returns (and
    does nothing) where that has nothing to add, so the restarted process goes on."""
    env = lean_environment(os.environ, find_tcmalloc())
    if env is not None:
        os.execve(sys.executable, sys.orig_argv, env)
