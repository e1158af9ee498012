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


def test_help_lists_every_field_with_its_doc():
    out = run_cli("pretrain", "--help")
    assert out.returncode == 0
    assert "--model.n_kv_head" in out.stdout and "grouped-query attention" in out.stdout
    assert "--grad_accum" in out.stdout and "micro-batches per optimizer step" in out.stdout


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
