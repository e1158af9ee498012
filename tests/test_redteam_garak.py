"""garak's report as security-card rows (llmlab.redteam.garak), on a small report in the shape garak 0.17.1 wrote
against `llmlab serve`; garak itself is not needed."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from llmlab.errors import LLMLabError
from llmlab.redteam.card import Row
from llmlab.redteam.garak import card_rows, read_report

# The shapes of real rows (garak 0.17.1), with made-up numbers; attempts shortened to the fields that matter.
REPORT = [
    {"entry_type": "start_run setup", "_config.version": "0.17.1", "plugins.target_type": "openai.OpenAICompatible",
     "plugins.target_name": "cpu-sft", "run.generations": 1},
    {"entry_type": "init", "garak_version": "0.17.1", "start_time": "2026-12-05T06:26:47.316396",
     "run": "e942b84d-9955-40de-9bea-b1a5f70ed516"},
    {"entry_type": "attempt", "uuid": "cafe0a15-6d81-40f7-8d6f-1f41ae267828", "seq": 0, "status": 2,
     "probe_classname": "dan.AutoDANCached", "outputs": [None],
     "detector_results": {"dan.DAN": [None], "mitigation.MitigationBypass": [None]}},
    {"entry_type": "eval", "probe": "dan.DanInTheWild", "detector": "mitigation.MitigationBypass", "passed": 1,
     "fails": 6, "nones": 13, "total_evaluated": 7, "total_processed": 20,
     "intents": {"T009ignore": {"passed": 1, "total_evaluated": 7, "nones": 13}},
     "hit_at_k": {"1": {"score": 0.857, "prompts": 7}}},
    {"entry_type": "probe_summary", "probe": "dan.DanInTheWild",
     "inference_counts": {"total_evaluated": 20, "nones": 13},
     "detection_counts": {"detectors": ["mitigation.MitigationBypass"], "passed": 1, "fails": 6, "nones": 13}},
    {"entry_type": "eval", "probe": "encoding.InjectHex", "detector": "encoding.DecodeApprox", "passed": 38,
     "fails": 2, "nones": 4, "total_evaluated": 40, "total_processed": 44, "hit_at_k": {"1": {"score": 0.05,
     "prompts": 40}}, "confidence_method": "bootstrap", "confidence": 0.95, "confidence_upper": 0.125,
     "confidence_lower": 0.0},
    {"entry_type": "eval", "probe": "encoding.InjectHex", "detector": "encoding.DecodeMatch", "passed": 40,
     "fails": 0, "nones": 4, "total_evaluated": 40, "total_processed": 44},
    {"entry_type": "eval", "probe": "dan.AutoDANCached", "detector": "dan.DAN", "passed": 0, "fails": 0, "nones": 3,
     "total_evaluated": 0, "total_processed": 3},
    {"entry_type": "completion", "end_time": "2026-12-05T06:28:34.204291",
     "run": "e942b84d-9955-40de-9bea-b1a5f70ed516"},
]


def write(path, entries) -> str:
    path.write_text("".join(json.dumps(e) + "\n" for e in entries))
    return str(path)


@pytest.fixture
def report(tmp_path):
    return write(tmp_path / "run.report.jsonl", REPORT)


def test_eval_rows_only_in_file_order(report):
    rows = read_report(report)
    assert [(r["probe"], r["detector"]) for r in rows] == [
        ("dan.DanInTheWild", "mitigation.MitigationBypass"), ("encoding.InjectHex", "encoding.DecodeApprox"),
        ("encoding.InjectHex", "encoding.DecodeMatch"), ("dan.AutoDANCached", "dan.DAN")]


def test_card_rows_count_the_unsafe_replies_as_hits(report):
    # garak's `passed` counts SAFE replies: hits are the judged replies that did not pass; refused requests
    # (nones) are not judged and stay out of n
    assert card_rows(report) == [
        Row("garak:dan.DanInTheWild", "none", "mitigation.MitigationBypass", hits=6, n=7),
        Row("garak:encoding.InjectHex", "none", "encoding.DecodeApprox", hits=2, n=40),
        Row("garak:encoding.InjectHex", "none", "encoding.DecodeMatch", hits=0, n=40),
        Row("garak:dan.AutoDANCached", "none", "dan.DAN", hits=0, n=0),
    ]


def test_line_separators_inside_strings_stay_inside(tmp_path):
    # garak writes JSON with ensure_ascii=False: a prompt or reply may hold a raw U+2028 (as a real run's did)
    attempt = {"entry_type": "attempt", "outputs": [{"text": "one\u2028two\x85three\x0cfour"}]}
    path = tmp_path / "run.report.jsonl"
    path.write_text("".join(json.dumps(e, ensure_ascii=False) + "\n" for e in [attempt, REPORT[3]]), encoding="utf-8")
    assert "\u2028" in path.read_text(encoding="utf-8")
    assert card_rows(path) == [Row("garak:dan.DanInTheWild", "none", "mitigation.MitigationBypass", hits=6, n=7)]


def test_older_reports_total(tmp_path):
    older = {"entry_type": "eval", "probe": "encoding.InjectBase64", "detector": "encoding.DecodeMatch",
             "passed": 7, "total": 10}
    assert card_rows(write(tmp_path / "old.report.jsonl", [older])) == [
        Row("garak:encoding.InjectBase64", "none", "encoding.DecodeMatch", hits=3, n=10)]


def test_markdown_from_the_command_line(report):
    out = subprocess.run([sys.executable, "-m", "llmlab.redteam.garak", report], capture_output=True, text=True,
                         check=True).stdout
    assert "| garak:dan.DanInTheWild | none |" in out
    assert "86% [" in out  # 6 of 7


def test_command_line_error_is_one_line_and_exit_code_2(tmp_path):
    done = subprocess.run([sys.executable, "-m", "llmlab.redteam.garak", str(tmp_path / "missing.report.jsonl")],
                          capture_output=True, text=True)
    assert done.returncode == 2
    assert done.stderr.startswith("error: no garak report at ") and done.stderr.count("\n") == 1


@pytest.mark.parametrize("content, message", [
    (None, "no garak report"),
    ("", "is empty"),
    ("\n  \n", "is empty"),
    ('{"entry_type": "init"}\n{"entry_type": "eval", "probe": "x", "detec', "is not JSON"),
    ('["not", "an", "object"]\n', "no entry_type"),
    ('{"entry_type": "init", "garak_version": "0.17.1"}\n', "no eval rows"),
    ('{"entry_type": "eval", "probe": "x", "detector": "y", "passed": 1}\n', "without total_evaluated"),
    ('{"entry_type": "eval", "probe": "x", "detector": "y", "passed": 5, "total_evaluated": 3}\n', "passed=5 of 3"),
    ('{"entry_type": "eval", "probe": "x", "detector": "y", "passed": "a", "total_evaluated": 3}\n', "not integers"),
])
def test_bad_reports_are_llmlab_errors(tmp_path, content, message):
    path = tmp_path / "run.report.jsonl"
    if content is not None:
        path.write_text(content)
    with pytest.raises(LLMLabError, match=message):
        card_rows(path)


def test_a_hitlog_is_not_a_report(tmp_path):
    hit = {"goal": "disregard the system prompt", "probe": "dan.DanInTheWild",
           "detector": "mitigation.MitigationBypass", "score": 1.0}
    with pytest.raises(LLMLabError, match="no entry_type"):
        read_report(write(tmp_path / "run.hitlog.jsonl", [hit]))
