"""CPU threads that follow the cores actually free.

PyTorch runs an operation on one OpenMP thread per core, and every operation ends at a barrier where the
threads wait for each other. When another process keeps a core busy, the operating system takes turns between
it and one of our threads, and at each barrier the other thread waits out the turn: a small model, whose
operations take microseconds, ran 3-6 times slower with one busy core on a 2-core machine
(bench/contention.py). One thread fewer than the busy cores (a thread per free core) does not wait on anyone.

`adapt()` keeps the thread count at the number of free cores: every `INTERVAL` seconds it reads how much CPU
time the other processes took since the last look (/proc/stat less this process's own /proc/self/stat) and,
when they kept at least `BUSY` of a core busy, runs on one thread fewer per busy core; when they leave, it
goes back. The loops that compute call it once per step (`training.fit`, `Engine.generate`): most calls only
read the clock. A thread count is per thread in OpenMP, so each thread that computes (the scheduler's, say)
adapts its own.

On the CPUs this was measured on, results are bit-identical whatever the thread count (tests/test_threads.py
checks it on the machine it runs on), so adapting costs no reproducibility. `configure_torch(threads=N)` with
N > 0 (`--threads N`) fixes the count and turns adapting off; so does the environment variable
`LLMLAB_THREADS=N`. Where /proc is missing (macOS, Windows) nothing changes.
"""

from __future__ import annotations

import os
import threading
import time

import torch

from llmlab.errors import LLMLabError

INTERVAL = 1.0
"""seconds between two looks at the other processes' CPU time"""
FIRST_INTERVAL = 0.25
"""seconds between the first two looks: a short job (an evaluation) adapts early"""
BUSY = 0.6
"""cores' worth of the other processes' CPU time (averaged over an interval) that counts as one busy core"""

_fixed: int | None = None
_read_environment = False
_local = threading.local()


def fix(threads: int) -> None:
    """Run on `threads` threads from now on (in this thread), without adapting."""
    global _fixed
    _fixed = threads
    torch.set_num_threads(threads)


def most() -> int:
    """The most threads to use: one per core this process may run on."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # (not Linux)
        return os.cpu_count() or 1


def _sample() -> tuple[float, int, int] | None:
    """(time, jiffies all cores were busy, jiffies this process was busy), or None without /proc."""
    try:
        with open("/proc/stat", "rb") as f:
            cpu = f.readline().split()
        with open("/proc/self/stat", "rb") as f:
            own = f.read().rsplit(b")", 1)[1].split()
    except OSError:
        return None
    values = [int(v) for v in cpu[1:9]]  # user nice system idle iowait irq softirq steal
    busy = sum(values) - values[3] - values[4]
    return time.monotonic(), busy, int(own[11]) + int(own[12])  # utime + stime


def busy_cores(before: tuple[float, int, int], after: tuple[float, int, int]) -> float:
    """Cores' worth of CPU time that other processes used between two samples."""
    seconds = after[0] - before[0]
    if seconds <= 0:
        return 0.0
    others = (after[1] - before[1]) - (after[2] - before[2])
    return max(others, 0) / os.sysconf("SC_CLK_TCK") / seconds


def threads_for(busy: float, cores: int) -> int:
    """One thread per core that the other processes leave free, at least one."""
    return max(1, min(cores, cores - int(busy / BUSY)))


def adapt() -> None:
    """Set this thread's torch thread count to the free cores (see the module docstring); cheap between looks."""
    if not _read_environment:
        from_environment()
    if _fixed is not None:
        return
    now = time.monotonic()
    last = getattr(_local, "sample", None)
    decided = getattr(_local, "decided", False)
    if last is not None and now - last[0] < (INTERVAL if decided else FIRST_INTERVAL):
        return
    sample = _sample()
    if sample is None:
        _local.sample = (now, 0, 0)  # no /proc: look again (cheaply) an interval later
        return
    _local.sample = sample
    if last is None or last[1] == 0:
        return
    _local.decided = True
    want = threads_for(busy_cores(last, sample), most())
    if want != torch.get_num_threads():
        torch.set_num_threads(want)


def from_environment() -> None:
    """Fix the count to LLMLAB_THREADS when it is set (read once; `configure_torch` and `adapt` call this)."""
    global _read_environment
    _read_environment = True
    value = os.environ.get("LLMLAB_THREADS", "")
    if value.strip():
        try:
            threads = int(value)
        except ValueError:
            threads = 0
        if threads < 1:
            raise LLMLabError(f"LLMLAB_THREADS must be a positive number of threads, got {value!r}")
        fix(threads)
