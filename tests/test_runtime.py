"""``vss.runtime.tune_host_allocator``: glibc's mmap and trim thresholds set (``VSS_MALLOC=default`` keeps glibc's
defaults), freed tensor memory reused without page faults, and every command line sets it up first.

The function is cached and changes the process's malloc, so its effects are checked in fresh interpreters."""

from __future__ import annotations

import importlib
import json
import os
import platform
import subprocess
import sys
import textwrap

import pytest

pytestmark = pytest.mark.skipif(
    not sys.platform.startswith("linux") or platform.libc_ver()[0] != "glibc", reason="glibc malloc only"
)

HEAP_CHECK = """
    import ctypes, json
    from vss.runtime import tune_host_allocator

    tuned = tune_host_allocator()
    libc = ctypes.CDLL("libc.so.6")
    libc.malloc.restype, libc.malloc.argtypes = ctypes.c_void_p, [ctypes.c_size_t]
    libc.free.argtypes = [ctypes.c_void_p]
    libc.sbrk.restype, libc.sbrk.argtypes = ctypes.c_void_p, [ctypes.c_ssize_t]

    def heap():
        with open("/proc/self/maps") as f:
            start, end = next(line for line in f if "[heap]" in line).split()[0].split("-")
        return int(start, 16), int(end, 16)

    size = 8 * 2**20
    blocks = [libc.malloc(size) for _ in range(8)]  # 64 MiB, each block above glibc's default mmap threshold
    for p in blocks:
        ctypes.memset(p, 1, size)
    start, end = heap()
    top = libc.sbrk(0)
    for p in blocks:
        libc.free(p)
    print(json.dumps({
        "tuned": tuned,
        "cached": tune_host_allocator(),
        "on_heap": [start <= p and p + size <= end for p in blocks],
        "trimmed": libc.sbrk(0) != top,
    }))
"""

PAGE_FAULTS = """
    import json, resource, sys
    import torch
    from vss.runtime import tune_host_allocator

    tuned = tune_host_allocator() if sys.argv[1] == "tune" else None

    def faults():
        return resource.getrusage(resource.RUSAGE_SELF).ru_minflt

    def growing(i):  # 4 MiB + i * 64 KiB: each tensor larger than any before it
        t = torch.empty(2**20 + i * 2**14).fill_(1)
        del t

    def repeated(i):  # a step's maps: 4 x 8 MiB live at once, then freed
        ts = [torch.empty(2 * 2**20).fill_(1) for _ in range(4)]
        del ts

    per_iteration = {}
    for step in (growing, repeated):
        for i in range(10):  # warm-up: the heap settles
            step(i)
        before = faults()
        for i in range(10, 30):
            step(i)
        per_iteration[step.__name__] = (faults() - before) / 20
    print(json.dumps({"tuned": tuned, **per_iteration}))
"""


def run_child(code: str, *args: str, malloc: str | None = None) -> dict:
    """Run ``code`` in a fresh interpreter (``VSS_MALLOC=malloc`` if given) and parse the JSON line it prints."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("VSS_")}
    env.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    if malloc is not None:
        env["VSS_MALLOC"] = malloc
    cmd = [sys.executable, "-c", textwrap.dedent(code), *args]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("malloc", [None, "default", "DEFAULT"])
def test_tune_host_allocator_sets_glibcs_thresholds_unless_vss_malloc_is_default(malloc: str | None) -> None:
    """Tuned: 8 MiB blocks come from the heap (not fresh mmaps) and freeing 64 MiB at its top does not trim it."""
    got = run_child(HEAP_CHECK, malloc=malloc)
    tuned = malloc is None
    assert got["tuned"] is tuned and got["cached"] is tuned
    if tuned:
        assert all(got["on_heap"]) and not got["trimmed"], got
    else:  # glibc's defaults: blocks above 128 KiB are mmapped
        assert not any(got["on_heap"]), got


@pytest.mark.parametrize("malloc", [None, "default"])
def test_tuned_allocator_reuses_freed_tensor_memory_without_page_faults(malloc: str | None) -> None:
    """Measured: tuned 0-32 minor faults per iteration (the growing tensor's new 64 KiB); glibc's defaults
    page-fault each new larger tensor afresh (~1,300: all its pages), and a repeated 4 x 8 MiB step either 0 or
    ~8,000 (the heap is trimmed, or not, depending on its history), so only the growing pattern's default count is
    bounded."""
    got = run_child(PAGE_FAULTS, "tune", malloc=malloc)
    if malloc is None:
        assert got["tuned"] is True and got["growing"] < 100 and got["repeated"] < 100, got
    else:
        assert got["tuned"] is False and got["growing"] > 1000, got


@pytest.mark.parametrize("program", ["train", "eval", "predict", "bench"])
def test_every_command_line_tunes_the_allocator_before_checking_its_arguments(
    program: str, monkeypatch, capsys
) -> None:
    module = importlib.import_module(f"vss.{program}")
    calls: list[str] = []
    monkeypatch.setattr(module, "tune_host_allocator", lambda: calls.append(program) or True)
    monkeypatch.setattr(sys, "argv", [f"vss.{program}", "nosuchkey=1"])
    with pytest.raises(SystemExit) as exit_info:  # the command-line check fails fast, before Hydra
        module.main()
    assert exit_info.value.code == 2
    assert "nosuchkey is not a key" in capsys.readouterr().err
    assert calls == [program]
