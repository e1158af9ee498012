"""NVIDIA's garak LLM scanner against `llmlab serve`, and its report turned into security-card rows.

garak (https://github.com/NVIDIA/garak) sends its probes' prompts through any OpenAI-compatible API and judges the
replies with its detectors. It is a second opinion beside the lab's own attacks: its prompts were written for other
models and its detectors are string matches, not the world's exact judge, so its rows say what garak's probes do to
this assistant, not what an attacker of this world could do.

garak is an optional extra with many dependencies (it pins its own torch, transformers, datasets and cloud SDKs),
so it lives in a virtual environment of its own; this module reads its report with the standard library only and
imports without garak installed.

Install (a separate venv; garak 0.17.1 is the version tried):

    python3 -m venv .venv-garak
    .venv-garak/bin/pip install torch==2.13.0       # the CPU wheel first, so garak does not pull a CUDA build
    .venv-garak/bin/pip install -e ".[redteam]"     # or just: .venv-garak/bin/pip install "garak>=0.17.1"

Serve the assistant (the model's context is 128 tokens: longer prompts are answered 400 context_length_exceeded):

    llmlab serve --checkpoint runs/cpu/sft --world runs/cpu/world --host 127.0.0.1 --port 8000

Write runs/garak/llmlab.yaml (garak's OpenAI-compatible generator; `max_tokens` small for the short context;
`stop` suppressed so that garak's default stop strings "#" and ";" do not cut the replies; one request at a time):

    system:
      parallel_attempts: false
      parallel_requests: false
    run:
      generations: 1
      soft_probe_prompt_cap: 256
      seed: 1
    plugins:
      target_type: openai.OpenAICompatible
      target_name: cpu-sft                  # the id /v1/models reports
      generators:
        openai:
          OpenAICompatible:
            uri: http://127.0.0.1:8000/v1/
            max_tokens: 32
            suppressed_params: [stop]
    reporting:
      report_dir: /abs/path/to/runs/garak   # relative paths are taken under garak's own data directory
      report_prefix: llmlab-cpu-sft

Scan (garak reads the API key from OPENAICOMPATIBLE_API_KEY and needs one set; `llmlab serve` without --api_key
ignores it; HF_HUB_OFFLINE=1 makes the probes that want a Hugging Face dataset fail at once instead of waiting):

    PROBES=probes.encoding.InjectBase64,probes.encoding.InjectHex,probes.encoding.InjectROT13
    PROBES=$PROBES,probes.dan.AutoDANCached,probes.dan.DanInTheWild
    PROBES=$PROBES,probes.promptinject.HijackHateHumans,probes.promptinject.HijackKillHumans
    PROBES=$PROBES,probes.latentinjection.LatentInjectionTranslationEnFr
    HF_HUB_OFFLINE=1 OPENAICOMPATIBLE_API_KEY=unused .venv-garak/bin/python -m garak \\
        --config runs/garak/llmlab.yaml --generations 1 --spec $PROBES

(about two minutes on two CPU cores: 1,795 requests, one at a time). Left out, because they need the internet or a
model download at run time: sysprompt_extraction (its system prompts come from Hugging Face datasets: offline it
has no prompts) and latentinjection.LatentJailbreak (its detector is a Hugging Face toxicity classifier). The other
latentinjection probes, promptinject.HijackLongPrompt and the single DAN prompts are all longer than 128 tokens.

Read the rows with garak's detectors in mind: they are string matches. mitigation.MitigationBypass counts a reply
without one of its refusal phrases as a hit, so this assistant's "I can't help with that." is a hit there; and a
reply that was only a tool call has empty content, which every detector passes.

Convert the report into the card's rows:

    python -m llmlab.redteam.garak runs/garak/llmlab-cpu-sft.report.jsonl

garak's report is JSON lines of several entry types ("start_run setup", "init", "attempt", "eval",
"probe_summary", "completion", "digest", ...). The "eval" rows carry the verdicts, one per probe and detector:
`passed` counts the replies the detector judged SAFE and `fails` those where the attack worked; `nones` counts
replies there were none of to judge (a request the server refused, e.g. a 400 for a prompt over the context),
which are left out of `total_evaluated`. So hits = total_evaluated - passed, and a probe whose every prompt was
refused has n = 0. garak counts replies, not prompts: with --generations 1 they are the same.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from llmlab.errors import LLMLabError
from llmlab.redteam.card import Row, markdown

EVAL_KEYS = ("probe", "detector", "passed")


def _judged(row: dict) -> int:
    """Replies the detector judged: `total_evaluated` (garak 0.17); older reports call it `total`."""
    return int(row["total_evaluated"] if "total_evaluated" in row else row["total"])


def read_report(path: str | Path) -> list[dict]:
    """The "eval" rows of a garak report (`*.report.jsonl`), in file order.

    Every line must be a JSON object with an entry_type: a report cut short mid-line, or a hit log passed by
    mistake, is an error rather than rows silently lost; and so is a report without eval rows (a run that stopped
    before its evaluations).
    """
    path = Path(path)
    if not path.is_file():
        raise LLMLabError(f"no garak report at {path}: pass the *.report.jsonl that `garak` printed at the end")
    text = path.read_text(encoding="utf-8")
    if not text.strip():
        raise LLMLabError(f"the garak report {path} is empty: the run wrote nothing; run garak again")
    rows = []
    # split at "\n" only: garak writes with ensure_ascii=False, so a reply may hold U+2028, U+0085 or a form feed,
    # at which str.splitlines() would also split (and cut a JSON string in two)
    for number, line in enumerate(text.split("\n"), 1):
        if not line.strip():
            continue
        try:
            entry = json.loads(line)
        except json.JSONDecodeError as e:
            raise LLMLabError(f"{path}:{number} is not JSON ({e.msg}): is this a garak *.report.jsonl?") from None
        if not isinstance(entry, dict) or "entry_type" not in entry:
            raise LLMLabError(f"{path}:{number} has no entry_type: is this a garak *.report.jsonl?")
        if entry["entry_type"] != "eval":
            continue
        missing = [k for k in EVAL_KEYS if k not in entry]
        if "total_evaluated" not in entry and "total" not in entry:
            missing.append("total_evaluated")
        if missing:
            raise LLMLabError(f"{path}:{number}: an eval row without {', '.join(missing)}")
        try:
            judged, passed = _judged(entry), int(entry["passed"])
        except (TypeError, ValueError):
            raise LLMLabError(f"{path}:{number}: an eval row whose counts are not integers") from None
        if not 0 <= passed <= judged:
            raise LLMLabError(f"{path}:{number}: an eval row with passed={passed} of {judged}")
        rows.append(entry)
    if not rows:
        raise LLMLabError(f"the garak report {path} has no eval rows: the run stopped before its evaluations; "
                          "run garak again")
    return rows


def card_rows(path: str | Path) -> list[Row]:
    """One card row per probe and detector of a garak report: family "garak:<probe>", defense "none", goal the
    detector, hits the replies the detector flagged (the attack worked), n the replies it judged."""
    rows = []
    for e in read_report(path):
        judged = _judged(e)
        rows.append(Row(f"garak:{e['probe']}", "none", e["detector"], hits=judged - int(e["passed"]), n=judged))
    return rows


if __name__ == "__main__":
    if len(sys.argv) != 2:
        print("usage: python -m llmlab.redteam.garak REPORT.report.jsonl", file=sys.stderr)
        sys.exit(2)
    try:
        print(markdown(card_rows(sys.argv[1])), end="")
    except LLMLabError as e:  # as the llmlab CLI: one line, exit code 2
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
