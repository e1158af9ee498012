"""Beyond the demonstrator: RL against a checkable reward past the demonstrations an assistant imitated.

The task (llmlab/tasks/chain.py): two-step word problems solved with the calculator. The demonstrator writes
the right expression for five story templates and a systematically wrong one for two (its blind spot), about
70% right. This script

  1. writes the demonstrator's conversations for the training problems,
  2. fine-tunes the assistant (`--policy`, the cpu speedrun's by default) on them (`llmlab sft`),
  3. runs `llmlab rl --prompts chain --reward task:chain` from that fine-tuned model,
  4. scores the demonstrator, the fine-tuned model and the RL'd model on the same held-out problems,

and prints the three accuracies side by side, overall and on the blind spot (results in OUT/beyond.json).
Run it after `make speedrun`: python bench/beyond_demonstrator.py [--policy runs/cpu/sft] [--out runs/cpu/beyond]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from llmlab import checkpoint
from llmlab.alignment.judge import gold_replies
from llmlab.data.preferences import write_jsonl
from llmlab.optim import OptimConfig
from llmlab.stages import rl, sft
from llmlab.tasks.chain import BLIND, ChainTask, demonstration, demonstrator_accuracy, problems
from llmlab.tools import tool_runner


def accuracy(model, tok, task, world: str) -> dict:
    rows = gold_replies(model, tok, task, tool_runner(world))
    blind = [r for r in rows if r["family"] == "blind spot"]
    return {"all": sum(r["correct"] for r in rows) / len(rows), "blind spot": sum(r["correct"] for r in blind) / len(blind)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--policy", default="runs/cpu/sft", help="the assistant to fine-tune on the demonstrations")
    ap.add_argument("--world", default="runs/cpu/world", help="the world (for the tools)")
    ap.add_argument("--out", default="runs/cpu/beyond", help="where the demonstrations, checkpoints and results go")
    ap.add_argument("--demos", type=int, default=2800, help="demonstrations (problems of the train split)")
    ap.add_argument("--heldout", type=int, default=40, help="held-out problems per template")
    ap.add_argument("--sft_steps", type=int, default=300)
    ap.add_argument("--rl_steps", type=int, default=60)
    args = ap.parse_args()
    if not checkpoint.has_checkpoint(args.policy):
        print(f"SKIPPED: no assistant at {args.policy}: run `make speedrun` first (or pass --policy)", file=sys.stderr)
        return 3
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()

    train = problems("train", args.demos)
    demos = out / "demonstrations.jsonl"
    write_jsonl(demos, [{"messages": demonstration(p)} for p in train])
    held = problems("heldout", args.heldout * 7)
    print(f"demonstrations: {len(train)} problems, the demonstrator right on {100 * demonstrator_accuracy(train):.1f}%")

    sft_cfg = sft.Config(base=args.policy, data=str(demos), out_dir=str(out / "sft"), batch_size=16,
                         max_steps=args.sft_steps, warmdown_frac=0.5, momentum_warmup_steps=0, eval_every=0,
                         save_every=100, replay=args.world, replay_frac=0.125,
                         optim=OptimConfig(muon_lr=0.01, embed_lr=0.05, head_lr=0.002, scalar_lr=0.005))
    sft.main(sft_cfg)
    rl_cfg = rl.Config(policy=str(out / "sft"), world=args.world, prompts="chain", reward="task:chain",
                       out_dir=str(out / "rl"), prompts_per_family=100, temperature=1.5, group_size=8, batch_size=8,
                       max_steps=args.rl_steps, warmdown_frac=0.5, momentum_warmup_steps=0, eval_every=20,
                       save_every=20, eval_per_family=8, judge_per_family=0,
                       optim=OptimConfig(muon_lr=0.005, embed_lr=0.01, head_lr=0.001, scalar_lr=0.001))
    rl.main(rl_cfg)

    task = ChainTask("heldout", len(held))
    tuned, steered = checkpoint.load(out / "sft"), checkpoint.load(out / "rl")
    blind = [p for p in held if p["template"] in BLIND]
    result = {
        "demonstrator": {"all": demonstrator_accuracy(held), "blind spot": demonstrator_accuracy(blind)},
        "sft on the demonstrations": accuracy(tuned.model, tuned.tokenizer, task, args.world),
        "rl (task reward)": accuracy(steered.model, steered.tokenizer, task, args.world),
        "heldout_problems": len(held), "seconds": time.perf_counter() - t0,
    }
    (out / "beyond.json").write_text(json.dumps(result, indent=2) + "\n")
    print(f"\nheld-out problems: {len(held)} ({len(blind)} on the demonstrator's blind spot)")
    print(f"{'':28} {'all':>7} {'blind spot':>11}")
    for name in ("demonstrator", "sft on the demonstrations", "rl (task reward)"):
        r = result[name]
        print(f"{name:28} {100 * r['all']:6.1f}% {100 * r['blind spot']:10.1f}%")
    gain = result["rl (task reward)"]["all"] - result["demonstrator"]["all"]
    print(f"RL - demonstrator: {100 * gain:+.1f} points ({result['seconds']:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
