"""The command line: flags generated from the Config dataclasses, presets, and one-line errors."""

import json
import subprocess
import sys

import pytest

from llmlab import cli, presets


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "llmlab", *args], capture_output=True, text=True, timeout=120)


def test_flags_override_preset_fields_including_nested():
    cfg = cli.stage_config("pretrain", ["--preset", "tiny", "--max_steps", "7", "--model.d_model", "48",
                                        "--model.qk_norm", "false", "--optim.muon_lr=0.01"])
    base = presets.tiny().pretrain
    assert (cfg.max_steps, cfg.model.d_model, cfg.model.qk_norm, cfg.optim.muon_lr) == (7, 48, False, 0.01)
    assert cfg.batch_size == base.batch_size and cfg.corpus == base.corpus


def test_run_dir_moves_every_path():
    cfg = cli.stage_config("speedrun", ["--preset", "tiny", "--run", "/tmp/elsewhere"])
    assert cfg.run_dir == "/tmp/elsewhere"
    assert cfg.pretrain.out_dir.startswith("/tmp/elsewhere") and cfg.tokenizer.corpus.startswith("/tmp/elsewhere")


@pytest.mark.parametrize("stage", ["pretrain", "sft", "sample", "chat", "serve"])
def test_help_explains_every_flag(stage):
    """Every field of the stage's Config, inherited ones (the training loop's) included, is a flag with the text
    written under it, and no default is shown twice."""
    cfg = cli.stage_config(stage, ["--preset", "tiny"])
    text = " ".join(cli.build_parser(stage, cfg).format_help().split())
    for flag, path, _, doc in cli._flags(type(cfg)):
        assert doc, f"{flag} has no docstring"
        assert f"{flag} " in text and " ".join(doc.split()) in text, flag
    assert "(default: None)" not in text and text.count("(default: runs/<preset>)") == 1


def test_help_runs_and_groups_the_shared_training_flags():
    out = run_cli("sft", "--help")
    assert out.returncode == 0
    text = out.stdout[out.stdout.index("options:"):]
    own, shared = text.index("--base"), text.index("llmlab.training.TrainConfig")
    assert own < shared < text.index("--grad_accum") and "micro-batches per optimizer step" in text


@pytest.mark.parametrize("args,flag", [
    (["pretrain", "--optim.muon_lr", "-1"], "--optim.muon_lr"), (["pretrain", "--optim.muon_lr", "nan"], "--optim.muon_lr"),
    (["sft", "--warmdown_frac", "1.5"], "--warmdown_frac"), (["sft", "--device", "tpu9"], "--device"),
    (["sample", "--sampling.temperature", "-1"], "temperature"), (["sample", "--sampling.top_p", "2"], "top_p"),
    (["chat", "--sampling.temperature", "nan"], "temperature"),
])
def test_numbers_out_of_range_fail_at_the_door_naming_the_flag(args, flag, capsys):
    with pytest.raises(SystemExit) as exit_:
        cli.main([*args, "--preset", "tiny", "--print-config"])
    assert exit_.value.code == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and flag in lines[0], lines


def test_print_config_is_json_of_the_resolved_config():
    out = run_cli("pretrain", "--preset", "tiny", "--max_steps", "3", "--print-config")
    assert out.returncode == 0
    assert json.loads(out.stdout)["max_steps"] == 3


@pytest.mark.parametrize("args,message", [
    (["pretrain", "--no_such_flag", "1"], "unrecognized arguments: --no_such_flag"),
    (["pretrain", "--preset", "huge"], "unknown preset 'huge'"),
    (["teleport"], "unknown stage 'teleport'"),
    (["pretrain", "--max_steps", "0", "--print-config"], "max_steps must be positive"),
    (["pretrain", "--max_steps", "many"], "invalid int value"),
])
def test_bad_invocations_fail_with_one_line(args, message):
    out = run_cli(*args)
    assert out.returncode == 2
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and message in lines[0], out.stderr


def test_serve_and_feedback_follow_the_run_directory_and_take_an_action_word():
    cfg = cli.stage_config("serve", ["--preset", "tiny", "--run", "/tmp/r", "--port", "9999"])
    assert (cfg.checkpoint, cfg.db, cfg.world, cfg.port) == ("/tmp/r/sft", "/tmp/r/feedback.db", "/tmp/r/world", 9999)
    out = run_cli("feedback", "export", "--preset", "tiny", "--run", "/tmp/llmlab-no-such-run", "--print-config")
    assert out.returncode == 0 and json.loads(out.stdout)["action"] == "export"
    assert json.loads(out.stdout)["db"] == "/tmp/llmlab-no-such-run/feedback.db"
    out = run_cli("feedback", "export", "--db", "/tmp/llmlab-no-such.db")
    assert out.returncode == 2 and "no feedback store" in out.stderr and "Traceback" not in out.stderr
    out = run_cli("serve", "--host", "0.0.0.0", "--checkpoint", "/nonexistent")
    assert out.returncode == 2 and "api_key" in out.stderr
