"""Reward-model overoptimization, measured (Gao, Schulman & Hilton 2022): optimising a proxy reward model past a
point makes the gold reward fall while the proxy keeps rising.

Proxies are reward models trained on few of the world's comparisons (N training pairs of `llmlab rm` drawn at
random, for each N of --proxy_pairs). Against each:

  best-of-n   the cpu assistant samples 64 replies to each held-out prompt; for n = 1, 2, 4, ..., 64 the reply
              the proxy scores best is kept (averaged over the 64/n disjoint groups of n); KL = log n - (n-1)/n
  RL          `llmlab rl --reward rm:PROXY` without a KL penalty; the proxy and the gold reward of the same
              rollouts, and the KL to the reference per reply, are logged every step

Both rewards are taken relative to the assistant's own (n = 1, step 0), against d = sqrt(KL); Gao's forms are
fitted by least squares: best-of-n gold = d (alpha - beta d), RL gold = d (alpha - beta log d). Prints alpha and
beta per proxy and where the gold reward peaks; writes OUT/overoptimization.json and OUT/overoptimization.png.
Run after `make speedrun` and `llmlab rm` (which writes the comparisons):
    python bench/overoptimization.py [--run runs/cpu] [--proxy_pairs 150,600]
"""

from __future__ import annotations

import argparse
import json
import math
import random
import sys
import time
from pathlib import Path

import numpy as np

from llmlab import checkpoint
from llmlab.alignment.pairs import sample_replies
from llmlab.alignment.rollouts import ModelReward
from llmlab.chat import render_prompt
from llmlab.data.preferences import write_jsonl
from llmlab.engine import Engine, SamplingParams
from llmlab.optim import OptimConfig
from llmlab.stages import rl, rm
from llmlab.tasks.gold import GoldTask
from llmlab.tools import tool_runner
from llmlab.training import read_metrics


def fit(d: np.ndarray, gold: np.ndarray, form: str) -> tuple[float, float]:
    """alpha, beta of gold = d (alpha - beta d) ("bon") or d (alpha - beta log d) ("rl"), least squares."""
    second = d * d if form == "bon" else d * np.log(np.maximum(d, 1e-9))
    A = np.stack([d, -second], axis=1)
    (alpha, beta), *_ = np.linalg.lstsq(A, gold, rcond=None)
    return float(alpha), float(beta)


def best_of_n(sampled, proxy: ModelReward, tok) -> dict:
    """Gold and proxy of the proxy's best of n, relative to n = 1, for n = 1..64 (powers of two)."""
    prompts, rows = [], []
    for example, scored in sampled:
        p = render_prompt(tok, example.meta["messages"])
        for ids, gold, _, finished in scored:
            prompts.append(p)
            rows.append((ids, gold, finished))
    scores = proxy(None, prompts, [ids for ids, _, _ in rows], [f for _, _, f in rows])
    k = len(sampled[0][1])
    gold = np.array([g for _, g, _ in rows]).reshape(len(sampled), k)
    prox = np.array(scores).reshape(len(sampled), k)
    out = {"n": [], "kl": [], "gold": [], "proxy": []}
    n = 1
    while n <= k:
        g, p = gold[:, :k // n * n].reshape(len(sampled), -1, n), prox[:, :k // n * n].reshape(len(sampled), -1, n)
        best = p.argmax(axis=2)
        out["n"].append(n)
        out["kl"].append(math.log(n) - (n - 1) / n)
        out["gold"].append(float(np.take_along_axis(g, best[..., None], 2).mean()))
        out["proxy"].append(float(np.take_along_axis(p, best[..., None], 2).mean()))
        n *= 2
    out["gold"] = [x - out["gold"][0] for x in out["gold"]]
    out["proxy"] = [x - out["proxy"][0] for x in out["proxy"]]
    return out


def rl_curve(metrics_path: Path, every: int = 10) -> dict:
    """Proxy and gold reward of the rollouts and the KL per reply, averaged over bins of `every` steps, relative
    to the first bin."""
    rows = [r for r in read_metrics(metrics_path) if "gold_reward" in r]
    out = {"step": [], "kl": [], "gold": [], "proxy": []}
    for start in range(0, len(rows), every):
        b = rows[start:start + every]
        out["step"].append(b[-1]["step"])
        out["kl"].append(float(np.mean([r.get("kl_per_reply", 0.0) for r in b])))
        out["gold"].append(float(np.mean([r["gold_reward"] for r in b])))
        out["proxy"].append(float(np.mean([r["reward"] for r in b])))
    out["gold"] = [x - out["gold"][0] for x in out["gold"]]
    out["proxy"] = [x - out["proxy"][0] for x in out["proxy"]]
    out["kl"] = [max(x - out["kl"][0], 0.0) for x in out["kl"]]
    return out


def plot(results: dict, out_png: Path) -> None:
    import matplotlib  # deferred: slow to import

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4), dpi=110)
    for ax, kind in zip(axes, ("best_of_n", "rl")):
        for i, (name, r) in enumerate(results["proxies"].items()):
            c = r[kind]
            d = np.sqrt(c["kl"])
            ax.plot(d, c["gold"], "o-", color=f"C{i}", label=f"gold, proxy of {name} pairs")
            ax.plot(d, c["proxy"], "--", color=f"C{i}", alpha=0.6, label=f"proxy ({name} pairs)")
            alpha, beta = r[f"{kind}_fit"]
            xs = np.linspace(1e-3, max(d.max(), 1e-3), 50)
            fitted = xs * (alpha - beta * (xs if kind == "best_of_n" else np.log(xs)))
            ax.plot(xs, fitted, ":", color=f"C{i}", lw=1)
        ax.set_title("best-of-n" if kind == "best_of_n" else "RL (no KL penalty)")
        ax.set_xlabel("d = sqrt(KL to the assistant)")
        ax.set_ylabel("reward relative to the assistant's")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out_png)
    plt.close(fig)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--run", default="runs/cpu", help="a speedrun's directory: sft/, world/, rm/pairs/")
    ap.add_argument("--out", default="", help="where results go (default RUN/overoptimization)")
    ap.add_argument("--proxy_pairs", default="150,600", help="training pairs of each proxy reward model")
    ap.add_argument("--samples", type=int, default=64, help="replies per prompt for best-of-n")
    ap.add_argument("--prompts_per_family", type=int, default=8, help="held-out prompts per family for best-of-n")
    ap.add_argument("--rl_steps", type=int, default=120)
    args = ap.parse_args()
    run = Path(args.run)
    pairs_file = run / "rm" / "pairs" / "train.jsonl"
    if not checkpoint.has_checkpoint(run / "sft") or not pairs_file.is_file():
        print(f"SKIPPED: needs {run}/sft (make speedrun) and {pairs_file} (llmlab rm)", file=sys.stderr)
        return 3
    out = Path(args.out or run / "overoptimization")
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    world = str(run / "world")
    assistant = checkpoint.load(run / "sft")
    tok = assistant.tokenizer
    task = GoldTask(world, "heldout", args.prompts_per_family)
    tool = tool_runner(world)
    sampled = sample_replies(Engine(assistant.model), tok, task, args.samples,
                             SamplingParams(max_new_tokens=96, temperature=1.0, seed=1), tool)
    all_pairs = [json.loads(line) for line in pairs_file.read_text().splitlines() if line.strip()]
    random.Random(0).shuffle(all_pairs)  # the file lists prompts family by family: a proxy's few pairs mix them
    results: dict = {"prompts": len(sampled), "samples": args.samples, "proxies": {}}
    for n_pairs in [int(x) for x in args.proxy_pairs.split(",")]:
        name = str(n_pairs)
        subset = write_jsonl(out / f"pairs-{n_pairs}.jsonl", all_pairs[:n_pairs])
        proxy_dir = out / f"proxy-{n_pairs}"
        rm.main(rm.Config(policy=str(run / "sft"), world=world, pairs=str(subset),
                          heldout=str(run / "rm" / "pairs" / "heldout.jsonl"), out_dir=str(proxy_dir), batch_size=16,
                          max_steps=max(n_pairs // 8, 20), warmdown_frac=0.5, momentum_warmup_steps=0, eval_every=0,
                          save_every=0, optim=OptimConfig(muon_lr=0.005, embed_lr=0.01, head_lr=0.005, scalar_lr=0.005)))
        proxy = ModelReward(checkpoint.load_model(proxy_dir), tok)
        bon = best_of_n(sampled, proxy, tok)
        rl_dir = out / f"rl-{n_pairs}"
        rl.main(rl.Config(policy=str(run / "sft"), world=world, reward=f"rm:{proxy_dir}", out_dir=str(rl_dir),
                          beta=0.0, temperature=1.0, group_size=8, batch_size=8, max_steps=args.rl_steps,
                          scale_advantages=True, warmdown_frac=0.0, momentum_warmup_steps=0, eval_every=0,
                          save_every=0, judge_per_family=0, max_kl=1e9,
                          optim=OptimConfig(muon_lr=0.004, embed_lr=0.01, head_lr=0.001, scalar_lr=0.001)))
        curve = rl_curve(rl_dir / "metrics.jsonl")
        accuracy = json.loads((proxy_dir / "rm_eval.json").read_text())["heldout"]["accuracy"]
        results["proxies"][name] = {
            "heldout_accuracy": accuracy, "best_of_n": bon, "rl": curve,
            "best_of_n_fit": fit(np.sqrt(bon["kl"]), np.array(bon["gold"]), "bon"),
            "rl_fit": fit(np.sqrt(curve["kl"]), np.array(curve["gold"]), "rl")}
    results["seconds"] = time.perf_counter() - t0
    (out / "overoptimization.json").write_text(json.dumps(results, indent=2) + "\n")
    plot(results, out / "overoptimization.png")
    print(f"\n{len(sampled)} held-out prompts, {args.samples} replies each; rewards relative to the assistant's")
    for name, r in results["proxies"].items():
        for kind in ("best_of_n", "rl"):
            c = r[kind]
            peak = int(np.argmax(c["gold"]))
            alpha, beta = r[f"{kind}_fit"]
            print(f"proxy of {name} pairs (held-out accuracy {100 * r['heldout_accuracy']:.1f}%), {kind}: alpha {alpha:.3f}, "
                  f"beta {beta:.3f}; gold peaks at d={math.sqrt(c['kl'][peak]):.2f} ({c['gold'][peak]:+.3f}) and ends at "
                  f"{c['gold'][-1]:+.3f}; proxy ends at {c['proxy'][-1]:+.3f}")
    print(f"-> {out / 'overoptimization.png'} ({results['seconds']:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
