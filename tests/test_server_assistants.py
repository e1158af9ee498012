"""Custom assistants served by name: listed in /v1/models, answered from the passages of their files that
match the question (read one at a time, the answer cited) or else with their instructions, and only their own
tools; unknown or deleted names get a clear 404."""

import openai
import pytest

from llmlab.assistants.store import AssistantStore
from llmlab.errors import LLMLabError
from llmlab.scheduler import Scheduler
from serving import LiveServer, ScriptModel, make_app, make_checkpoint, make_tokenizer, reading_script, script_the_model

FACTS = ("The Zorbel office opens at 08:15. Visitor badges at Zorbel are yellow. The car park has 40 spaces. "
         "The ferry to Quillmoor leaves from the north pier at 09:30. Lunch on Fridays is lentil soup.")


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    root = tmp_path_factory.mktemp("assistants")
    make_tokenizer(root / "tok")
    ckpt = make_checkpoint(root / "tok", root / "ckpt", context_len=256)
    (root / "facts.txt").write_text(FACTS)
    store = AssistantStore(root / "assistants")
    store.create("shop", "Answer from the passages.", [root / "facts.txt"], ["search"], max_words=12)
    store.create("calc", "", [root / "facts.txt"], ["calculator"], max_words=8)
    app = make_app(ckpt, root / "feedback.db")
    service = app.state.service
    script_the_model(service)
    live = LiveServer(app)
    yield service, live, store
    live.stop()


def _client(live):
    return openai.OpenAI(base_url=live.url + "/v1", api_key="unused", max_retries=0, timeout=60)


def test_assistants_are_listed_and_answer_by_name(served):
    service, live, _ = served
    client = _client(live)
    ids = [m.id for m in client.models.list().data]
    assert ids == ["test-model", "calc", "shop"]
    assert client.models.retrieve("shop").model_dump()["tools"] == ["search"]
    reply = client.chat.completions.create(model="shop", messages=[{"role": "user", "content": "Hi"}])
    assert reply.model == "shop" and reply.choices[0].message.content == "Hello there. Fine."
    with pytest.raises(openai.NotFoundError, match="calc, shop"):
        client.chat.completions.create(model="nobody", messages=[{"role": "user", "content": "Hi"}])


def test_the_assistant_answers_from_the_passage_that_holds_the_answer(served):
    service, live, store = served
    service.scheduler.shutdown()
    service.scheduler = Scheduler(ScriptModel(service.tokenizer.vocab_size, reading_script(service.tokenizer),
                                              context_len=service.context_len), service.tokenizer, max_batch=8)
    try:
        client = _client(live)
        question = [{"role": "user", "content": "When does the ferry to Quillmoor leave?"}]
        reply = client.chat.completions.create(model="shop", messages=question)
        cited = reply.model_dump()["citations"][0]
        assert reply.choices[0].message.content == f"09:30 [facts.txt#{cited['passage']}]"
        assert cited["file"] == "facts.txt" and "Quillmoor" in cited["text"]
        stream = client.chat.completions.create(model="shop", messages=question, stream=True)
        assert "".join(c.choices[0].delta.content or "" for c in stream if c.choices) == reply.choices[0].message.content
        # a question no passage answers: the instructions lead the conversation, and the model answers it
        assert service.as_assistant(store.get("shop"), [{"role": "user", "content": "Hi"}])[0] == {
            "role": "system", "content": "Answer from the passages."}
        hi = client.chat.completions.create(model="shop", messages=[{"role": "user", "content": "Hi"}])
        assert hi.choices[0].message.content == "Hello there. Fine." and "citations" not in hi.model_dump()
    finally:
        script_the_model(service)


def test_only_the_assistants_own_tools_run(served):
    _, live, _ = served
    client = _client(live)
    calc = client.chat.completions.create(model="calc", messages=[{"role": "user", "content": "What is 6 * 7?"}])
    assert calc.choices[0].message.content == "It is 42."
    shop = client.chat.completions.create(model="shop", messages=[{"role": "user", "content": "What is 6 * 7?"}])
    assert "not enabled for shop" in shop.choices[0].message.content


def test_a_deleted_assistant_is_gone_for_new_requests_and_harmless_to_old_ones(served, tmp_path):
    service, live, store = served
    (tmp_path / "notes.md").write_text("# Notes\n\nThe gate code is 4471.")
    temp = store.create("temp", "", [tmp_path / "notes.md"], [])
    store.delete("temp")
    assert service.passages(temp, "gate code", 3) == []  # a request that named it before: no files, no crash
    with pytest.raises(openai.NotFoundError):
        _client(live).chat.completions.create(model="temp", messages=[{"role": "user", "content": "Hi"}])


def test_bad_assistants_from_the_web_ui_are_refused_and_nothing_is_created(served):
    import base64

    import httpx

    service, live, store = served
    api = httpx.Client(base_url=live.url, timeout=30)
    before = [a["name"] for a in api.get("/api/assistants").json()]
    on_disk = sorted(p.name for p in store.root.iterdir())
    good = base64.b64encode(FACTS.encode()).decode()
    for body, status, words in [
        ({"name": "a", "files": [{"name": "f.txt", "content": "%%% not base64"}]}, 400, "not base64"),
        ({"name": "b", "files": [{"name": "empty.txt", "content": ""}]}, 400, "is empty"),
        ({"name": "c", "files": [{"name": "x.docx", "content": good}]}, 400, "not a supported format"),
        ({"name": "Bad Name!", "files": [{"name": "f.txt", "content": good}]}, 400, "lowercase"),
        ({"name": "shop", "files": [{"name": "f.txt", "content": good}]}, 400, "already exists"),
        ({"name": "d", "files": [{"name": "..", "content": good}]}, 400, "bad file name"),
    ]:
        reply = api.post("/api/assistants", json=body)
        assert reply.status_code == status and words in reply.json()["error"]["message"], (body, reply.text)
    assert [a["name"] for a in api.get("/api/assistants").json()] == before
    assert sorted(p.name for p in store.root.iterdir()) == on_disk  # no folder, not even a half-made one
    # a reply naming an assistant that does not exist: a 404, and the conversation is left as it was
    cid = api.post("/api/conversations", json={}).json()["id"]
    reply = api.post(f"/api/conversations/{cid}/reply", json={"content": "Hi", "assistant": "nobody"})
    assert reply.status_code == 404 and "calc, shop" in reply.json()["error"]["message"]
    assert api.get(f"/api/conversations/{cid}").json()["messages"] == []


def test_an_assistant_with_an_adapter_answers_through_it_and_a_misfit_adapter_is_a_clear_400(tmp_path):
    """`assistant create --adapter`: the server answers the assistant through its LoRA adapter (as a model with
    the adapter merged in answers), the base and other assistants through the base, concurrently; an adapter
    for another base is refused at the first request with a 400, and the server keeps serving."""
    import threading

    import torch

    from llmlab import checkpoint
    from llmlab.lora import ALL_LINEAR, add_lora, lora_modules, merge_lora, save_adapter
    from llmlab.model import GPT, GPTConfig

    make_tokenizer(tmp_path / "tok")
    ckpt = make_checkpoint(tmp_path / "tok", tmp_path / "ckpt")
    model = checkpoint.load(ckpt).model
    add_lora(model, r=4, targets=ALL_LINEAR)
    for m in lora_modules(model).values():
        m.lora_B.weight.data.normal_(0, 1.0, generator=torch.Generator().manual_seed(3))
    save_adapter(model, tmp_path / "adapter")
    merged = checkpoint.save_checkpoint(tmp_path / "merged", 0, merge_lora(model), tokenizer_path=tmp_path / "tok",
                                        meta={"stage": "test"})
    other = GPT(GPTConfig(vocab_size=model.config.vocab_size, n_layer=2, d_model=16, n_head=2, n_kv_head=1,
                          context_len=128))
    add_lora(other, r=2)
    save_adapter(other, tmp_path / "other")
    store = AssistantStore(tmp_path / "assistants")
    store.create("tuned", adapter=tmp_path / "adapter")
    store.create("plain")
    store.create("misfit", adapter=tmp_path / "other")
    with pytest.raises(LLMLabError, match="no adapter at"):
        store.create("broken", adapter=tmp_path / "nowhere")
    assert [a.name for a in store.list()] == ["misfit", "plain", "tuned"]  # nothing half-made

    live = LiveServer(make_app(ckpt, tmp_path / "feedback.db", tools=False))
    reference = LiveServer(make_app(merged, tmp_path / "ref" / "feedback.db", tools=False))
    try:
        ask = [{"role": "user", "content": "Hello there, how are you?"}]

        def answer(server, model):
            return _client(server).chat.completions.create(model=model, messages=ask, temperature=0,
                                                            max_tokens=16).choices[0].message.content
        got: dict = {}
        threads = [threading.Thread(target=lambda m=m: got.__setitem__(m, answer(live, m)))
                   for m in ("tuned", "plain", "test-model", "tuned")]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert got["tuned"] == answer(reference, "test-model")  # through the adapter = the merged model
        assert got["plain"] == got["test-model"] != got["tuned"]
        assert _client(live).models.retrieve("tuned").model_dump()["adapter"] is True
        with pytest.raises(openai.BadRequestError, match="another base"):
            answer(live, "misfit")
        assert answer(live, "tuned") == got["tuned"]  # the server goes on
    finally:
        live.stop()
        reference.stop()
