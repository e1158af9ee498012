"""EleutherAI's lm-evaluation-harness (`lm-eval`) as a real client of `llmlab serve`, on a task built from the world.

The task: "Q: In which city was <person> born?\\nA:" for the world's training people, with the true birth city and
three other cities of the world as choices (`multiple_choice`: lm-eval scores each choice's log-likelihood through
`/v1/completions` with `echo` and `logprobs`), and the same questions as `generate_until` (greedy, exact match).
The task files (a YAML per task and one JSONL dataset, `dataset_path: json`) are written under --out; nothing is
downloaded.

The server runs in this process (uvicorn in a thread, on a free loopback port); lm-eval's `local-completions` model
talks to it over HTTP. Then the same figures are computed directly with the model: the sum of the log-softmax of
each choice's tokens after the context, and greedy decoding. They should agree: same log-likelihoods (up to float
noise), same ranking, same accuracy.

Tokenization. lm-eval tokenizes itself and sends token ids (`tokenized_requests=True`): it needs the context's
length in tokens to cut the echoed logprobs, so its tokens must be the server's. A string prompt gets `<|bos|>`
prepended by the server; the checkpoint's tokenizer.json adds nothing, so lm-eval's `add_bos_token=True` would
do nothing. This script therefore hands lm-eval a copy of the tokenizer whose post-processor prepends `<|bos|>`
(Hugging Face `TemplateProcessing`), so that lm-eval sends `[bos] + encode(text)`, exactly what the model was
trained on and what the direct computation scores. (`tokenized_requests=False` sends text instead; the server
then prepends `<|bos|>` that lm-eval did not count, and every score is shifted by one token.)

    python bench/lm_eval_world.py                                 # runs/cpu/base, 100 people
    python bench/lm_eval_world.py --checkpoint runs/cpu/sft --people 50 --no_generate
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import socket
import threading
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, Sequence

import torch

from llmlab.errors import LLMLabError

MC_TASK, GEN_TASK = "world_birth_city", "world_birth_city_gen"


# ---- the task: a JSONL dataset and lm-eval task YAMLs --------------------------------------------------------


GROUPS = {"train-seen": ("train", "seen"), "train-heldout": ("train", "heldout"), "heldout-seen": ("heldout", "seen")}
"""--group: whose birth city is asked (people trained on, or held-out people whose facts were only in biographies)
and in which phrasing (one seen in pretraining's Q/A pages, or a held-out one); as in llmlab.tasks.world_qa"""


def birth_city_docs(world_dir: str | Path, people: int, seed: int = 0, group: str = "train-seen") -> list[dict]:
    """The birth-city questions of the world's eval set for the first `people` people of `group`, each with the
    true city and 3 other cities of the world as choices, in a seeded random order."""
    world_dir = Path(world_dir)
    cities = sorted(c["name"] for c in json.loads((world_dir / "world.json").read_text())["cities"])
    rows = [json.loads(line) for line in (world_dir / "eval" / "qa.jsonl").read_text().splitlines() if line.strip()]
    who, phrasing = GROUPS[group]
    rows = [r for r in rows if r["attribute"] == "birth_city" and r["group"] == who and r["phrasing"] == phrasing]
    if len(cities) < 4 or not rows:
        raise LLMLabError(f"{world_dir} has {len(cities)} cities and {len(rows)} birth-city questions: need 4 and 1")
    rng = random.Random(seed)
    docs = []
    for r in rows[:people]:
        choices = rng.sample([c for c in cities if c != r["answer"]], 3) + [r["answer"]]
        rng.shuffle(choices)
        docs.append({"person": r["person"], "question": r["question"], "answer": r["answer"], "choices": choices,
                     "gold": choices.index(r["answer"])})
    return docs


def context(doc: dict) -> str:
    """The prompt both tasks give (lm-eval's `doc_to_text`); choices follow after a space."""
    return f"Q: {doc['question']}\nA:"


def write_tasks(docs: list[dict], out_dir: str | Path, max_gen_toks: int = 16) -> Path:
    """Write out_dir/tasks/: the dataset (JSONL) and one YAML per task, for `TaskManager(include_path=...)`."""
    task_dir = Path(out_dir) / "tasks"
    task_dir.mkdir(parents=True, exist_ok=True)
    shutil.rmtree(task_dir / "hf_cache", ignore_errors=True)  # datasets' cache of an earlier dataset file
    data = (task_dir / "birth_city.jsonl").resolve()
    data.write_text("".join(json.dumps(d) + "\n" for d in docs))
    # Written as JSON, which is YAML: no quoting rules to get wrong. `doc_to_text` must say the same as context().
    common = {"dataset_path": "json",
              "dataset_kwargs": {"data_files": {"test": str(data)}, "cache_dir": str(task_dir.resolve() / "hf_cache")},
              "test_split": "test", "doc_to_text": "Q: {{question}}\nA:", "metadata": {"version": 1}}
    mc = {"task": MC_TASK, **common, "output_type": "multiple_choice", "doc_to_choice": "{{choices}}",
          "doc_to_target": "{{gold}}", "target_delimiter": " ",
          "metric_list": [{"metric": "acc", "aggregation": "mean", "higher_is_better": True},
                          {"metric": "acc_norm", "aggregation": "mean", "higher_is_better": True}]}
    gen = {"task": GEN_TASK, **common, "output_type": "generate_until", "doc_to_target": "{{answer}}",
           "generation_kwargs": {"until": ["\n"], "max_gen_toks": max_gen_toks, "do_sample": False, "temperature": 0},
           "filter_list": [{"name": "strip", "filter": [{"function": "remove_whitespace"},
                                                        {"function": "take_first"}]}],
           "metric_list": [{"metric": "exact_match", "aggregation": "mean", "higher_is_better": True}]}
    for task in (mc, gen):
        (task_dir / f"{task['task']}.yaml").write_text(json.dumps(task, indent=2) + "\n")
    return task_dir


def tokenizer_with_bos(ckpt_dir: str | Path, out_dir: str | Path) -> Path:
    """A copy of the checkpoint's Hugging Face tokenizer that prepends <|bos|> when asked for special tokens."""
    ckpt_dir, out_dir = Path(ckpt_dir), Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    spec = json.loads((ckpt_dir / "tokenizer.json").read_text())
    bos = json.loads((ckpt_dir / "tokenizer_config.json").read_text())["bos_token"]
    bos_id = next(t["id"] for t in spec["added_tokens"] if t["content"] == bos)
    special = {"SpecialToken": {"id": bos, "type_id": 0}}
    spec["post_processor"] = {"type": "TemplateProcessing",
                              "single": [special, {"Sequence": {"id": "A", "type_id": 0}}],
                              "pair": [special, {"Sequence": {"id": "A", "type_id": 0}},
                                       {"Sequence": {"id": "B", "type_id": 1}}],
                              "special_tokens": {bos: {"id": bos, "ids": [bos_id], "tokens": [bos]}}}
    (out_dir / "tokenizer.json").write_text(json.dumps(spec))
    shutil.copy(ckpt_dir / "tokenizer_config.json", out_dir / "tokenizer_config.json")
    return out_dir


# ---- the server, in this process ---------------------------------------------------------------------------


@contextmanager
def serving(app) -> Iterator[str]:
    """uvicorn serving `app` on a free loopback port in a daemon thread; yields the base URL."""
    import uvicorn

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 60
    while not server.started:
        if time.monotonic() > deadline or not thread.is_alive():
            raise RuntimeError("the server did not start")
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=30)


# ---- lm-eval -----------------------------------------------------------------------------------------------


def run_lm_eval(url: str, model_name: str, tokenizer_dir: str | Path, task_dir: str | Path, tasks: list[str],
                max_length: int, num_concurrent: int = 4, batch_size: int = 1) -> dict:
    """lm-eval's `local-completions` model against `url`; returns simple_evaluate's results (samples logged)."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    import lm_eval
    from lm_eval.tasks import TaskManager

    model_args = {"base_url": f"{url}/v1/completions", "model": model_name, "tokenizer": str(tokenizer_dir),
                  "tokenizer_backend": "huggingface", "tokenized_requests": True, "add_bos_token": True,
                  "max_length": max_length, "num_concurrent": num_concurrent, "batch_size": batch_size,
                  "max_retries": 1}
    return lm_eval.simple_evaluate(model="local-completions", model_args=model_args, tasks=tasks,
                                   task_manager=TaskManager(include_path=str(task_dir), include_defaults=False),
                                   log_samples=True, bootstrap_iters=1000)


def lm_eval_loglikelihoods(results: dict, n_docs: int) -> list[list[float]]:
    """Per document (by doc_id), the log-likelihood lm-eval got for each choice."""
    out: list[list[float]] = [[] for _ in range(n_docs)]
    for sample in results["samples"][MC_TASK]:
        out[sample["doc_id"]] = [float(r[0][0]) for r in sample["resps"]]
    return out


def lm_eval_generations(results: dict, n_docs: int) -> list[str]:
    out = [""] * n_docs
    for sample in results["samples"][GEN_TASK]:
        out[sample["doc_id"]] = sample["filtered_resps"][0]
    return out


# ---- the same figures directly from the model --------------------------------------------------------------


def choice_loglikelihoods(model, tok, docs: list[dict]) -> list[list[float]]:
    """Sum of log-softmax of each choice's tokens after `[bos] + context`, tokenized as lm-eval does: the whole
    `context + " " + choice` is encoded and the context's tokens are cut off the front."""
    rows, spans = [], []
    for doc in docs:
        ctx = [tok.bos_id] + tok.encode(context(doc))
        for choice in doc["choices"]:
            whole = [tok.bos_id] + tok.encode(context(doc) + " " + choice)
            rows.append(whole)
            spans.append((len(ctx), len(whole)))
    width = max(len(r) for r in rows)
    ids = torch.tensor([r + [tok.pad_id] * (width - len(r)) for r in rows])  # right padding: causal, so harmless
    with torch.inference_mode():
        logprobs = torch.log_softmax(model(ids).float(), dim=-1)  # (N, T, V)
    scores = []
    for row, (start, end) in enumerate(spans):
        targets = ids[row, start:end]
        scores.append(logprobs[row, start - 1:end - 1].gather(-1, targets[:, None]).sum().item())
    k = len(docs[0]["choices"])
    return [scores[i:i + k] for i in range(0, len(scores), k)]


def greedy_answers(model, tok, docs: list[dict], stop_ids: Sequence[int], max_new: int = 16) -> list[str]:
    """Greedy continuation of `[bos] + context`, ended by a token of `stop_ids` and cut at the first newline
    (lm-eval's `until`: a newline and the tokenizer's eos token), stripped."""
    out = []
    with torch.inference_mode():
        for doc in docs:
            ids = [tok.bos_id] + tok.encode(context(doc))
            new: list[int] = []
            while len(new) < max_new and len(ids) < model.config.context_len:
                nxt = int(model(torch.tensor([ids]))[0, -1].argmax())
                if nxt in stop_ids:
                    break
                ids.append(nxt)
                new.append(nxt)
                if "\n" in tok.decode(new):
                    break
            out.append(tok.decode(new).split("\n")[0].strip())
    return out


def mc_accuracy(lls: list[list[float]], docs: list[dict]) -> dict:
    """acc (argmax log-likelihood) and acc_norm (divided by the choice's length in characters), as lm-eval."""
    acc = sum(_argmax(scores) == d["gold"] for scores, d in zip(lls, docs)) / len(docs)
    norm = sum(_argmax([s / len(c) for s, c in zip(scores, d["choices"])]) == d["gold"]
               for scores, d in zip(lls, docs)) / len(docs)
    return {"acc": acc, "acc_norm": norm}


def _argmax(xs: list[float]) -> int:
    """The first index of the largest value, as numpy's argmax (lm-eval's) breaks ties."""
    return max(range(len(xs)), key=xs.__getitem__)


# ---- main ----------------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="\n\n".join(__doc__.split("\n\n")[1:]))
    p.add_argument("--checkpoint", default="runs/cpu/base", help="checkpoint to serve (a run stage or a step dir)")
    p.add_argument("--world", default="runs/cpu/world", help="world directory (world.json, eval/qa.jsonl)")
    p.add_argument("--people", type=int, default=100, help="people of --group to ask about (one question each)")
    p.add_argument("--group", default="train-seen", choices=sorted(GROUPS),
                   help="people trained on or held out, asked in a seen or a held-out phrasing")
    p.add_argument("--seed", type=int, default=0, help="seed of the distractor cities and their order")
    p.add_argument("--out", default="runs/lm_eval", help="where the task files, tokenizer copy and results go")
    p.add_argument("--num_concurrent", type=int, default=4, help="lm-eval's concurrent HTTP requests")
    p.add_argument("--batch_size", type=int, default=1, help="prompts per lm-eval request")
    p.add_argument("--no_generate", action="store_true", help="only the multiple-choice task")
    args = p.parse_args(argv)

    started = time.perf_counter()
    from llmlab import checkpoint
    from llmlab.server.app import ServerConfig, create_app

    out = Path(args.out)
    ckpt = checkpoint.resolve(args.checkpoint)
    name = "-".join(ckpt.parts[-3:-1])  # runs/cpu/base/step-000300 -> cpu-base
    docs = birth_city_docs(args.world, args.people, args.seed, args.group)
    task_dir = write_tasks(docs, out)
    hf_tok = tokenizer_with_bos(ckpt, out / "tokenizer")
    tasks = [MC_TASK] if args.no_generate else [MC_TASK, GEN_TASK]

    app = create_app(ServerConfig(checkpoint=str(ckpt), db=str(out / "feedback.db"), model_name=name,
                                  world=args.world, tools=False))
    context_len = app.state.service.context_len
    with serving(app) as url:
        t0 = time.perf_counter()
        results = run_lm_eval(url, name, hf_tok, task_dir, tasks, context_len, args.num_concurrent, args.batch_size)
        lm_eval_s = time.perf_counter() - t0

    t0 = time.perf_counter()
    loaded = checkpoint.load(ckpt)
    model, tok = loaded.model, loaded.require_tokenizer("the in-process comparison")
    direct_lls = choice_loglikelihoods(model, tok, docs)
    direct = mc_accuracy(direct_lls, docs)
    if not args.no_generate:
        eos = json.loads((ckpt / "tokenizer_config.json").read_text())["eos_token"]  # lm-eval stops there too
        direct_gen = greedy_answers(model, tok, docs, stop_ids=[tok.bos_id, tok.special_id(eos)])
        direct["exact_match"] = sum(g == d["answer"] for g, d in zip(direct_gen, docs)) / len(docs)
    direct_s = time.perf_counter() - t0

    from lm_eval.utils import make_table

    print(make_table(results))
    harness_lls = lm_eval_loglikelihoods(results, len(docs))
    max_diff = max(abs(a - b) for la, lb in zip(harness_lls, direct_lls) for a, b in zip(la, lb))
    same_pick = sum(_argmax(la) == _argmax(lb) for la, lb in zip(harness_lls, direct_lls))
    harness = {k: results["results"][MC_TASK][f"{k},none"] for k in ("acc", "acc_norm")}
    if not args.no_generate:
        harness["exact_match"] = results["results"][GEN_TASK]["exact_match,strip"]
        harness_gen = lm_eval_generations(results, len(docs))
        same_gen = sum(a == b for a, b in zip(harness_gen, direct_gen))
    print(f"\n{name}: {len(docs)} birth-city questions ({args.group}), 4 choices each (chance 25%)")
    print(f"{'metric':<12} {'lm-eval via API':>16} {'in-process':>11}")
    for k in harness:
        print(f"{k:<12} {harness[k]:>16.4f} {direct[k]:>11.4f}")
    print(f"per-choice log-likelihoods: max |lm-eval - in-process| = {max_diff:.2e}; "
          f"same top choice on {same_pick}/{len(docs)}")
    if not args.no_generate:
        print(f"greedy answers: same text on {same_gen}/{len(docs)}")
        for i, (a, b) in enumerate(zip(harness_gen, direct_gen)):
            if a != b:
                print(f"  first difference, {docs[i]['question']!r}: lm-eval {a!r}, in-process {b!r}")
                break
    wall = time.perf_counter() - started
    print(f"wall time: {wall:.1f} s (lm-eval through the server {lm_eval_s:.1f} s, in-process {direct_s:.1f} s)")

    from importlib.metadata import version

    summary = {"checkpoint": str(ckpt), "model": name, "group": args.group, "n": len(docs), "lm_eval": harness,
               "in_process": direct, "max_abs_loglikelihood_diff": max_diff, "same_top_choice": same_pick,
               "wall_s": wall, "lm_eval_s": lm_eval_s, "in_process_s": direct_s, "lm_eval_version": version("lm_eval"),
               "lm_eval_results": results["results"], "lm_eval_config": results["config"]}
    path = out / f"results-{name}-{args.group}.json"
    path.write_text(json.dumps(summary, indent=2, default=str) + "\n")
    print(f"results: {path}")
    return summary


if __name__ == "__main__":
    main()
