"""End to end: every stage of the tiny preset through main(), exact kill-and-resume, and bad input."""

import dataclasses
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from llmlab import checkpoint, presets
from llmlab.errors import LLMLabError
from llmlab.engine import SamplingParams
from llmlab.stages import pretrain, sample, tokenizer


def test_tiny_speedrun_runs_every_stage(tiny_run):
    cfg, results = tiny_run
    run = Path(cfg.run_dir)
    report = (run / "report.md").read_text()
    assert "val bits per byte" in report and "train people, seen phrasing" in report
    assert (run / "loss.png").stat().st_size > 1000
    pre = results["pretrain"]
    assert pre["val_bpb"] < 8.0 / 2.4  # better than uniform over the vocabulary (9 bits/token / ~2.4 bytes/token)
    rows = [json.loads(line) for line in (Path(cfg.pretrain.out_dir) / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in rows if "loss" in r]
    assert len(losses) == cfg.pretrain.max_steps and losses[-1] < losses[0] - 1.0
    groups = results["eval"]["world_qa"]["groups"]
    assert set(groups) == {"train people, seen phrasing", "train people, held-out phrasing", "held-out people (bios only)"}
    info = checkpoint.read_info(cfg.pretrain.out_dir)
    assert info["step"] == cfg.pretrain.max_steps and info["stage"] == "pretrain"


def test_sample_stage_streams_a_completion(tiny_run, capsys):
    cfg, _ = tiny_run
    greedy = SamplingParams(max_new_tokens=8, temperature=0.0)
    out = sample.main(dataclasses.replace(cfg.sample, prompt="Q: Where was", sampling=greedy))
    assert len(out["completions"]) == 1
    assert capsys.readouterr().out.startswith("Q: Where was" + out["completions"][0])
    many = sample.main(dataclasses.replace(cfg.sample, num_samples=3, sampling=SamplingParams(max_new_tokens=6, seed=0)))
    assert len(many["completions"]) == 3


def test_speedrun_again_skips_finished_stages(tiny_run, capsys):
    from llmlab.stages import speedrun

    cfg, first = tiny_run
    before = checkpoint.resolve(cfg.pretrain.out_dir)
    again = speedrun.main(cfg)
    out = capsys.readouterr().out
    assert "== world: already complete" in out and "== pretrain: already complete" in out
    assert checkpoint.resolve(cfg.pretrain.out_dir) == before
    # the report keeps the times the earlier invocation measured for the stages it skipped
    assert again["seconds"]["pretrain"] == first["seconds"]["pretrain"] > 0 and "pretrain" in again["earlier"]
    assert "(an earlier invocation)" in (Path(cfg.run_dir) / "report.md").read_text()


def test_a_stage_that_runs_again_sets_what_later_stages_made_from_it_aside(tmp_path):
    """A world of other settings (or a missing tokenizer) is made again; the checkpoints trained on the old one
    must not be skipped as complete, nor deleted: they are moved to stale-<time>/."""
    from llmlab.stages.speedrun import outdated_by, set_aside

    chain = [("world", True, "w"), ("tokenizer", False, "t"), ("pretrain", True, "b"), ("sft", True, "s")]
    assert outdated_by(chain) == ("tokenizer", ["b", "s"])
    assert outdated_by([("world", False, "w"), ("tokenizer", True, "t")]) == ("world", ["t"])
    assert outdated_by(chain[:1]) == (None, [])
    (tmp_path / "base").mkdir()
    (tmp_path / "base" / "model.safetensors").write_text("weights")
    stale = set_aside(tmp_path, [str(tmp_path / "base"), str(tmp_path / "sft")])
    assert stale.parent == tmp_path and stale.name.startswith("stale-") and not (tmp_path / "base").exists()
    assert (stale / "base" / "model.safetensors").read_text() == "weights"
    assert set_aside(tmp_path, [str(tmp_path / "sft")]) is None


def test_a_training_stage_made_with_other_settings_is_not_complete(tiny_run, tmp_path):
    """A preset whose RL KL weight (or a learning rate) changed must not skip the stage its old checkpoint
    completes; threads, the checkpoint cadence or more steps (which resume) change nothing it made."""
    from llmlab.stages.speedrun import _done, changed_settings, outdated_by

    cfg, _ = tiny_run
    assert _done(cfg.sft) and changed_settings(cfg.sft) == []
    run_only = dataclasses.replace(cfg.sft, threads=1, save_every=7, max_steps=cfg.sft.max_steps + 5)
    assert changed_settings(run_only) == []
    other = dataclasses.replace(cfg.sft, seed=cfg.sft.seed + 1,
                                optim=dataclasses.replace(cfg.sft.optim, muon_lr=cfg.sft.optim.muon_lr * 2))
    changes = changed_settings(other)
    assert [c.split(":")[0] for c in changes] == ["optim.muon_lr", "seed"] and not _done(other)
    assert changed_settings(dataclasses.replace(cfg.sft, out_dir=str(tmp_path / "none"))) == []
    # the stage made anew sets its own output aside too, not only what later stages made from it
    chain = [("pretrain", True, "b"), ("sft", False, "s"), ("rm", True, "r")]
    assert outdated_by(chain, frozenset({"sft"})) == ("sft", ["s", "r"])
    assert outdated_by(chain) == ("sft", ["r"])


def _pretrain_cmd(cfg: pretrain.Config) -> list[str]:
    return [sys.executable, "-m", "llmlab", "pretrain", "--preset", "tiny", "--corpus", cfg.corpus,
            "--tokenizer", cfg.tokenizer, "--out_dir", cfg.out_dir, "--max_steps", str(cfg.max_steps),
            "--save_every", str(cfg.save_every), "--eval_every", "0", "--threads", "1"]


def test_kill_and_resume_is_bit_identical(tiny_run, tmp_path):
    """SIGKILL a pretraining process at several moments; each restart resumes; the final weights equal an
    uninterrupted run's bit for bit."""
    cfg, _ = tiny_run
    base = dataclasses.replace(cfg.pretrain, max_steps=24, save_every=2, out_dir=str(tmp_path / "straight"))
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    subprocess.run(_pretrain_cmd(base), check=True, capture_output=True, env=env, timeout=300)

    killed = dataclasses.replace(base, out_dir=str(tmp_path / "killed"))
    kills = 0
    for target in (4, 10, 16):  # kill right after the checkpoint of these steps appears (often mid-next-save)
        proc = subprocess.Popen(_pretrain_cmd(killed), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
        deadline = time.time() + 120
        while proc.poll() is None and time.time() < deadline:
            if checkpoint.has_checkpoint(killed.out_dir) and checkpoint.read_info(killed.out_dir)["step"] >= target:
                proc.send_signal(signal.SIGKILL)
                kills += 1
                break
            time.sleep(0.01)
        proc.wait()
    subprocess.run(_pretrain_cmd(killed), check=True, capture_output=True, env=env, timeout=300)
    assert kills == 3
    a = load_file(str(checkpoint.resolve(base.out_dir) / "model.safetensors"))
    b = load_file(str(checkpoint.resolve(killed.out_dir) / "model.safetensors"))
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name
    steps = [json.loads(line)["step"] for line in (Path(killed.out_dir) / "metrics.jsonl").read_text().splitlines()]
    assert steps == sorted(steps)  # the log was cut back to the resumed step, not duplicated


def test_resume_with_another_model_shape_is_refused(tiny_run, tmp_path):
    cfg, _ = tiny_run
    first = dataclasses.replace(cfg.pretrain, max_steps=2, out_dir=str(tmp_path / "r"), eval_every=0)
    pretrain.main(first)
    wider = dataclasses.replace(first, max_steps=4, model=dataclasses.replace(first.model, d_model=64, n_head=2))
    with pytest.raises(LLMLabError, match="another model shape"):
        pretrain.main(wider)
    assert checkpoint.read_info(first.out_dir)["step"] == 2  # nothing was damaged


def test_bad_inputs_leave_nothing_damaged(tiny_run, tmp_path):
    cfg, _ = tiny_run
    with pytest.raises(LLMLabError, match="does not exist"):
        pretrain.main(dataclasses.replace(cfg.pretrain, corpus=str(tmp_path / "nope"), out_dir=str(tmp_path / "x")))
    with pytest.raises(LLMLabError, match="no tokenizer at"):
        pretrain.main(dataclasses.replace(cfg.pretrain, tokenizer=str(tmp_path / "nope"), out_dir=str(tmp_path / "x")))
    (tmp_path / "empty.txt").write_text("")
    with pytest.raises(LLMLabError, match="no training text|no documents"):
        tokenizer.main(dataclasses.replace(cfg.tokenizer, corpus=str(tmp_path / "empty.txt"), out_dir=str(tmp_path / "t")))
    assert not (tmp_path / "t" / "tokenizer.json").exists()
    with pytest.raises(LLMLabError, match="does not fit the model's context"):
        sample.main(dataclasses.replace(cfg.sample, prompt="word " * 200))
