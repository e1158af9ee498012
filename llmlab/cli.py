"""`llmlab <stage> --flag=value ...`: one subcommand per stage, flags generated from the stage's Config.

Every stage module in `STAGES` exposes `Config` (a dataclass) and `main(cfg) -> dict`. A preset
(`llmlab.presets`) gives the starting values; each flag overrides one field, nested configs with dots
(`llmlab speedrun --pretrain.max_steps=100`). The text under a field in its dataclass is its `--help`.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import json
import sys
from typing import Any, get_type_hints

from llmlab import dist, presets
from llmlab.config import field_docs, to_dict
from llmlab.errors import LLMLabError

# stage name -> (module, one-line description)
STAGES: dict[str, tuple[str, str]] = {
    "world": ("llmlab.stages.world", "generate the embedded default world (corpus, entities, questions)"),
    "tokenizer": ("llmlab.stages.tokenizer", "train a byte-level BPE tokenizer on a corpus"),
    "tokenize": ("llmlab.stages.tokenize", "write a corpus's packed token stream once, as memory-mapped shards"),
    "pretrain": ("llmlab.stages.pretrain", "pretrain a GPT by next-token prediction"),
    "sample": ("llmlab.stages.sample", "sample text from a checkpoint with the KV-cache engine"),
    "sft": ("llmlab.stages.sft", "fine-tune a base checkpoint on conversations into an assistant"),
    "rm": ("llmlab.stages.rm", "train a reward model on comparisons (the world's gold-labelled ones, or users')"),
    "dpo": ("llmlab.stages.dpo", "Direct Preference Optimization of an assistant from comparisons"),
    "rl": ("llmlab.stages.rl", "on-policy RL of an assistant against a reward model or a verifiable reward"),
    "think": ("llmlab.stages.think", "answer with more inference compute (vote, verifiers, search), or measure what it buys"),
    "eval": ("llmlab.stages.evaluate", "evaluate a checkpoint on the world's tasks (base and assistant framings)"),
    "chat": ("llmlab.stages.chat", "talk to an assistant in the terminal (streaming, tools, /help)"),
    "export": ("llmlab.stages.export", "export a checkpoint to Hugging Face, GGUF, a standalone run.py, or a tokenizer folder"),
    "serve": ("llmlab.stages.serve", "serve a checkpoint: OpenAI-compatible API, web chat UI, feedback store"),
    "feedback": ("llmlab.stages.feedback", "`llmlab feedback export`: the web UI's ratings, flags and comparisons as training data"),
    "scale": ("llmlab.stages.scale", "scaling laws: isoFLOP sweeps, Chinchilla fits, a predicted run, the emergence ledger"),
    "assistant": ("llmlab.stages.assistant", "custom assistants: create, list, show, delete (instructions, knowledge files, tools)"),
    "embed": ("llmlab.stages.embed", "train the dense retriever of custom assistants; Recall@5 and nDCG@10 of BM25, dense and hybrid"),
    "redteam": ("llmlab.stages.redteam", "attack the assistant (role-play, encodings, GCG suffixes), apply defenses, write the security card"),
    "speedrun": ("llmlab.stages.speedrun", "run every stage of a preset in order and write report.md"),
}


def _parse_bool(text: str) -> bool:
    low = text.lower()
    if low in ("1", "true", "yes", "on"):
        return True
    if low in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true/false, got {text!r}")


def _flags(cls: type, prefix: str = "") -> list[tuple[str, str, type, str]]:
    """(flag, dotted field path, type, help) for every leaf field of a (nested) config dataclass."""
    out = []
    hints = get_type_hints(cls)
    docs = field_docs(cls)
    for f in dataclasses.fields(cls):
        typ = hints[f.name]
        path = prefix + f.name
        if dataclasses.is_dataclass(typ):
            out.extend(_flags(typ, path + "."))
        else:
            out.append(("--" + path, path, typ, docs.get(f.name, "")))
    return out


def _set_path(cfg: Any, path: str, value: Any) -> Any:
    """A copy of cfg with the dotted field replaced (dataclasses are rebuilt so __post_init__ re-validates)."""
    head, _, rest = path.partition(".")
    new = _set_path(getattr(cfg, head), rest, value) if rest else value
    return dataclasses.replace(cfg, **{head: new})


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one line, not a usage dump
        sys.stderr.write(f"error: {message} (see `{self.prog} --help`)\n")
        sys.exit(2)


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Adds "(default: X)" only where the help does not already say it and there is a default to show."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if "default" in text or action.default is None or action.nargs == 0:
            return text
        return super()._get_help_string(action)


def _declared_by(cls: type, name: str) -> type:
    """The class of a dataclass's MRO that declares field `name` (a stage Config or a shared base)."""
    for klass in cls.__mro__:
        if name in getattr(klass, "__annotations__", {}):
            return klass
    return cls


def build_parser(stage: str, base_cfg: Any) -> argparse.ArgumentParser:
    module, description = STAGES[stage]
    parser = _Parser(prog=f"llmlab {stage}", description=description, formatter_class=_HelpFormatter)
    parser.add_argument("--preset", default="cpu", help=f"starting values: one of {', '.join(presets.PRESETS)}")
    where = f"runs/{stage}-<preset>" if stage in presets.STAGE_PRESETS else "runs/<preset>"
    parser.add_argument("--run", default=None, help=f"run directory (default: {where})")
    parser.add_argument("--print-config", action="store_true", help="print the resolved config as JSON and exit")
    cls = type(base_cfg)
    groups: dict[type, argparse._ArgumentGroup] = {}
    flags = _flags(cls)
    # the stage's own fields first, then those it shares with other stages (the training loop's), as a group
    flags.sort(key=lambda flag: _declared_by(cls, flag[1].split(".")[0]) is not cls)
    for flag, path, typ, doc in flags:
        owner = _declared_by(cls, path.split(".")[0])
        if owner is cls:
            target = parser
        elif owner not in groups:
            title = (owner.__doc__ or owner.__name__).strip().splitlines()[0]
            target = groups[owner] = parser.add_argument_group(f"{owner.__module__}.{owner.__name__}", title)
        else:
            target = groups[owner]
        kind = _parse_bool if typ is bool else typ
        target.add_argument(flag, dest=path, type=kind, default=_get_path(base_cfg, path),
                            help=doc.replace("%", "%%") or " ",  # (argparse formats help with %)
                            metavar=typ.__name__.upper())
    return parser


def _get_path(cfg: Any, path: str) -> Any:
    for part in path.split("."):
        cfg = getattr(cfg, part)
    return cfg


def stage_config(stage: str, argv: list[str]) -> Any:
    """Resolve a stage's Config from `--preset`, `--run` and the field flags in argv."""
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--preset", default="cpu")
    pre.add_argument("--run", default=None)
    known, _ = pre.parse_known_args(argv)
    own = presets.STAGE_PRESETS.get(stage)
    if own is not None:  # a stage outside the speedrun pipeline with presets of its own (`llmlab scale`)
        if known.preset not in own:
            raise LLMLabError(f"unknown preset {known.preset!r} for {stage}: choose one of {', '.join(own)}")
        base = own[known.preset]() if known.run is None else own[known.preset](known.run)
    else:
        pipeline = presets.get(known.preset, run=known.run)
        base = pipeline if stage == "speedrun" else getattr(pipeline, stage, None)
    if not dataclasses.is_dataclass(base):  # (speedrun's `assistant` is a switch, not the stage's config)
        base = None
    if base is None:  # a stage outside the preset pipeline starts from its own Config defaults
        base = importlib.import_module(STAGES[stage][0]).Config()
    parser = build_parser(stage, base)
    args = parser.parse_args(argv)
    cfg = base
    for _, path, _, _ in _flags(type(base)):
        value = getattr(args, path)
        if value != _get_path(cfg, path):
            cfg = _set_path(cfg, path, value)
    if args.print_config:
        print(json.dumps(to_dict(cfg), indent=2))
        sys.exit(0)
    return cfg


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help"):
        width = max(map(len, STAGES))
        lines = [f"  {name:<{width}}  {desc}" for name, (_, desc) in STAGES.items()]
        print("usage: llmlab <stage> [--preset NAME] [--flag=value ...]\n\nstages:\n" + "\n".join(lines))
        print("\n`llmlab <stage> --help` lists a stage's flags with their defaults.")
        return
    stage, rest = argv[0], argv[1:]
    if rest and not rest[0].startswith("-"):  # `llmlab feedback export`: a leading word is the stage's action,
        rest = ["--action", rest[0], *rest[1:]]
        if len(rest) > 2 and not rest[2].startswith("-"):  # and a second one its object (`assistant show shop`)
            rest = [*rest[:2], "--name", rest[2], *rest[3:]]
    if stage not in STAGES:
        sys.stderr.write(f"error: unknown stage {stage!r}; choose one of {', '.join(STAGES)}\n")
        sys.exit(2)
    try:
        cfg = stage_config(stage, rest)
        module = importlib.import_module(STAGES[stage][0])
        module.main(cfg)
        dist.shutdown()
    except LLMLabError as e:
        sys.stderr.write(f"error: {e}\n")
        sys.exit(2)
    except KeyboardInterrupt:
        sys.stderr.write("interrupted\n")
        sys.exit(130)
