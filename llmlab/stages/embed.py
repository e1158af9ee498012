"""`llmlab embed`: train the dense retriever of custom assistants, and measure it beside BM25 and the hybrid.

    llmlab embed                                   runs/cpu/base -> runs/cpu/embed (checkpoint, retrieval.json)

The retriever is the pretrained model's backbone with an embedding head, trained through the one training loop
on question -> passage pairs of the world's people and of knowledge packs drawn with other seeds, by InfoNCE
(llmlab.assistants.embedder). It is measured on the world's own packs, asked in other words than their files',
among the passages of other draws of the same kinds of pack and the world's encyclopedia
(llmlab.assistants.retrieval.pack_benchmark): Recall@5 and nDCG@10 of BM25, dense and hybrid (reciprocal rank
fusion) ranking, in retrieval.json and printed as a table.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from llmlab import checkpoint
from llmlab.alignment.pairs import PairLoader
from llmlab.assistants.embedder import InfoNCE, embedder_from, encode_pairs, encoder, training_pairs
from llmlab.assistants.retrieval import BM25, Dense, Hybrid, evaluate, pack_benchmark
from llmlab.errors import LLMLabError
from llmlab.training import TrainConfig, fit, setup
from llmlab.world import load


@dataclass
class Config(TrainConfig):
    base: str = "runs/cpu/base"
    """the pretrained model whose backbone the embedder starts from (its tokenizer too)"""
    world: str = "runs/cpu/world"
    """the world whose people and knowledge packs make the training pairs and the benchmark"""
    out_dir: str = "runs/cpu/embed"
    dim: int = 64
    """width of the embedding"""
    temperature: float = 0.05
    """InfoNCE's temperature"""
    train_packs: int = 100
    """draws of knowledge packs (other seeds) whose questions, in the files' own words, are training pairs"""
    distractor_packs: int = 5
    """draws of knowledge packs (seeds no training uses) whose passages stand among the benchmark's"""
    max_words: int = 25
    """words per passage when files are chunked"""
    batch_size: int = 64
    max_steps: int = 300
    warmdown_frac: float = 0.5
    momentum_warmup_steps: int = 0
    eval_every: int = 100
    save_every: int = 100

    def __post_init__(self) -> None:
        super().__post_init__()
        for name in ("dim", "max_words"):
            if getattr(self, name) < 1:
                raise LLMLabError(f"--{name} must be positive (got {getattr(self, name)})")
        if self.temperature <= 0:
            raise LLMLabError(f"--temperature must be positive (got {self.temperature})")
        if self.batch_size < 2:
            raise LLMLabError(f"--batch_size must be at least 2: in-batch negatives need another pair (got {self.batch_size})")


def table(scores: dict[str, dict]) -> str:
    lines = ["| retriever | Recall@5 | nDCG@10 |", "|---|---|---|"]
    lines += [f"| {name} | {100 * s['recall@5']:.1f}% | {100 * s['ndcg@10']:.1f}% |" for name, s in scores.items()]
    return "\n".join(lines) + "\n"


def main(cfg: Config) -> dict:
    info = setup(cfg)
    source = checkpoint.load(cfg.base, info.device)
    tok = source.require_tokenizer("an embedder (it reads text)")
    world = load(cfg.world)
    T = source.model.config.context_len
    pairs = encode_pairs(training_pairs(world, cfg.train_packs, cfg.max_words, cfg.seed), tok, T)
    passages, questions = pack_benchmark(world, cfg.max_words, cfg.distractor_packs)
    texts = [c.text for c in passages]
    bm25 = BM25(texts)
    if info.is_main:
        print(f"embed: {len(pairs)} training pairs; benchmark: {len(questions)} questions over {len(passages)} passages")
    net = embedder_from(source.model, cfg.dim, cfg.seed)
    objective = InfoNCE(cfg.temperature)

    def scores() -> dict[str, dict]:
        dense = Dense(texts, encoder(net, tok))
        return {"BM25": evaluate(bm25, questions), "dense": evaluate(dense, questions),
                "hybrid": evaluate(Hybrid(bm25, dense), questions)}

    def validation(model) -> dict:
        s = scores()
        return {f"val_{name}_{k}": v for name, r in s.items() for k, v in r.items() if k != "n"}

    if cfg.max_steps > 0:
        loader = PairLoader(pairs, cfg.batch_size, tok.pad_id, "reward", cfg.seed, info.rank, info.world_size)
        fit(cfg, info, net, loader, evaluate=validation, objective=objective, step_metrics=objective.metrics,
            meta={"stage": "embed", "base": str(source.path), "pairs": len(pairs)}, tokenizer_path=source.path)
    result = {"pairs": len(pairs), "passages": len(passages), "questions": len(questions), "scores": scores(),
              "steps": cfg.max_steps}
    if info.is_main:
        Path(cfg.out_dir).mkdir(parents=True, exist_ok=True)
        (Path(cfg.out_dir) / "retrieval.json").write_text(json.dumps(result, indent=2) + "\n")
        print(table(result["scores"]), end="")
        print(f"embed: -> {cfg.out_dir}/retrieval.json")
    return result
