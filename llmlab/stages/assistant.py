"""`llmlab assistant`: custom assistants made from instructions, knowledge files and a choice of tools.

    llmlab assistant create shop --instructions "You answer questions about the shop." \
        --files runs/cpu/world/packs/handbook/handbook.md,runs/cpu/world/packs/handbook/policies.txt \
        --tools calculator,search
    llmlab assistant create tutor --files notes.md --adapter runs/tutor-lora/adapter   (answers through a LoRA)
    llmlab assistant list
    llmlab assistant show shop            its instructions, tools and files (with their passages)
    llmlab assistant delete shop
    llmlab assistant eval                 --checkpoint's answers from the knowledge packs' files (and without
                                          them), a needle in a haystack up to 100x the context, memory recall
                                          N turns back (llmlab.assistants.evals): report.md, needle.png
    llmlab assistant eval --embedder runs/cpu/embed   the same, a pack's passages found by BM25 and `llmlab embed`'s
                                          dense retriever fused (as `llmlab serve --embedder`)

Assistants live in --store (one folder each, beside the feedback store; llmlab.assistants.store). Files are
plain text, Markdown, JSONL ({"text"} rows) or PDF, read, checked and cut into passages when the assistant is
created (llmlab.assistants.files, .chunks); a bad file stops the command and nothing is created.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

from llmlab import checkpoint as checkpoints
from llmlab import world as worlds
from llmlab.assistants import evals
from llmlab.assistants.embedder import index_maker
from llmlab.assistants.reader import PASSAGES
from llmlab.assistants.store import TOOLS, AssistantStore
from llmlab.engine import Engine
from llmlab.errors import LLMLabError
from llmlab.lora import check_base, read_adapter_config
from llmlab.fileio import write_atomic
from llmlab.report import pyplot
from llmlab.world.reading import PASSAGE_WORDS

ACTIONS = ("create", "list", "show", "delete", "eval")


@dataclass
class Config:
    action: str = "list"
    """create, list, show, delete or eval"""
    name: str = ""
    """the assistant's name (create, show, delete): lowercase letters, digits, '-' and '_'"""
    instructions: str = ""
    """create: its instructions (the system prompt of every conversation with it)"""
    files: str = ""
    """create: its knowledge files, comma-separated (.txt, .md, .jsonl, .pdf)"""
    tools: str = ""
    """create: the tools it may use, comma-separated (calculator, search, python)"""
    adapter: str = ""
    """create: a LoRA adapter folder (`llmlab sft --lora_r N`'s adapter/, PEFT's format) the assistant answers
    through: `llmlab serve` runs its requests through it, batched with other assistants' and the base's"""
    max_words: int = PASSAGE_WORDS
    """create: words per passage its files are cut into (the reading the assistant was fine-tuned on reads
    passages of this size: one or two sentences, so that a passage and a question fit the cpu preset's context)"""
    store: str = "runs/cpu/assistants"
    """where assistants are kept"""
    checkpoint: str = "runs/cpu/sft"
    """eval: the assistant checkpoint measured; create: the model an --adapter must fit (checked when it exists)"""
    world: str = "runs/cpu/world"
    """eval: the world whose knowledge packs, text and people the measurements use"""
    out_dir: str = "runs/cpu/assistant-eval"
    """eval: where report.md, results.json and needle.png go"""
    k: int = PASSAGES
    """eval: passages retrieved and paged in per question (as `llmlab serve --passages`)"""
    embedder: str = ""
    """eval: a dense retriever (`llmlab embed`'s checkpoint, e.g. runs/cpu/embed) whose ranking is fused with
    BM25's (llmlab.assistants.retrieval.Hybrid) to find a pack's passages; empty: BM25 alone"""
    needles: int = 16
    """eval: needles per cell of the needle-in-a-haystack grid"""
    memory_n: int = 40
    """eval: conversations per distance of the memory measurement"""

    def __post_init__(self) -> None:
        if self.action not in ACTIONS:
            raise LLMLabError(f"assistant: unknown action {self.action!r}: use one of {', '.join(ACTIONS)}")
        if self.max_words < 1:
            raise LLMLabError(f"--max_words must be positive (got {self.max_words})")


def _split(text: str) -> list[str]:
    return [x.strip() for x in text.split(",") if x.strip()]


def main(cfg: Config) -> dict:
    if cfg.action == "eval":
        return evaluate(cfg)
    if cfg.action != "list" and not cfg.name:
        raise LLMLabError(f"assistant {cfg.action}: give the assistant's name (`llmlab assistant {cfg.action} NAME`)")
    store = AssistantStore(cfg.store)
    if cfg.action == "create":
        if cfg.adapter:  # against the model that will serve it, if there is one (the server checks again)
            try:
                served = checkpoints.load_model_config(cfg.checkpoint)
                sha = checkpoints.weights_sha256(cfg.checkpoint)
            except LLMLabError:
                served = None
            if served is not None:
                check_base(served, cfg.adapter, read_adapter_config(cfg.adapter), sha)
        a = store.create(cfg.name, cfg.instructions, _split(cfg.files), _split(cfg.tools), cfg.max_words,
                         adapter=cfg.adapter)
        passages = sum(f["chunks"] for f in a.files)
        print(f"assistant {a.name}: {len(a.files)} files, {passages} passages, tools: {', '.join(a.tools) or 'none'}"
              f"{', a LoRA adapter' if a.adapter else ''} -> {store.root / a.name}")
        return asdict(a)
    if cfg.action == "list":
        found = store.list()
        for a in found:
            print(f"{a.name:20} {len(a.files):3} files  tools: {', '.join(a.tools) or 'none':28} "
                  f"{a.instructions[:60]}")
        if not found:
            print(f"no assistants in {store.root} yet: `llmlab assistant create NAME --files ...` makes one "
                  f"(tools: {', '.join(TOOLS)})")
        return {"assistants": [asdict(a) for a in found]}
    if cfg.action == "show":
        a = store.get(cfg.name)
        print(f"name:         {a.name}\ninstructions: {a.instructions or '(none)'}\ntools:        "
              f"{', '.join(a.tools) or 'none'}\nadapter:      {store.adapter_dir(a.name) if a.adapter else 'none'}\nfiles:")
        for f in a.files:
            print(f"  {f['name']:24} {f['bytes']:>9,} bytes  {f['chunks']:4} passages  sha256 {f['sha256'][:12]}")
        return asdict(a)
    store.delete(cfg.name)
    print(f"assistant {cfg.name} deleted")
    return {"deleted": cfg.name}


def plot_needle(result: dict, out_png: Path) -> Path:
    """Heatmaps of needle accuracy (depth x document length), paging beside truncation."""
    plt = pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8), sharey=True)
    for ax, method in zip(axes, ("paging", "truncation")):
        grid = result[method]
        lengths = sorted(grid)
        depths = sorted(grid[lengths[0]])
        values = [[grid[length][d] for length in lengths] for d in depths]
        im = ax.imshow(values, vmin=0, vmax=1, cmap="RdYlGn", aspect="auto")
        ax.set_xticks(range(len(lengths)), [f"{length:g}x" for length in lengths])
        ax.set_yticks(range(len(depths)), [f"{d:.0%}" for d in depths])
        for i, row in enumerate(values):
            for j, v in enumerate(row):
                ax.text(j, i, f"{v:.0%}", ha="center", va="center", fontsize=8)
        ax.set_xlabel(f"document length (x the {result['context_len']}-token context)")
        ax.set_title(method)
    axes[0].set_ylabel("needle depth")
    fig.colorbar(im, ax=axes, label="accuracy")
    fig.savefig(out_png, dpi=120, bbox_inches="tight")
    plt.close(fig)
    return out_png


def evaluate(cfg: Config) -> dict:
    """`llmlab assistant eval` (see the module docstring)."""
    ckpt = checkpoints.load(cfg.checkpoint)
    tok = ckpt.require_tokenizer("the assistant measurements (the chat format)")
    engine, world = Engine(ckpt.model), worlds.load(cfg.world)
    index = index_maker(cfg.embedder)
    out = Path(cfg.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    packs = {p: evals.pack_accuracy(engine, tok, world, cfg.k, p, index=index) for p in ("question", "seen")}
    packs["free"] = evals.pack_accuracy(engine, tok, world, cfg.k, "question", extractive=False, index=index)
    print(f"knowledge packs: {packs['question']['with_files']:.1%} with files, "
          f"{packs['question']['without_files']:.1%} without ({packs['question']['n']} questions in other words "
          f"than the files'); {packs['seen']['with_files']:.1%} in the files' words; "
          f"{packs['free']['with_files']:.1%} with answers in the model's own words")
    hay = evals.needle(engine, tok, world, per_cell=cfg.needles, k=cfg.k, index=index)
    longest = max(hay["paging"])
    print("needle at {:g}x the context: paging {:.0%}, truncation {:.0%}".format(
        longest, *(sum(hay[m][longest].values()) / len(hay[m][longest]) for m in ("paging", "truncation"))))
    memory = evals.memory_recall(engine, tok, world, n=cfg.memory_n)
    print("memory recall, " + ", ".join(f"{N} turns back: {memory['memory'][N]:.0%} (truncation "
                                        f"{memory['truncation'][N]:.0%})" for N in memory["memory"]))
    plot_needle(hay, out / "needle.png")
    results = {"checkpoint": str(ckpt.path), "retrieval": f"hybrid: BM25 and {cfg.embedder}" if cfg.embedder else "BM25",
               "packs": packs, "needle": hay, "memory": memory}
    write_atomic(out / "results.json", json.dumps(results, indent=1, default=str).encode())
    write_atomic(out / "report.md", report(results).encode())
    print(f"-> {out / 'report.md'}")
    return {k: v for k, v in results.items() if k != "packs"} | {
        "packs": {p: {k: v for k, v in r.items() if k != "rows"} for p, r in packs.items()}}


def _pct(x: float) -> str:
    return f"{x:.0%}"


def report(results: dict) -> str:
    q, s, free = results["packs"]["question"], results["packs"]["seen"], results["packs"]["free"]
    lines = [f"# Custom assistants: {results['checkpoint']}", "",
             f"## Knowledge packs ({q['n']} questions; top {q['k']} passages of {results.get('retrieval', 'BM25')} paged in)", "",
             "| pack | with files | without files |", "|---|---|---|"]
    lines += [f"| {p} | {_pct(r['with_files'])} | {_pct(r['without_files'])} |" for p, r in q["packs"].items()]
    lines += [f"| all, other words than the files' | {_pct(q['with_files'])} | {_pct(q['without_files'])} |",
              f"| all, the files' words | {_pct(s['with_files'])} | {_pct(s['without_files'])} |",
              f"| all, other words, answers in the model's own words, not the passage's | {_pct(free['with_files'])} | "
              f"{_pct(free['without_files'])} |", "",
              "Answers are the passage's own words, the span the model finds likeliest (llmlab.assistants.reader); "
              "the last row lets the model write them.", "",
              f"Retrieval recall@{q['k']}: {_pct(q['recall'])}; faithfulness (the answer is in the passage it cites): "
              f"{_pct(q['faithfulness'])}.", "",
              "## Needle in a haystack", "", "![needle](needle.png)", ""]
    hay = results["needle"]
    lengths = sorted(hay["paging"])
    lines += ["| method | " + " | ".join(f"{length:g}x" for length in lengths) + " |",
              "|---|" + "---|" * len(lengths)]
    for m in ("paging", "truncation"):
        lines.append(f"| {m} | " + " | ".join(_pct(sum(hay[m][n].values()) / len(hay[m][n])) for n in lengths) + " |")
    mem = results["memory"]
    lines += ["", "## Memory: a fact told N turns earlier", "",
              "| method | " + " | ".join(str(n) for n in mem["memory"]) + " |", "|---|" + "---|" * len(mem["memory"])]
    lines += [f"| {m} | " + " | ".join(_pct(v) for v in mem[m].values()) + " |" for m in ("memory", "truncation")]
    lines += [f"| answered from memory, asked what it does not hold | " +
              " | ".join(_pct(v) for v in mem["false_recall"].values()) + " |"]
    return "\n".join(lines) + "\n"
