"""A dense retriever made from llmlab's own model: the pretrained backbone with an embedding head, read at the
last token, trained contrastively on question -> passage pairs (a bi-encoder: questions and passages go
through the same network, apart).

Why the model's own backbone: it has read every name of the world and knows how its sentences go, which a
small encoder trained from scratch on a few thousand pairs would not; reading the embedding at the last token
(where a causal model has seen the whole text) is how decoder models are made into embedders (Neelakantan et al.
2022, "Text and Code Embeddings by Contrastive Pre-Training"; Wang et al. 2024, E5-Mistral). The head is a
scorer head of `dim` outputs (GPTConfig.num_labels), the reward model's layout with more outputs.

The loss is InfoNCE with in-batch negatives (van den Oord et al. 2018; Karpukhin et al. 2020, DPR): for a batch
of P pairs, the P x P cosine similarities over a temperature, and cross-entropy towards the diagonal, both
ways (question -> passage and passage -> question). A batch is laid out as the reward model's: the P questions,
then their P passages, with each row's last real token (llmlab.alignment.pairs.reward_batch).

Training pairs (`training_pairs`): questions of the world's training people in fine-tuning's phrasings, each
with a biography passage that states the fact; and questions in the files' own words (`Fact.seen`) of knowledge
packs drawn with other seeds (other companies, towns and courses), each with the passage that holds its
sentence. What is measured asks the world's own packs, in other words (`Fact.question`): names, values and
phrasings the training never showed.
"""

from __future__ import annotations

import random
from dataclasses import replace
from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

from llmlab import checkpoint
from llmlab.alignment.pairs import EncodedPair, right_padded
from llmlab.assistants.chunks import chunk_text
from llmlab.assistants.retrieval import BM25, Dense, Hybrid, Retriever
from llmlab.errors import LLMLabError
from llmlab.model import GPT
from llmlab.tokenizer import Tokenizer
from llmlab.world.core import World
from llmlab.world.packs import make_packs, pack_chunks
from llmlab.world.text import QUESTIONS, biography


def embedder_from(base: GPT, dim: int, seed: int = 0) -> GPT:
    """A GPT with `base`'s backbone and a fresh embedding head of `dim` outputs (no LM head)."""
    net = GPT(replace(base.config, num_labels=dim, tie_embeddings=False))
    state = {k: v for k, v in base.state_dict().items() if not k.startswith("lm_head")}
    missing, unexpected = net.load_state_dict(state, strict=False)
    assert missing == ["score.weight"] and not unexpected, (missing, unexpected)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():  # a random projection (a zero head, as a reward model's, would embed everything at 0)
        net.score.weight.copy_(torch.randn(net.score.weight.shape, generator=gen) / base.config.d_model**0.5)
    return net


def embed_rows(model: nn.Module, ids: torch.Tensor, last: torch.Tensor) -> torch.Tensor:
    """(B, dim) unit vectors: the head's output at each row's last real token."""
    out = model(ids)  # (B, T, dim)
    return F.normalize(out[torch.arange(ids.size(0)), last], dim=-1)


def encode_text(tok: Tokenizer, text: str, max_len: int) -> list[int]:
    return ([tok.bos_id] + tok.encode(text))[:max_len]


@torch.no_grad()
def encoder(model: GPT, tok: Tokenizer, batch_size: int = 64):
    """`encode(texts) -> (n, dim)` unit vectors, for llmlab.assistants.retrieval.Dense."""
    T = model.config.context_len

    def encode(texts: list[str]) -> torch.Tensor:
        model.eval()
        out = []
        for i in range(0, len(texts), batch_size):
            ids, last = right_padded([encode_text(tok, t, T) for t in texts[i:i + batch_size]], tok.pad_id)
            out.append(embed_rows(model, ids, last))
        return torch.cat(out)

    return encode


def index_maker(embedder: str = "") -> Callable[[list[str]], Retriever]:
    """`index(passages) -> Retriever`: BM25 when `embedder` is empty, else the fusion of BM25 and the dense
    retriever of the embedder checkpoint at `embedder` (`llmlab embed`'s out_dir)."""
    if not embedder:
        return BM25
    ckpt = checkpoint.load(embedder)
    if ckpt.model.config.num_labels < 2:  # a language model has none, a reward model one
        raise LLMLabError(f"{ckpt.path} is not an embedder (it has no embedding head of several outputs): train one "
                          f"with `llmlab embed`")
    encode = encoder(ckpt.model.eval(), ckpt.require_tokenizer("an embedder (it reads text)"))
    return lambda passages: Hybrid(BM25(passages), Dense(passages, encode))


class InfoNCE:
    """The objective (llmlab.training.Objective) of a bi-encoder: symmetric in-batch InfoNCE at `temperature`.
    Every passage of the batch is a negative for every other question, so a batch is not split into parts."""

    def __init__(self, temperature: float = 0.05):
        self.temperature = temperature
        self.accuracy: list[float] = []

    def count(self, batch: tuple[torch.Tensor, ...]) -> int:
        return batch[0].size(0) // 2

    def loss_sum(self, model: nn.Module, batch: tuple[torch.Tensor, ...]) -> torch.Tensor:
        ids, last = batch[:2]  # (laid out as a reward model's batch, whose prior column is not used here)
        q, p = embed_rows(model, ids, last).chunk(2)
        logits = q @ p.T / self.temperature  # (P, P): question i against every passage of the batch
        labels = torch.arange(q.size(0))
        self.accuracy.append((logits.argmax(1) == labels).float().mean().item())
        return (F.cross_entropy(logits, labels, reduction="sum") + F.cross_entropy(logits.T, labels, reduction="sum")) / 2

    def metrics(self) -> dict:
        """The share of questions whose own passage scored highest in its batch, over the step's micro-batches."""
        acc, self.accuracy = self.accuracy, []
        return {"train_in_batch_top1": sum(acc) / len(acc)} if acc else {}


def training_pairs(world: World, n_packs: int, max_words: int, seed: int = 0) -> list[tuple[str, str]]:
    """(question, passage) pairs: the world's training people (every fact, fine-tuning's phrasings) and the
    knowledge packs of `n_packs` other draws (see the module docstring)."""
    rng = random.Random(f"{seed}-embedder-pairs")
    pairs = []
    for person in world.group("train"):
        chunks = chunk_text(biography(rng, person), "bio", max_words)
        for attribute, phrasings in QUESTIONS.items():
            answer = world.answer(person, attribute)
            holding = [c.text for c in chunks if answer in c.text] or [c.text for c in chunks]
            pairs.append((rng.choice(phrasings["seen"]).format(name=person.name), rng.choice(holding)))
    for draw in range(n_packs):
        for facts in make_packs(world, seed=1 + draw).values():
            chunks = pack_chunks(facts, max_words)
            for f in facts:
                pairs.append((f.seen, rng.choice([c.text for c in chunks if f.sentence in c.text])))
    rng.shuffle(pairs)
    return pairs


def encode_pairs(pairs: list[tuple[str, str]], tok: Tokenizer, max_len: int) -> list[EncodedPair]:
    """The pairs as the reward model's loader takes them: the question as `chosen`, its passage as `rejected`
    (read by InfoNCE as question and passage; no loss mask is used)."""
    return [EncodedPair((encode_text(tok, q, max_len), []), (encode_text(tok, p, max_len), []), "retrieval")
            for q, p in pairs]
