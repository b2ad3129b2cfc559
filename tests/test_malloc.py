"""ldm/malloc.py: with the fixed threshold, memory freed after a step goes back to the kernel (glibc)."""

import json
import os
import subprocess
import sys

import pytest
from conftest import REPO

PROBE = """
import json, sys
from pathlib import Path
import torch
from ldm.malloc import return_freed_memory

def rss_mb():
    line = next(l for l in Path("/proc/self/status").read_text().splitlines() if l.startswith("VmRSS:"))
    return int(line.split()[1]) / 1024

fixed = return_freed_memory() if sys.argv[1] == "fixed" else None
big = torch.ones(4 * 2**20)
del big  # a freed 16 MiB block: glibc raises its dynamic mmap threshold to it
before = rss_mb()
blocks, kept = [], []
for _ in range(200):  # 200 x 1 MiB freed after the "step", with small tensors that outlive it between them
    blocks.append(torch.ones(2**18))
    kept.append(torch.ones(2**10))
during = rss_mb()
del blocks
print(json.dumps({"fixed": fixed, "held": during - before, "kept": rss_mb() - before}))
"""


def probe(mode: str) -> dict:
    out = subprocess.run([sys.executable, "-c", PROBE, mode], cwd=REPO, capture_output=True, text=True,
                         check=True)
    return json.loads(out.stdout)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc and /proc/self/status")
def test_freed_activations_leave_the_process_only_with_the_fixed_threshold():
    default, fixed = probe("default"), probe("fixed")
    assert default["held"] > 150 and fixed["held"] > 150  # the blocks were resident while alive
    assert default["kept"] > 150  # glibc's heap keeps them after the free (the raised threshold)
    assert fixed["fixed"] is True and fixed["kept"] < 20  # returned to the kernel


def test_the_huge_pages_tunable_is_added_once():
    from ldm.malloc import HUGE_PAGES, with_huge_pages

    assert with_huge_pages({"PATH": "/bin"}) == {"PATH": "/bin", "GLIBC_TUNABLES": HUGE_PAGES}
    other = {"GLIBC_TUNABLES": "glibc.malloc.arena_max=2"}
    assert with_huge_pages(other)["GLIBC_TUNABLES"] == f"glibc.malloc.arena_max=2:{HUGE_PAGES}"
    assert with_huge_pages({"GLIBC_TUNABLES": "glibc.malloc.hugetlb=0"}) is None  # the user's choice stays


def test_the_lean_environment_preloads_tcmalloc_else_adds_huge_pages():
    from ldm.malloc import HUGE_PAGES, lean_environment

    tc = "libtcmalloc_minimal.so.4"
    assert lean_environment({"PATH": "/bin"}, tc) == {"PATH": "/bin", "LD_PRELOAD": tc}
    assert lean_environment({"LD_PRELOAD": "libfoo.so"}, tc)["LD_PRELOAD"] == f"{tc}:libfoo.so"
    assert lean_environment({"PATH": "/bin"}, None) == {"PATH": "/bin", "GLIBC_TUNABLES": HUGE_PAGES}
    assert lean_environment({"LD_PRELOAD": tc}, tc) is None  # the restarted process goes on
    assert lean_environment({"LD_PRELOAD": "/opt/libjemalloc.so.2"}, tc) is None  # the user's allocator stays
    assert lean_environment({"GLIBC_TUNABLES": HUGE_PAGES}, None) is None


RESTART = ("import os, sys; from ldm.malloc import allocator, restart_lean; print('start', flush=True); "
           "restart_lean(); print(os.environ.get('GLIBC_TUNABLES', '-'), os.environ.get('LD_PRELOAD', '-'), "
           "allocator())")


def restarted(env: dict) -> list[str]:
    out = subprocess.run([sys.executable, "-c", RESTART], cwd=REPO, env=env, capture_output=True, text=True,
                         check=True)
    return out.stdout.split()


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc tunables and LD_PRELOAD")
def test_a_process_restarts_itself_once_in_the_lean_environment():
    """The restarted process runs the same command again, finds its allocator set and goes on; where the
    system has tcmalloc it runs on it, else on glibc with huge pages."""
    from ldm.malloc import find_tcmalloc

    env = {k: v for k, v in os.environ.items() if k not in ("GLIBC_TUNABLES", "LD_PRELOAD")}
    tc = find_tcmalloc()
    if tc is None:
        assert restarted(env) == ["start", "start", "glibc.malloc.hugetlb=1", "-", "glibc"]
    else:
        assert restarted(env) == ["start", "start", "-", tc, "tcmalloc"]


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc tunables")
def test_without_tcmalloc_the_restart_sets_huge_pages(monkeypatch):
    """The glibc fallback, whatever this machine has installed: find_tcmalloc finds nothing."""
    from ldm import malloc

    calls = []
    monkeypatch.setattr(malloc, "find_tcmalloc", lambda: None)
    monkeypatch.setattr(malloc.os, "execve", lambda exe, argv, env: calls.append((exe, argv, env)))
    monkeypatch.delenv("GLIBC_TUNABLES", raising=False)
    monkeypatch.delenv("LD_PRELOAD", raising=False)
    malloc.restart_lean()
    [(exe, argv, env)] = calls
    assert exe == sys.executable and argv == sys.orig_argv and env["GLIBC_TUNABLES"] == malloc.HUGE_PAGES
    assert "LD_PRELOAD" not in env


def test_main_lean_restarts_only_from_its_own_command_line(monkeypatch):
    import main

    restarts = []
    monkeypatch.setattr(main, "restart_lean", lambda: restarts.append(1))
    monkeypatch.setattr(main, "prepare", lambda opts: (_ for _ in ()).throw(FileNotFoundError("stop here")))
    assert main.main(["--lean", "--base", "x.yaml"]) == 1 and not restarts  # an in-process call: no restart
    monkeypatch.setattr(sys, "argv", ["main.py", "--lean", "--base", "x.yaml"])
    assert main.main() == 1 and restarts == [1]
    monkeypatch.setattr(sys, "argv", ["main.py", "--base", "x.yaml"])
    assert main.main() == 1 and restarts == [1]
