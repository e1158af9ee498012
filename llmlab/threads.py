"""CPU threads that follow the cores actually free, and the threads that compute a training step's parts.

PyTorch runs an operation on one OpenMP thread per core, and every operation ends at a barrier where the
threads wait for each other. When another process keeps a core busy, the operating system takes turns between
it and one of our threads, and at each barrier the other thread waits out the turn: a small model, whose
operations take microseconds, ran 3-6 times slower with one busy core on a 2-core machine
(bench/contention.py). Two remedies, one for each kind of work:

- A training step on CPU cuts each micro-batch into `parts()` parts, two per core, and runs each part's
  forward and backward on a thread of `pool` with one torch thread (`llmlab.training.step_on_device`; Muon
  orthogonalises its matrices on the same threads). The threads meet once per micro-batch, not at every
  operation, and beside a busy process the operating system shares the cores among all runnable threads, so
  the step loses a share of the machine instead of a wait at every barrier.
- Evaluation and decoding run each operation on one thread per core that the other processes leave free.
  `adapt()` keeps that count: every `INTERVAL` seconds it reads how much CPU time the other processes took
  since the last look (/proc/stat less this process's own /proc/self/stat) and, when they kept at least `BUSY`
  of a core busy, runs on one thread fewer per busy core; when they leave (less than `BACK` of a core), it
  goes back. The loops that compute call it once per step (`training.fit`, `Engine.generate`): most calls
  only read the clock. A thread count is per thread in OpenMP, so each thread that computes (the scheduler's,
  say) adapts its own.

On the CPUs this was measured on, results are bit-identical whatever the thread count (tests/test_threads.py
checks it on the machine it runs on), so adapting costs no reproducibility. The number of parts changes the
order of a sum (the gradients are added part by part, in the parts' order whichever thread finishes first), so
it follows the cores this process may use, not the load. `configure_torch(threads=N)` with N > 0
(`--threads N`) fixes the count, turns adapting off and caps the pool at N threads; so does the environment
variable `LLMLAB_THREADS=N`. Where /proc is missing (macOS, Windows) the count does not adapt.
"""

from __future__ import annotations

import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import torch

from llmlab.errors import LLMLabError

INTERVAL = 1.0
"""seconds between two looks at the other processes' CPU time"""
FIRST_INTERVAL = 0.25
"""seconds between the first two looks: a short job (an evaluation) adapts early"""
BUSY = 0.6
"""cores' worth of the other processes' CPU time (averaged over an interval) that counts as one busy core"""
BACK = 0.25
"""cores' worth of the other processes' CPU time under which a core counts as free again (`threads_for`)"""

PARTS_PER_CORE = 2
"""parts a CPU training step cuts each micro-batch into, per core (more parts than cores: beside a busy process
the operating system gives each runnable thread its turn, so more threads keep more of the machine)"""

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


def parts(requested: int = 0) -> int:
    """How many parts a CPU training step cuts a micro-batch into: `requested`, or (0) two per usable core."""
    if requested < 0:
        raise LLMLabError(f"the number of parts of a micro-batch must be >= 0 (got {requested})")
    return requested or PARTS_PER_CORE * most()


_pools: dict[int, ThreadPoolExecutor] = {}


def _one_thread() -> None:
    torch.set_num_threads(1)
    torch.set_flush_denormal(True)  # (per thread, like the count: as configure_torch does for the main thread)


def pool(n: int) -> ThreadPoolExecutor:
    """Threads to compute n parts at once, each on one torch thread: a thread per part, or the count fixed by
    `fix` (--threads, LLMLAB_THREADS) when that is fewer. Made once per size and kept."""
    if not _read_environment:
        from_environment()
    workers = max(1, min(n, _fixed or n))
    if workers not in _pools:
        _pools[workers] = ThreadPoolExecutor(workers, thread_name_prefix="llmlab-part", initializer=_one_thread)
    return _pools[workers]


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


def threads_for(busy: float, cores: int, current: int | None = None) -> int:
    """One thread per core that the other processes leave free, at least one. From `current` threads the count
    goes up only for cores the others keep less than `BACK` busy: the parts of a training step take a busy
    process's turns away from it, and its CPU time seen then is less than it would use beside fewer threads."""
    want = max(1, min(cores, cores - int(busy / BUSY)))
    if current is not None and want > current:
        want = max(current, min(want, cores - int(busy / BACK)))
    return want


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
    want = threads_for(busy_cores(last, sample), most(), torch.get_num_threads())
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
