"""Many processes against one: DDP and FSDP2 under torchrun (gloo on CPU) reproduce the single-process run,
checkpoints move between process counts, only rank 0 writes, and failures are clean. Marked `dist`."""

import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from llmlab import checkpoint
from llmlab.errors import LLMLabError

pytestmark = pytest.mark.dist

HERE = Path(__file__).resolve().parent
STEPS = 20


def _args(cfg, out_dir: Path, batch_size: int, **extra) -> list[str]:
    flags = dict(corpus=cfg.pretrain.corpus, tokenizer=cfg.pretrain.tokenizer, out_dir=out_dir, max_steps=STEPS,
                 batch_size=batch_size, save_every=10, eval_every=10, threads=1)
    flags.update(extra)
    return ["pretrain", "--preset", "tiny"] + [a for k, v in flags.items() for a in (f"--{k}", str(v))]


def _launch(nproc: int, args: list[str], log: Path, watch: Path, wait: bool = True):
    """`torchrun --nproc_per_node=nproc` of the launcher (nproc 0: a plain single process, no torchrun)."""
    env = {**os.environ, "LLMLAB_TEST_LOG": str(log), "LLMLAB_TEST_WATCH": str(watch), "PYTHONUNBUFFERED": "1",
           "OMP_NUM_THREADS": "1"}
    if nproc == 0:
        cmd = [sys.executable, str(HERE / "dist_launcher.py"), *args]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
               str(HERE / "dist_launcher.py"), *args]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    if not wait:
        return proc
    out, _ = proc.communicate(timeout=600)
    assert proc.returncode == 0, out[-3000:]
    return out


def _losses(out_dir: Path) -> list[float]:
    rows = [json.loads(line) for line in (out_dir / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in rows if "loss" in r]


def _val(out_dir: Path) -> list[float]:
    rows = [json.loads(line) for line in (out_dir / "metrics.jsonl").read_text().splitlines()]
    return [r["val_bpb"] for r in rows if "val_bpb" in r]


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """(tiny preset with its world and tokenizer built, None): what pretraining needs, nothing more."""
    from llmlab import presets
    from llmlab.stages import tokenizer, world

    cfg = presets.tiny(str(tmp_path_factory.mktemp("dist") / "tiny"))
    world.main(cfg.world)
    tokenizer.main(cfg.tokenizer)
    return cfg, None


@pytest.fixture(scope="module")
def single(tiny_run, tmp_path_factory):
    """The single-process run with the global batch of 2 processes x 4 rows."""
    cfg, _ = tiny_run
    tmp = tmp_path_factory.mktemp("single")
    _launch(0, _args(cfg, tmp / "run", 8), tmp / "log", tmp)
    return tmp / "run"


@pytest.mark.parametrize("parallel", ["ddp", "fsdp"])
def test_two_processes_reproduce_one_and_only_rank_0_writes(tiny_run, single, tmp_path, parallel):
    cfg, _ = tiny_run
    out = tmp_path / "run"
    _launch(2, _args(cfg, out, 4, parallel=parallel), tmp_path / "log", tmp_path)
    ref, got = _losses(single), _losses(out)
    assert len(got) == len(ref) == STEPS
    assert max(abs(a - b) for a, b in zip(ref, got)) < 1e-5, (ref, got)
    assert max(abs(a - b) for a, b in zip(_val(single), _val(out))) < 1e-5
    # the checkpoint is the single-process format: whole tensors, close to the single run's (Adam with eps
    # 1e-10 turns rounding noise in near-zero embedding gradients into full-size steps: a few entries move
    # by up to ~1e-3, so the comparison is on the tensor as a whole)
    a = load_file(str(checkpoint.resolve(single) / "model.safetensors"))
    b = load_file(str(checkpoint.resolve(out) / "model.safetensors"))
    assert a.keys() == b.keys()
    for name in a:
        assert a[name].shape == b[name].shape
        assert (b[name] - a[name]).norm() <= 1e-3 * a[name].norm(), name
    # rank 0 wrote the run; rank 1 wrote nothing below the run's directory
    assert (tmp_path / "log.writes.0").read_text().count(str(out)) > 0
    assert (tmp_path / "log.writes.1").read_text() == ""


def test_two_process_checkpoint_continues_on_one_and_on_two(tiny_run, tmp_path):
    cfg, _ = tiny_run
    full = tmp_path / "full"
    _launch(2, _args(cfg, full, 4, parallel="fsdp"), tmp_path / "log", tmp_path)
    ref = _losses(full)
    for name, nproc, batch, parallel in (("on1", 0, 8, "ddp"), ("on2", 2, 4, "fsdp"), ("on2ddp", 2, 4, "ddp")):
        out = tmp_path / name
        shutil.copytree(full, out)
        (out / "latest").write_text("step-000010\n")  # back to the checkpoint of step 10
        shutil.rmtree(out / "step-000020")
        _launch(nproc, _args(cfg, out, batch, parallel=parallel), tmp_path / f"log-{name}", tmp_path)
        got = _losses(out)
        assert len(got) == STEPS
        assert got[:10] == ref[:10]  # kept from before the resume
        assert max(abs(a - b) for a, b in zip(ref[10:], got[10:])) < 1e-5, (name, ref, got)


def test_resume_with_another_global_batch_is_refused(tiny_run, tmp_path):
    from llmlab.stages import pretrain
    from llmlab import cli

    cfg, _ = tiny_run
    out = tmp_path / "run"
    _launch(2, _args(cfg, out, 4), tmp_path / "log", tmp_path)
    (out / "latest").write_text("step-000010\n")
    before = sorted(p.name for p in out.iterdir())
    resumed = cli.stage_config("pretrain", _args(cfg, out, 4)[1:])
    with pytest.raises(LLMLabError, match="2 process.*batch_size 4 = 8 rows.*1 x 4 = 4.*--batch_size 8"):
        pretrain.main(resumed)
    assert sorted(p.name for p in out.iterdir()) == before  # nothing written or removed


def test_more_processes_than_rows(tiny_run, tmp_path):
    """One validation row and two processes: rank 1 evaluates a padded batch and the result is the single
    process's; a validation split too short for one row is a clear error on every rank, nothing written."""
    cfg, _ = tiny_run
    text = tmp_path / "corpus.txt"  # the last 10% of a text file is its validation split: about one row here
    text.write_text(" ".join(f"word{i % 50}" for i in range(1400)) + "\n")
    out1, out2 = tmp_path / "one", tmp_path / "two"
    for nproc, out, batch in ((0, out1, 8), (2, out2, 4)):
        args = _args(cfg, out, batch, max_steps=4, eval_every=2, eval_rows=4)
        args[args.index("--corpus") + 1] = str(text)
        _launch(nproc, args, tmp_path / f"log{nproc}", tmp_path)
    assert len(_val(out1)) == 2 and max(abs(a - b) for a, b in zip(_val(out1), _val(out2))) < 1e-5

    short = tmp_path / "short.txt"
    short.write_text("a short corpus. " * 60)
    args = _args(cfg, tmp_path / "run", 4)
    args[args.index("--corpus") + 1] = str(short)
    proc = _launch(2, args, tmp_path / "log", tmp_path, wait=False)
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode != 0
    assert out.count("error: the val split has fewer than 129 tokens") == 2  # each rank says it, one line
    assert not checkpoint.has_checkpoint(tmp_path / "run")


def test_a_rank_dying_mid_run_fails_the_job_and_leaves_a_good_checkpoint(tiny_run, tmp_path):
    cfg, _ = tiny_run
    out = tmp_path / "run"
    args = _args(cfg, out, 4, parallel="fsdp", save_every=5, eval_every=0)
    args[args.index("--max_steps") + 1] = "400"
    proc = _launch(2, args, tmp_path / "log", tmp_path, wait=False)
    deadline = time.time() + 300
    while not (checkpoint.has_checkpoint(out) and checkpoint.read_info(out)["step"] >= 10):
        assert proc.poll() is None and time.time() < deadline, "the run ended before it could be killed"
        time.sleep(0.05)
    os.kill(int((tmp_path / "log.pid.1").read_text()), signal.SIGKILL)
    out_text, _ = proc.communicate(timeout=300)
    assert proc.returncode != 0, out_text[-2000:]
    step = checkpoint.read_info(out)["step"]
    assert 10 <= step < 400
    model = checkpoint.load_model(out)  # `latest` names a whole checkpoint
    assert all(torch.isfinite(p).all() for p in model.parameters())
    args[args.index("--max_steps") + 1] = str(step + 10)  # and the run goes on from it
    _launch(2, args, tmp_path / "log2", tmp_path)
    assert checkpoint.read_info(out)["step"] == step + 10


def test_sft_on_two_processes_reproduces_one(tiny_run, single, tmp_path):
    """Fine-tuning: rows hold different numbers of trained (assistant) tokens, so the loss must be normalised
    by the global count; DDP on 2 x 4 rows then gives the single process's 8. One row in four rereads a
    pretraining document (the tiny preset's replay), on the same global schedule in both runs."""
    cfg, _ = tiny_run
    runs = {}
    for nproc, batch in ((0, 8), (2, 4)):
        out = tmp_path / f"sft{nproc}"
        flags = dict(base=single, data=cfg.sft.data, out_dir=out, max_steps=6, batch_size=batch, save_every=3,
                     eval_every=3, threads=1, replay=cfg.sft.replay, replay_frac=0.25)
        _launch(nproc, ["sft", "--preset", "tiny"] + [a for k, v in flags.items() for a in (f"--{k}", str(v))],
                tmp_path / f"log{nproc}", tmp_path)
        runs[nproc] = out
    ref, got = _losses(runs[0]), _losses(runs[2])
    assert len(ref) == len(got) == 6 and max(abs(a - b) for a, b in zip(ref, got)) < 1e-5, (ref, got)
    val = [[r["val_loss"] for r in map(json.loads, (runs[n] / "metrics.jsonl").read_text().splitlines()) if "val_loss" in r]
           for n in (0, 2)]
    assert len(val[0]) == 2 and max(abs(a - b) for a, b in zip(*val)) < 1e-5
    assert checkpoint.read_info(runs[2])["stage"] == "sft"


def _pairs(world_dir: str, path: Path, split: str, n: int) -> Path:
    from llmlab.tasks.gold import gold_rows

    rows = [{"prompt": r["messages"], "chosen": [{"role": "assistant", "content": r["expect"] or "I can't help with that."}],
             "rejected": [{"role": "assistant", "content": "It is 7, in Oslo."}], "family": r["family"]}
            for r in gold_rows(world_dir, split, n)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.mark.parametrize("stage", ["rm", "dpo"])
def test_reward_model_and_dpo_on_two_processes_reproduce_one(tiny_run, single, tmp_path, stage):
    """Pairs are sharded by rank (pair r, r+W, ... of the global batch) and the loss is normalised by the global
    number of pairs: 2 processes x 2 pairs give the single process's 4."""
    cfg, _ = tiny_run
    train = _pairs(cfg.world.out_dir, tmp_path / "train.jsonl", "train", 4)
    heldout = _pairs(cfg.world.out_dir, tmp_path / "heldout.jsonl", "heldout", 2)
    runs = {}
    for nproc, batch in ((0, 4), (2, 2)):
        out = tmp_path / f"{stage}{nproc}"
        flags = dict(policy=single, world=cfg.world.out_dir, pairs=train, heldout=heldout, out_dir=out, max_steps=4,
                     batch_size=batch, save_every=2, eval_every=2, threads=1, judge_per_family=0)
        if stage == "rm":
            del flags["judge_per_family"]
        _launch(nproc, [stage, "--preset", "tiny"] + [a for k, v in flags.items() for a in (f"--{k}", str(v))],
                tmp_path / f"log{nproc}", tmp_path)
        runs[nproc] = out
    ref, got = _losses(runs[0]), _losses(runs[2])
    assert len(ref) == len(got) == 4 and max(abs(a - b) for a, b in zip(ref, got)) < 1e-5, (ref, got)
    assert checkpoint.read_info(runs[2])["stage"] == stage


def test_rl_on_two_processes_shards_the_rollouts(tiny_run, single, tmp_path):
    """Each rank samples replies to its own prompts of the global batch; the run trains and saves like one
    process (the samples differ from a single process's: each rank draws from its own seed)."""
    cfg, _ = tiny_run
    out = tmp_path / "rl"
    flags = dict(policy=single, world=cfg.world.out_dir, reward="task:gold", out_dir=out, max_steps=3, batch_size=2, group_size=2,
                 save_every=0, eval_every=0, threads=1, judge_per_family=0, prompts_per_family=2, max_new_tokens=8)
    log = _launch(2, ["rl", "--preset", "tiny"] + [a for k, v in flags.items() for a in (f"--{k}", str(v))],
                  tmp_path / "log", tmp_path)
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "loss" in r] == [1, 2, 3] and all(math.isfinite(r["loss"]) for r in rows if "loss" in r)
    assert checkpoint.read_info(out)["step"] == 3, log[-2000:]
    writes = (tmp_path / "log.writes.1").read_text()
    assert str(out) not in writes  # rank 1 wrote nothing of the run
