"""Corpus sources (text, JSONL/parquet through `datasets`, the world), mixing, the packing loader, and token shards."""

import json
import random

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from llmlab import checkpoint, presets
from llmlab.data import Mixture, PackedLoader, open_source, parse_corpus
from llmlab.data.shards import INDEX, ShardLoader, write_shards
from llmlab.errors import LLMLabError
from llmlab.tokenizer import train_tokenizer

WORDS = "the quick brown fox jumps over a lazy dog while seven wizards quietly hex bad jugglers".split()


def _doc(i: int) -> str:
    return f"document {i}: " + " ".join(WORDS[(i + k) % len(WORDS)] for k in range(5 + i % 7))


@pytest.fixture(scope="module")
def tok():
    return train_tokenizer([_doc(i) for i in range(300)], vocab_size=320)


def _jsonl(path, docs, key="text"):
    path.write_text("".join(json.dumps({key: d, "id": i}) + "\n" for i, d in enumerate(docs)))
    return path


def test_text_file_splits_90_10_and_folders_recurse(tmp_path):
    f = tmp_path / "a.txt"
    f.write_text("x" * 900 + "y" * 100)
    src = open_source(str(f))
    assert list(src.documents("train")) == ["x" * 900] and list(src.documents("val")) == ["y" * 100]
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "b.md").write_text("z" * 10)
    assert len(list(open_source(str(tmp_path)).documents("train"))) == 2


@pytest.mark.parametrize("fmt", ["jsonl", "parquet"])
def test_records_through_datasets_every_100th_is_val(tmp_path, fmt):
    docs = [_doc(i) for i in range(250)]
    if fmt == "jsonl":
        path = _jsonl(tmp_path / "c.jsonl", docs)
    else:
        path = tmp_path / "c.parquet"
        pq.write_table(pa.table({"text": docs, "n": list(range(250))}), path)
    src = open_source(str(path))
    val = list(src.documents("val"))
    assert val == [docs[99], docs[199]]
    assert list(src.documents("train")) == [d for i, d in enumerate(docs) if i % 100 != 99]


def test_hf_specs_take_the_same_path(monkeypatch):
    calls = []
    import datasets

    monkeypatch.setattr(datasets, "load_dataset", lambda *a, **k: calls.append((a, k)) or iter([{"text": "hi"}]))
    src = open_source("hf:someone/corpus:sample-10BT")
    assert list(src.documents("train")) == ["hi"]
    assert calls == [(("someone/corpus", "sample-10BT"), {"split": "train", "streaming": True})]


def test_bad_corpora_give_clear_errors(tmp_path):
    with pytest.raises(LLMLabError, match="does not exist"):
        open_source(str(tmp_path / "missing.txt"))
    with pytest.raises(LLMLabError, match="has no 'text' column \\(columns: content, id\\)"):
        list(open_source(str(_jsonl(tmp_path / "d.jsonl", ["a"], key="content"))).documents("train"))
    bad = tmp_path / "latin1.txt"
    bad.write_bytes("caf\xe9".encode("latin-1"))
    with pytest.raises(LLMLabError, match="not UTF-8 \\(bad byte at offset 3\\)"):
        list(open_source(str(bad)).documents("train"))
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    with pytest.raises(LLMLabError, match="has no documents in split train"):
        next(Mixture(parse_corpus(str(empty))).documents("train"))
    records = tmp_path / "empty.jsonl"
    records.write_text("")
    with pytest.raises(LLMLabError, match="is empty"):
        parse_corpus(str(records))
    (tmp_path / "broken.jsonl").write_text('{"text": "ok"}\n{not json\n')
    with pytest.raises(LLMLabError, match="cannot"):
        list(open_source(str(tmp_path / "broken.jsonl")).documents("train"))
    (tmp_path / "numbers.jsonl").write_text('{"text": 5}\n' * 3)
    with pytest.raises(LLMLabError, match="record 0 has a int in its 'text' column, not a string"):
        list(open_source(str(tmp_path / "numbers.jsonl")).documents("train"))
    with pytest.raises(LLMLabError, match="weight must be positive"):
        parse_corpus(f"{tmp_path / 'latin1.txt'}*0")
    with pytest.raises(LLMLabError, match="no world at"):
        open_source(f"world:{tmp_path}")


def test_mixture_follows_weights_and_seed(tmp_path):
    a = _jsonl(tmp_path / "a.jsonl", [f"a{i}" for i in range(50)])
    b = _jsonl(tmp_path / "b.jsonl", [f"b{i}" for i in range(50)])
    mix = Mixture(parse_corpus(f"{a}*3,{b}*1"), seed=0)
    it = mix.documents("train")
    first = [next(it) for _ in range(400)]
    share = sum(d.startswith("a") for d in first) / len(first)
    assert 0.68 < share < 0.82
    assert first == [d for d, _ in zip(Mixture(parse_corpus(f"{a}*3,{b}*1"), seed=0).documents("train"), range(400))]
    assert first != [d for d, _ in zip(Mixture(parse_corpus(f"{a}*3,{b}*1"), seed=1).documents("train"), range(400))]


def _loader(tmp_path, tok, **kw):
    path = tmp_path / "docs.jsonl"
    if not path.exists():
        _jsonl(path, [_doc(i) for i in range(120)])
    return PackedLoader(Mixture(parse_corpus(str(path)), seed=0), tok, **kw)


def test_rows_are_the_bos_joined_stream(tmp_path, tok):
    loader = _loader(tmp_path, tok, batch_size=3, seq_len=16)
    stream = []
    for i in range(120):
        if i % 100 != 99:
            stream += [tok.bos_id] + tok.encode(_doc(i))
    x, y = loader.next_batch()
    x2, _ = loader.next_batch()
    assert x.shape == y.shape == (3, 16) and x.dtype == torch.int64
    assert torch.equal(x[:, 1:], y[:, :-1])
    flat = torch.cat([x, x2]).flatten().tolist()
    assert flat == stream[: 6 * 16]  # stride T: every token is a target exactly once


def test_resume_gives_exactly_the_next_batches_across_epochs(tmp_path, tok):
    loader = _loader(tmp_path, tok, batch_size=4, seq_len=32)
    for _ in range(25):  # past the end of the corpus: the second epoch has begun
        loader.next_batch()
    state = json.loads(json.dumps(loader.state_dict()))  # it must survive JSON
    expected = [loader.next_batch() for _ in range(10)]
    restored = _loader(tmp_path, tok, batch_size=4, seq_len=32)
    restored.load_state_dict(state)
    for (x, y), (rx, ry) in zip(expected, (restored.next_batch() for _ in range(10))):
        assert torch.equal(x, rx) and torch.equal(y, ry)
    with pytest.raises(LLMLabError, match="rows of 32 tokens"):
        _loader(tmp_path, tok, batch_size=4, seq_len=16).load_state_dict(state)


def test_two_ranks_together_are_the_single_process_batch(tmp_path, tok):
    single = _loader(tmp_path, tok, batch_size=6, seq_len=16)
    ranks = [_loader(tmp_path, tok, batch_size=3, seq_len=16, rank=r, world_size=2) for r in (0, 1)]
    for _ in range(5):
        x, _ = single.next_batch()
        r0, _ = ranks[0].next_batch()
        r1, _ = ranks[1].next_batch()
        interleaved = torch.stack([r0, r1], dim=1).reshape(6, 16)
        assert torch.equal(x, interleaved)


def test_val_batches_are_fixed(tmp_path, tok):
    loader = _loader(tmp_path, tok, batch_size=2, seq_len=4)  # one val document (record 99): a few short rows
    first = loader.val_batches(3)
    assert sum(x.size(0) for x, _ in first) == 3
    assert all(torch.equal(a[0], b[0]) for a, b in zip(first, loader.val_batches(3)))
    short = tmp_path / "short.txt"
    short.write_text("tiny")
    with pytest.raises(LLMLabError, match="val split has fewer than"):
        PackedLoader(Mixture(parse_corpus(str(short))), tok, 2, 64, split="val").val_batches(4)


def test_fine_tuning_rereads_pretraining_documents_on_a_fixed_schedule_and_resumes(tmp_path, tok):
    from llmlab.data.conversations import ConversationLoader
    from llmlab.training import IGNORE_INDEX

    chats = [[{"role": "user", "content": _doc(i)}, {"role": "assistant", "content": _doc(i + 1)}] for i in range(40)]
    conversations = _jsonl(tmp_path / "chats.jsonl", chats, key="messages")
    texts = _jsonl(tmp_path / "docs.jsonl", [_doc(100 + i) for i in range(30)])

    def loader():
        return ConversationLoader(Mixture(parse_corpus(str(conversations), column="messages")), tok, 4, 48,
                                  replay=Mixture(parse_corpus(str(texts))), replay_frac=0.25)

    a = loader()
    inputs, targets = a.next_batch()
    # rows 0-2 are conversations (user tokens masked), row 3 the first pretraining document, trained throughout
    for r in range(3):
        assert (targets[r] == IGNORE_INDEX).sum() > 0 and inputs[r, 0] == tok.bos_id
    doc = ([tok.bos_id] + tok.encode(_doc(100)))[:49]
    n = len(doc) - 1
    assert inputs[3, :n].tolist() == doc[:-1] and targets[3, :n].tolist() == doc[1:]
    assert (targets[3, n:] == IGNORE_INDEX).all()
    assert a.state_dict() == {"drawn": 3, "skipped": 0, "replayed": 1, "rows": 4, "batch_size": 4, "world_size": 1}

    b = loader()
    b.load_state_dict(a.state_dict())
    for _ in range(3):
        (x1, y1), (x2, y2) = a.next_batch(), b.next_batch()
        assert torch.equal(x1, x2) and torch.equal(y1, y2)
    assert a.replayed == 4 and a.drawn - a.skipped == 12

    with pytest.raises(LLMLabError, match="replay"):
        ConversationLoader(Mixture(parse_corpus(str(conversations), column="messages")), tok, 4, 48, replay_frac=0.5)


def test_length_grouping_pads_less_serves_the_same_rows_and_resumes_mid_group(tmp_path, tok):
    from llmlab.data.conversations import ConversationLoader
    from llmlab.errors import LLMLabError

    rng = random.Random(0)
    chats = [[{"role": "user", "content": " ".join(["word"] * rng.randint(1, 30))},
              {"role": "assistant", "content": "ok"}] for _ in range(400)]
    conversations = _jsonl(tmp_path / "chats.jsonl", chats, key="messages")

    def loader(group: int, rank: int = 0, world: int = 1, batch: int = 4) -> ConversationLoader:
        return ConversationLoader(Mixture(parse_corpus(str(conversations), column="messages")), tok, batch, 64,
                                  rank, world, group_batches=group)

    def rows(x: torch.Tensor) -> list[tuple]:
        return [tuple(t for t in r.tolist() if t != tok.pad_id) for r in x]

    plain, grouped = loader(1), loader(8)
    a = [plain.next_batch()[0] for _ in range(16)]
    b = [grouped.next_batch()[0] for _ in range(16)]
    assert sorted(r for x in a for r in rows(x)) == sorted(r for x in b for r in rows(x))  # the same conversations
    assert sum(x.numel() for x in b) < 0.8 * sum(x.numel() for x in a)  # in fewer padded tokens
    assert plain.state_dict()["drawn"] == grouped.state_dict()["drawn"]

    # resumed mid-group, the next batches are the same; two ranks split each global batch of the group
    c = loader(8)
    for _ in range(3):
        c.next_batch()
    state = c.state_dict()
    assert state["served"] == 3 and state["drawn"] == 0
    d = loader(8)
    d.load_state_dict(state)
    for _ in range(8):
        assert torch.equal(c.next_batch()[0], d.next_batch()[0])
    halves = [rows(loader(8, rank, 2).next_batch()[0]) for rank in (0, 1)]
    assert sorted(halves[0] + halves[1]) == sorted(rows(loader(8, batch=8).next_batch()[0]))
    with pytest.raises(LLMLabError, match="group"):
        loader(4).load_state_dict(state)


# ---- token shards (`llmlab tokenize`): the packing loader's rows, written once -----------------------------

@pytest.fixture
def corpus(tmp_path):
    path = tmp_path / "docs.jsonl"
    path.write_text("".join(json.dumps({"text": _doc(i)}) + "\n" for i in range(300)))
    return str(path)


def _write(corpus, tok, out, **kw):
    return write_shards(Mixture(parse_corpus(corpus), seed=0), tok, out, kw.pop("train_tokens", 6000), 0, corpus,
                        kw.pop("shard_tokens", 700), **kw)


def test_shards_give_the_packing_loaders_rows_on_every_rank_and_resume(corpus, tok, tmp_path):
    index = _write(corpus, tok, tmp_path / "shards")
    assert len(index["splits"]["train"]["shards"]) > 5 and index["splits"]["train"]["tokens"] >= 6000
    assert index["dtype"] == "uint16"  # (a vocabulary of 320)
    for rank, world in ((0, 1), (0, 2), (1, 2)):
        packed = PackedLoader(Mixture(parse_corpus(corpus), seed=0), tok, 3, 32, rank, world)
        sharded = ShardLoader(tmp_path / "shards", tok, 3, 32, 0, rank, world)
        for step in range(25):  # rows that cross shard files' ends included
            if step == 12:  # resumed from the state of step 12
                state = sharded.state_dict()
                sharded = ShardLoader(tmp_path / "shards", tok, 3, 32, 0, rank, world)
                sharded.load_state_dict(state)
            for a, b in zip(packed.next_batch(), sharded.next_batch()):
                assert a.dtype == b.dtype == torch.int64 and torch.equal(a, b), (rank, world, step)
    val_packed = PackedLoader(Mixture(parse_corpus(corpus), seed=0), tok, 4, 32, split="val").val_batches(10)
    val_sharded = ShardLoader(tmp_path / "shards", tok, 4, 32, 0, split="val").val_batches(10)
    assert len(val_packed) == len(val_sharded) >= 1
    assert all(torch.equal(a, b) for pa, pb in zip(val_packed, val_sharded) for a, b in zip(pa, pb))


def test_a_killed_write_resumes_to_the_same_files(corpus, tok, tmp_path):
    whole = _write(corpus, tok, tmp_path / "whole")
    written = []

    def dies(n):
        written.append(n)
        if len(written) == 3:
            raise KeyboardInterrupt("killed")

    with pytest.raises(KeyboardInterrupt):
        _write(corpus, tok, tmp_path / "cut", progress=dies)
    assert len(json.loads((tmp_path / "cut" / INDEX).read_text())["splits"]["train"]["shards"]) == 3
    assert _write(corpus, tok, tmp_path / "cut") == whole
    for shard in whole["splits"]["train"]["shards"] + whole["splits"]["val"]["shards"]:
        assert (tmp_path / "cut" / shard["file"]).read_bytes() == (tmp_path / "whole" / shard["file"]).read_bytes()


def test_shards_refuse_what_they_cannot_serve(corpus, tok, tmp_path):
    _write(corpus, tok, tmp_path / "shards", train_tokens=1000)
    loader = ShardLoader(tmp_path / "shards", tok, 4, 32, 0)
    with pytest.raises(LLMLabError, match="this run needs more; tokenize more"):
        for _ in range(20):
            loader.next_batch()
    other = train_tokenizer([_doc(i) for i in range(50)], vocab_size=300)
    with pytest.raises(LLMLabError, match="another tokenizer"):
        ShardLoader(tmp_path / "shards", other, 4, 32, 0)
    with pytest.raises(LLMLabError, match="--seed 0, this run has --seed 1"):
        ShardLoader(tmp_path / "shards", tok, 4, 32, 1)
    with pytest.raises(LLMLabError, match="another corpus, seed, tokenizer or length"):
        _write(corpus, tok, tmp_path / "shards", train_tokens=2000)
    index = json.loads((tmp_path / "shards" / INDEX).read_text())
    index["splits"]["val"]["done"] = False  # a write stopped before its end
    (tmp_path / "shards" / INDEX).write_text(json.dumps(index))
    with pytest.raises(LLMLabError, match="not finished"):
        ShardLoader(tmp_path / "shards", tok, 4, 32, 0)
    (tmp_path / "shards" / INDEX).write_text('{"format": "llmlab token shards v1", "splits": {}}')
    with pytest.raises(LLMLabError, match="damaged or not a shard index"):
        ShardLoader(tmp_path / "shards", tok, 4, 32, 0)


def test_pretraining_on_shards_is_pretraining_on_the_corpus(tiny_world_dir, tmp_path):
    from llmlab.stages import pretrain, tokenize, tokenizer

    cfg = presets.tiny(str(tmp_path / "run"))
    cfg.tokenizer.corpus = tiny_world_dir
    tokenizer.main(cfg.tokenizer)
    base = dict(tokenizer=cfg.tokenizer.out_dir, max_steps=6, save_every=3, eval_every=3, threads=1, device="cpu")
    tokenize.main(tokenize.Config(corpus=tiny_world_dir, tokenizer=cfg.tokenizer.out_dir,
                                  out_dir=str(tmp_path / "shards"), train_tokens=6 * 4 * 128 + 1, shard_tokens=500))
    runs = {}
    for name, corpus in (("corpus", tiny_world_dir), ("shards", str(tmp_path / "shards"))):
        stage = pretrain.Config(**{**vars(cfg.pretrain), **base, "corpus": corpus, "out_dir": str(tmp_path / name)})
        runs[name] = pretrain.main(stage)
    assert runs["corpus"]["loss"] == runs["shards"]["loss"] and runs["corpus"]["val_bpb"] == runs["shards"]["val_bpb"]
    a, b = (checkpoint.load(tmp_path / name).model.state_dict() for name in ("corpus", "shards"))
    assert all(torch.equal(a[k], b[k]) for k in a)
