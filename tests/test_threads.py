"""CPU threads that follow the free cores (llmlab.threads): the arithmetic, the adapting itself beside a busy
process, and that the thread count changes no result."""

import hashlib
import subprocess
import sys
import time
from contextlib import nullcontext

import pytest
import torch

from llmlab import threads
from llmlab.model import GPT, GPTConfig
from llmlab.optim import OptimConfig, build_optimizers
from llmlab.training import train_step


@pytest.fixture
def restore_threads(monkeypatch):
    before = torch.get_num_threads()
    monkeypatch.setattr(threads, "_fixed", None)
    monkeypatch.setattr(threads, "_read_environment", True)
    monkeypatch.setattr(threads, "_local", type(threads._local)())
    yield
    torch.set_num_threads(before)


def test_one_thread_per_free_core():
    assert [threads.threads_for(busy, 4) for busy in (0.0, 0.5, 0.7, 1.3, 2.0, 9.0)] == [4, 4, 3, 2, 1, 1]
    assert threads.threads_for(0.0, 1) == 1


def test_a_dropped_thread_comes_back_only_when_the_core_is_well_free():
    # beside a busy process, a training step's parts take its turns: it shows less than BUSY, not nothing
    between = (threads.BACK + threads.BUSY) / 2
    assert threads.threads_for(between, 2, current=1) == 1
    assert threads.threads_for(between, 2, current=2) == 2
    assert threads.threads_for(threads.BACK / 2, 2, current=1) == 2
    assert threads.threads_for(threads.BUSY + 0.1, 2, current=2) == 1


def test_busy_cores_counts_the_other_processes_only(monkeypatch):
    monkeypatch.setattr(threads.os, "sysconf", lambda name: 100)  # jiffies per second
    # over 2 s: all cores together busy for 300 jiffies, 100 of them ours -> others kept one core busy
    assert threads.busy_cores((10.0, 1000, 50), (12.0, 1300, 150)) == pytest.approx(1.0)
    assert threads.busy_cores((10.0, 1000, 50), (12.0, 1100, 150)) == 0.0  # (rounding can make it negative)


def _other_processes_busy(seconds: float = 0.5) -> float:
    a = threads._sample()
    time.sleep(seconds)
    return threads.busy_cores(a, threads._sample())


@pytest.mark.skipif(threads._sample() is None or threads.most() < 2, reason="needs /proc and two cores")
def test_adapt_drops_a_thread_beside_a_busy_process_and_takes_it_back(restore_threads, monkeypatch):
    if _other_processes_busy() >= threads.BUSY / 2:
        pytest.skip("the machine is already busy")
    monkeypatch.setattr(threads, "INTERVAL", 0.5)
    torch.set_num_threads(threads.most())
    hog = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        threads.adapt()
        time.sleep(1.0)
        threads.adapt()
        assert torch.get_num_threads() == threads.most() - 1
    finally:
        hog.kill()
        hog.wait()
    time.sleep(1.0)
    threads.adapt()
    assert torch.get_num_threads() == threads.most()


def test_a_fixed_count_is_kept_whatever_the_load(restore_threads, monkeypatch):
    threads.fix(1)
    monkeypatch.setattr(threads, "_sample", lambda: pytest.fail("a fixed count must not look at the load"))
    threads.adapt()
    assert torch.get_num_threads() == 1


def _train_digest(n_threads: int, parts: int = 1) -> str:
    threads.fix(n_threads)  # also the threads that compute a step's parts, and Muon's matrices
    torch.manual_seed(0)
    cfg = GPTConfig(vocab_size=512, n_layer=2, d_model=64, n_head=2, n_kv_head=2, context_len=64, qk_norm=True)
    model = GPT(cfg)
    model.init_weights(seed=0)
    optimizers = build_optimizers(model, OptimConfig())
    g = torch.Generator().manual_seed(1)
    for _ in range(3):
        ids = torch.randint(0, cfg.vocab_size, (8, cfg.context_len + 1), generator=g)
        train_step(model, optimizers, [(ids[:, :-1], ids[:, 1:])], 1.0, nullcontext(), parts=parts)
    h = hashlib.sha256()
    for p in model.parameters():
        h.update(p.detach().numpy().tobytes())
    return h.hexdigest()


@pytest.mark.skipif(threads.most() < 2, reason="needs two cores")
def test_training_gives_the_same_bits_on_one_thread_as_on_all(restore_threads):
    # what makes adapting free: a run that changed its thread count midway ends with the same weights
    assert _train_digest(1) == _train_digest(threads.most())


def test_a_step_in_parts_gives_the_same_bits_on_any_number_of_threads(restore_threads):
    # the parts' gradients are added in their order, whichever thread finishes first
    digests = {_train_digest(n, parts=4) for n in (1, 2, 4)}
    assert len(digests) == 1
    assert digests != {_train_digest(1, parts=1)}  # (the count of parts, not of threads, changes the sums)


def test_the_environment_fixes_the_count_or_says_what_is_wrong(restore_threads, monkeypatch):
    from llmlab.errors import LLMLabError

    for bad in ("x", "0", "-2"):
        monkeypatch.setenv("LLMLAB_THREADS", bad)
        with pytest.raises(LLMLabError, match="LLMLAB_THREADS must be a positive number"):
            threads.from_environment()
    monkeypatch.setenv("LLMLAB_THREADS", "1")
    threads.from_environment()
    assert threads._fixed == 1 and torch.get_num_threads() == 1
