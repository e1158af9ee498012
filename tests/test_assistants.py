"""Custom assistants: knowledge files as text, chunking, retrieval and its metrics, the world's knowledge packs."""

from __future__ import annotations

import json
import math

import pytest

from llmlab.assistants.chunks import chunk_text, sentences
from llmlab.assistants.files import read_text
from llmlab.assistants.retrieval import BM25, Dense, Hybrid, evaluate, ndcg_at_k, recall_at_k
from llmlab.errors import LLMLabError
from llmlab.world import load
from llmlab.world.packs import make_packs, write_pack, write_pdf

# ---- files -----------------------------------------------------------------------------------------------------


def test_each_format_reads_as_its_text(tmp_path):
    (tmp_path / "a.md").write_text("# Leave\n\nStaff get **25 days** of [paid leave](http://x).\n- Badges are `red`.\n")
    assert read_text(tmp_path / "a.md").split() == "Leave Staff get 25 days of paid leave. Badges are red.".split()
    (tmp_path / "b.jsonl").write_text('{"text": "One."}\n\n{"content": "Two."}\n')
    assert read_text(tmp_path / "b.jsonl") == "One.\nTwo."
    (tmp_path / "c.jsonl").write_text(json.dumps({"text": "A\u2028B\x85C"}, ensure_ascii=False) + "\n", encoding="utf-8")
    assert read_text(tmp_path / "c.jsonl") == "A\u2028B\x85C"  # a row is a line at "\n" only, not at U+2028
    long = " ".join(f"Sentence number {i} (of many) says\\ nothing." for i in range(200))
    write_pdf(tmp_path / "c.pdf", long, lines_per_page=20)  # several pages
    assert read_text(tmp_path / "c.pdf").split() == long.split()
    (tmp_path / "d.TXT").write_text("plain")
    assert read_text(tmp_path / "d.TXT") == "plain"


@pytest.mark.parametrize("name, content, match", [
    ("a.docx", b"PK\x03\x04", "not a supported format"),
    ("b.txt", b"", "is empty"),
    ("c.txt", b"\xff\xfe\x00bad", "not UTF-8"),
    ("d.jsonl", b'{"text": "ok"}\n{"text": \n', "line 2, is not JSON"),
    ("e.jsonl", b'{"title": "no text"}\n', "line 1: each row needs"),
    ("f.pdf", b"%PDF-1.4\nthis is not a pdf at all", "not a readable PDF"),
    ("g.md", b"   \n\n", "holds no text"),
])
def test_bad_files_are_refused_naming_the_file_and_the_fix(tmp_path, name, content, match):
    (tmp_path / name).write_bytes(content)
    with pytest.raises(LLMLabError, match=match) as e:
        read_text(tmp_path / name)
    assert name in str(e.value)


def test_a_scanned_pdf_and_an_oversized_file_and_a_missing_one(tmp_path):
    write_pdf(tmp_path / "scan.pdf", "")  # a page with no text layer
    with pytest.raises(LLMLabError, match="no text layer"):
        read_text(tmp_path / "scan.pdf")
    (tmp_path / "big.txt").write_text("x" * 5000)
    with pytest.raises(LLMLabError, match="over the limit"):
        read_text(tmp_path / "big.txt", max_bytes=4096)
    with pytest.raises(LLMLabError, match="no file at"):
        read_text(tmp_path / "missing.txt")


# ---- chunks ----------------------------------------------------------------------------------------------------

def test_chunks_hold_whole_sentences_within_the_budget_and_overlap_by_one():
    text = " ".join(f"Fact {i} is {'very ' * (i % 5)}true." for i in range(30))
    chunks = chunk_text(text, "f.txt", max_words=20, overlap=1)
    said = sentences(text)
    for s in said:  # every sentence whole in some passage
        assert any(s in c.text for c in chunks)
    assert all(len(c.text.split()) <= 20 for c in chunks) and [c.index for c in chunks] == list(range(len(chunks)))
    for a, b in zip(chunks, chunks[1:]):  # each starts with the last sentence of the one before
        assert sentences(b.text)[0] == sentences(a.text)[-1]
    assert chunks[0].cite == "f.txt#0"
    words = " ".join(f"w{i}" for i in range(50)) + "."
    pieces = chunk_text(words, "g.txt", max_words=16, overlap=0)
    assert all(len(p.text.split()) <= 16 for p in pieces) and {w for p in pieces for w in p.text.split()} == set(words.split())


# ---- retrieval -------------------------------------------------------------------------------------------------

def test_recall_and_ndcg_equal_their_definitions():
    assert recall_at_k([3, 1, 2], {1, 9}, 2) == 0.5 and recall_at_k([3, 1, 2], {1}, 1) == 0.0
    assert ndcg_at_k([3, 1, 2], {1}, 10) == pytest.approx(1 / math.log2(3))
    assert ndcg_at_k([1, 9, 2], {1, 9}, 10) == 1.0
    assert ndcg_at_k([2, 1, 9], {1, 9}, 10) == pytest.approx((1 / math.log2(3) + 1 / math.log2(4)) / (1 + 1 / math.log2(3)))


class Fixed:
    def __init__(self, order):
        self.order = order

    def rank(self, query, k):
        return self.order[:k]


def test_reciprocal_rank_fusion_rewards_agreement():
    # 2 is second in both rankings, 0 and 1 first in one and missing from the other: 2/62 beats 1/61
    assert Hybrid(Fixed([0, 2, 3]), Fixed([1, 2, 4]), depth=3).rank("q", 3) == [2, 0, 1]
    # first and third (1/61 + 1/63) edges out second twice (2/62): fusion keeps a strong vote
    assert Hybrid(Fixed([0, 2, 1]), Fixed([1, 2, 0]), depth=3).rank("q", 3) == [0, 1, 2]
    assert Hybrid(Fixed([5]), Fixed([]), depth=3).rank("q", 3) == [5]


def test_bm25_finds_the_rare_name_and_dense_ranks_by_cosine():
    import torch

    passages = ["Zorbaton is a city in Kelmia.", "The car park has 40 spaces.", "Bus 12 leaves at 07:15."]
    assert BM25(passages).rank("Where is Zorbaton?", 1) == [0]
    vectors = {p: torch.tensor(v) for p, v in zip(passages, ([1.0, 0.0], [0.0, 1.0], [0.7, 0.7]))}
    dense = Dense(passages, lambda texts: torch.stack([vectors.get(t, torch.tensor([0.1, 1.0])) for t in texts]))
    assert dense.rank("parking?", 3) == [1, 2, 0]
    scores = evaluate(dense, [("parking?", {1}), ("other", {0})], recall_k=1, ndcg_k=10)
    assert scores["recall@1"] == 0.5 and scores["n"] == 2


# ---- knowledge packs -------------------------------------------------------------------------------------------

def test_packs_state_each_fact_once_in_files_that_read_back(tiny_world_dir, tmp_path):
    world = load(tiny_world_dir)
    packs = make_packs(world)
    names = {p.name for p in world.people} | {c.name for c in world.cities} | {c.name for c in world.companies}
    other = make_packs(world, seed=1)
    for pack, facts in packs.items():
        write_pack(facts, tmp_path / pack)
        texts = {f.file: read_text(tmp_path / pack / f.file) for f in facts}
        for f in facts:
            assert f.answer in f.sentence and f.seen != f.question
            assert sum(" ".join(f.sentence.split()) in " ".join(t.split()) for t in texts.values()) == 1
            assert not any(n in f.sentence for n in names)
        rows = [json.loads(line) for line in (tmp_path / pack / "questions.jsonl").read_text().splitlines()]
        assert [r["question"] for r in rows] == [f.question for f in facts]
        assert [f.sentence for f in other[pack]] != [f.sentence for f in facts]  # another draw, other values
    assert {f.file.rsplit(".", 1)[1] for fs in packs.values() for f in fs} == {"md", "txt", "jsonl", "pdf"}


# ---- the dense retriever ---------------------------------------------------------------------------------------

def test_infonce_is_cross_entropy_towards_the_diagonal_both_ways():
    import torch
    import torch.nn.functional as F

    from llmlab.assistants.embedder import InfoNCE

    torch.manual_seed(0)
    vectors = torch.randn(6, 1, 8)

    class Table(torch.nn.Module):  # row i of the batch embeds to vectors[i]
        def forward(self, ids):
            return vectors[ids[:, 0]]

    ids, last = torch.arange(6)[:, None], torch.zeros(6, dtype=torch.long)
    objective = InfoNCE(temperature=0.5)
    got = objective.loss_sum(Table(), (ids, last))
    q, p = F.normalize(vectors[:3, 0], dim=-1), F.normalize(vectors[3:, 0], dim=-1)
    logits = q @ p.T / 0.5
    want = sum(-torch.log_softmax(logits, 1)[i, i] - torch.log_softmax(logits.T, 1)[i, i] for i in range(3)) / 2
    assert objective.count((ids, last)) == 3 and torch.allclose(got, want)
    assert 0 <= objective.metrics()["train_in_batch_top1"] <= 1 and objective.metrics() == {}


def test_embedder_keeps_the_backbone_and_the_stage_writes_the_retrieval_table(tiny_run, tmp_path):
    import torch

    from llmlab import checkpoint
    from llmlab.assistants.embedder import embedder_from, encoder, index_maker, training_pairs
    from llmlab.stages import embed

    cfg, _ = tiny_run
    base = checkpoint.load(cfg.pretrain.out_dir)
    net = embedder_from(base.model, 16)
    mine = net.state_dict()
    assert all(torch.equal(mine[k], v) for k, v in base.model.state_dict().items() if not k.startswith("lm_head"))
    assert mine["score.weight"].shape == (16, base.model.config.d_model) and mine["score.weight"].abs().sum() > 0
    vectors = encoder(net, base.tokenizer)(["Where does she live?", "The car park has 40 spaces."])
    assert vectors.shape == (2, 16) and torch.allclose(vectors.norm(dim=1), torch.ones(2))
    world = load(cfg.world.out_dir)
    pairs = training_pairs(world, n_packs=2, max_words=25)
    assert len(pairs) == 9 * len(world.group("train")) + 2 * sum(len(f) for f in make_packs(world).values())
    own = {f.question for facts in make_packs(world).values() for f in facts}
    assert not own & {q for q, _ in pairs}  # the measured questions are never trained on
    ecfg = embed.Config(base=cfg.pretrain.out_dir, world=cfg.world.out_dir, out_dir=str(tmp_path / "embed"),
                        dim=16, train_packs=2, distractor_packs=1, batch_size=8, max_steps=3, eval_every=0,
                        save_every=3, threads=1)
    result = embed.main(ecfg)
    saved = json.loads((tmp_path / "embed" / "retrieval.json").read_text())
    assert set(saved["scores"]) == {"BM25", "dense", "hybrid"} and saved["questions"] == result["questions"] > 0
    assert all(0 <= s["recall@5"] <= 1 and 0 <= s["ndcg@10"] <= 1 for s in saved["scores"].values())
    assert checkpoint.read_info(checkpoint.resolve(tmp_path / "embed"))["stage"] == "embed"
    # the index an assistant's files get (`llmlab serve --embedder`, `llmlab assistant eval --embedder`): BM25,
    # or its fusion with the embedder, which ranks a passage that shares no word with the question too
    passages = ["The car park has 40 spaces.", "Lunch is served at noon.", "Visitor badges are yellow."]
    assert index_maker("") is BM25 and BM25(passages).rank("What colour is a badge?", 3) == []
    hybrid = index_maker(str(tmp_path / "embed"))(passages)
    assert sorted(hybrid.rank("What colour is a badge?", 3)) == [0, 1, 2]
    assert hybrid.rank("How many spaces has the car park?", 1) == [0]  # both rankings put it first
    with pytest.raises(LLMLabError, match="not an embedder"):
        index_maker(cfg.pretrain.out_dir)


# ---- the store -------------------------------------------------------------------------------------------------

@pytest.fixture
def pack_files(tiny_world_dir, tmp_path):
    facts = make_packs(load(tiny_world_dir))["handbook"]
    write_pack(facts, tmp_path / "pack")
    return [tmp_path / "pack" / f for f in ("handbook.md", "policies.txt", "staff.jsonl")], facts


def test_assistants_are_created_listed_shown_and_deleted_from_the_command_line(pack_files, tmp_path, capsys):
    from llmlab import cli
    from llmlab.assistants.store import AssistantStore

    files, facts = pack_files
    root = tmp_path / "store"
    cli.main(["assistant", "create", "shop", "--store", str(root), "--instructions", "Answer about the handbook.",
              "--files", ",".join(map(str, files)), "--tools", "calculator,search"])
    store = AssistantStore(root)
    a = store.get("shop")
    assert a.tools == ["calculator", "search"] and [f["name"] for f in a.files] == [f.name for f in files]
    chunks = store.chunks("shop")
    assert sum(f["chunks"] for f in a.files) == len(chunks)
    for fact in facts:  # every sentence of the files is whole in a passage that cites its file
        assert any(fact.sentence in c.text and c.file == fact.file for c in chunks)
    cli.main(["assistant", "list", "--store", str(root)])
    assert "shop" in capsys.readouterr().out
    store.delete("shop")
    assert store.list() == [] and chunks  # what was loaded before stays usable
    with pytest.raises(LLMLabError, match="no assistant named 'shop'"):
        store.chunks("shop")


def test_bad_assistants_leave_nothing_behind(pack_files, tmp_path):
    from llmlab.assistants.store import AssistantStore

    files, _ = pack_files
    store = AssistantStore(tmp_path / "store")
    store.create("shop", files=files[:1])
    (tmp_path / "empty.txt").write_text("")
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "handbook.md").write_text("Another handbook.")
    for kwargs, match in [(dict(name="shop"), "already exists"), (dict(name="Shop!"), "lowercase"),
                          (dict(name="b", tools=["browser"]), "unknown tool"),
                          (dict(name="c", files=[files[0], tmp_path / "empty.txt"]), "is empty"),
                          (dict(name="d", files=[files[0], tmp_path / "other" / "handbook.md"]), "share a name"),
                          (dict(name="e", files=[tmp_path / "missing.md"]), "no file at")]:
        with pytest.raises(LLMLabError, match=match):
            store.create(**kwargs)
    assert [a.name for a in store.list()] == ["shop"] and sorted(p.name for p in store.root.iterdir()) == ["shop"]
    (store.root / "shop" / "assistant.json").write_text("{not json")
    with pytest.raises(LLMLabError, match="corrupt"):
        store.get("shop")


def test_an_assistant_with_a_corrupt_or_incomplete_adapter_is_refused_and_nothing_is_created(tmp_path):
    import shutil

    import torch
    from safetensors.torch import load_file, save_file

    from llmlab.assistants.store import AssistantStore
    from llmlab.lora import add_lora, save_adapter
    from llmlab.model import GPT, GPTConfig

    model = GPT(GPTConfig(vocab_size=64, n_layer=1, d_model=16, n_head=2, n_kv_head=1, context_len=32))
    add_lora(model, r=2)
    good = save_adapter(model, tmp_path / "good")
    corrupt = shutil.copytree(good, tmp_path / "corrupt")
    (corrupt / "adapter_model.safetensors").write_bytes(b"\x00" * 64)
    half = shutil.copytree(good, tmp_path / "half")
    tensors = load_file(str(good / "adapter_model.safetensors"))
    save_file({k: v for k, v in tensors.items() if "lora_B" not in k}, str(half / "adapter_model.safetensors"))
    store = AssistantStore(tmp_path / "assistants")
    for path, words in ((corrupt, "not a safetensors file"), (half, "A and B"), (tmp_path, "no adapter at")):
        with pytest.raises(LLMLabError, match=words):
            store.create("x", adapter=path)
    assert store.list() == [] and not (tmp_path / "assistants").exists()
    a = store.create("x", adapter=good)
    assert a.adapter and sorted(p.name for p in store.adapter_dir("x").iterdir()) == [
        "adapter_config.json", "adapter_model.safetensors", "llmlab_adapter.json"]
    assert torch.equal(load_file(str(store.adapter_dir("x") / "adapter_model.safetensors"))[next(iter(tensors))],
                       tensors[next(iter(tensors))])


def test_create_checks_an_adapter_against_the_checkpoint_that_will_serve_it(tmp_path, capsys):
    from llmlab import checkpoint, cli
    from llmlab.assistants.store import AssistantStore
    from llmlab.lora import add_lora, save_adapter
    from llmlab.model import GPT, GPTConfig

    def model(d_model):
        return GPT(GPTConfig(vocab_size=64, n_layer=1, d_model=d_model, n_head=2, n_kv_head=1, context_len=32))
    served = checkpoint.save_checkpoint(tmp_path / "ckpt", 0, model(16), tokenizer_path=None, meta={"stage": "test"})
    for name, d_model in (("fits", 16), ("misfit", 32)):
        adapted = model(d_model)
        add_lora(adapted, r=2)
        save_adapter(adapted, tmp_path / name)
    store = ["--store", str(tmp_path / "store"), "--checkpoint", str(served)]
    with pytest.raises(SystemExit):
        cli.main(["assistant", "create", "x", "--adapter", str(tmp_path / "misfit"), *store])
    assert "another base (d_model 32 vs 16" in capsys.readouterr().err
    assert AssistantStore(tmp_path / "store").list() == []
    cli.main(["assistant", "create", "x", "--adapter", str(tmp_path / "fits"), *store])
    assert AssistantStore(tmp_path / "store").get("x").adapter and "a LoRA adapter" in capsys.readouterr().out
