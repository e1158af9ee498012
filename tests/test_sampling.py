"""Sampling settings: one definition (llmlab.engine.SamplingParams) checked where it is made, each surface's
defaults, and a bad value on the command line as a one-line error (the API's and the web UI's 422s are in
tests/test_server.py)."""

import dataclasses
import subprocess
import sys

import pytest

from llmlab import cli
from llmlab.engine import SEED_LIMIT, InvalidSampling, SamplingParams, newline_ids
from llmlab.stages import chat, sample
from llmlab.tokenizer import train_tokenizer
from serving import make_checkpoint, make_tokenizer

NAN, INF = float("nan"), float("inf")

BAD = [
    ("temperature", -1.0), ("temperature", NAN), ("temperature", INF),
    ("top_p", 0.0), ("top_p", 1.5), ("top_p", NAN),
    ("top_k", -1), ("max_new_tokens", -1),
    ("seed", -1), ("seed", SEED_LIMIT), ("seed", 2**64),  # 2**64 once killed the server's scheduler thread
]


@pytest.mark.parametrize("field,value", BAD, ids=[f"{f}={v}" for f, v in BAD])
def test_a_bad_value_is_an_error_naming_its_field(field, value):
    with pytest.raises(InvalidSampling, match=f"^{field} must be") as e:
        SamplingParams(**{field: value})
    assert e.value.field == field and "\n" not in str(e.value)
    with pytest.raises(InvalidSampling):  # replace() checks again
        dataclasses.replace(SamplingParams(), **{field: value})


def test_edges_of_the_ranges_are_valid():
    SamplingParams(temperature=0.0, top_p=1.0, top_k=0, max_new_tokens=0, seed=0)
    SamplingParams(temperature=5.0, top_p=1e-6, seed=SEED_LIMIT - 1)


def test_each_cli_surface_keeps_its_defaults():
    assert (sample.Config().sampling.temperature, sample.Config().sampling.top_k) == (0.8, 50)
    assert sample.Config().sampling.max_new_tokens == 64
    assert chat.Config().sampling.temperature == 0.0 and chat.Config().sampling.max_new_tokens == 200
    cfg = cli.stage_config("chat", ["--preset", "tiny", "--sampling.top_p", "0.9", "--sampling.seed", "3"])
    assert (cfg.sampling.top_p, cfg.sampling.seed, cfg.sampling.temperature) == (0.9, 3, 0.0)
    cfg = cli.stage_config("speedrun", ["--preset", "tiny", "--sample.sampling.temperature", "0.5"])
    assert cfg.sample.sampling.temperature == 0.5 and cfg.sample.sampling.top_k == 50


@pytest.mark.parametrize("args,message", [
    (["sample", "--sampling.temperature", "-1"], "temperature must be"),
    (["sample", "--sampling.temperature", "nan"], "temperature must be"),
    (["chat", "--sampling.top_p", "1.5"], "top_p must be"),
    (["chat", "--sampling.seed", str(2**64)], "seed must be in [0, 2**63)"),
])
def test_a_bad_flag_is_a_one_line_error(args, message):
    out = subprocess.run([sys.executable, "-m", "llmlab", *args, "--print-config"], capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 2
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and message in lines[0], out.stderr


def test_chat_temperature_command_checks_its_value(tmp_path, monkeypatch, capsys):
    make_tokenizer(tmp_path / "tok")
    ckpt = make_checkpoint(tmp_path / "tok", tmp_path / "ckpt")
    lines = iter(["/temperature -1", "/temperature nan", "/temperature 0.5", "/quit"])
    monkeypatch.setattr("builtins.input", lambda prompt="": next(lines))
    chat.main(chat.Config(checkpoint=str(ckpt), world=str(tmp_path)))
    out = capsys.readouterr().out
    assert out.count("error: temperature must be") == 2 and "(temperature 0.5)" in out


def test_newline_ids_are_the_tokens_with_a_newline():
    tok = train_tokenizer(["one line\ntwo lines\n\nthree\n"] * 20, vocab_size=300)
    ids = newline_ids(tok)
    assert ids and all("\n" in tok.decode([i]) for i in ids)
    assert not any("\n" in tok.decode([i]) for i in range(tok.vocab_size) if i not in ids)
