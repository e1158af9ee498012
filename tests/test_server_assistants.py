"""Custom assistants served by name: listed in /v1/models, answered with their instructions, the passages of
their files that match the question and only their own tools; unknown or deleted names get a clear 404."""

import openai
import pytest

from llmlab.assistants.store import AssistantStore
from llmlab.chat import render_prompt
from serving import LiveServer, make_app, make_checkpoint, make_tokenizer, script_the_model

FACTS = ("The Zorbel office opens at 08:15. Visitor badges at Zorbel are yellow. The car park has 40 spaces. "
         "The ferry to Quillmoor leaves from the north pier at 09:30. Lunch on Fridays is lentil soup.")


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    root = tmp_path_factory.mktemp("assistants")
    make_tokenizer(root / "tok")
    ckpt = make_checkpoint(root / "tok", root / "ckpt", context_len=256)
    (root / "facts.txt").write_text(FACTS)
    store = AssistantStore(root / "assistants")
    store.create("shop", "Answer from the passages.", [root / "facts.txt"], ["search"], max_words=8)
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


def test_the_assistant_reads_its_instructions_and_the_matching_passages_first(served):
    service, _, store = served
    shop = store.get("shop")
    messages = service.as_assistant(shop, [{"role": "user", "content": "When does the ferry to Quillmoor leave?"}])
    system = messages[0]["content"]
    assert messages[0]["role"] == "system" and system.startswith("Answer from the passages.")
    first = system.split("\n")[1]
    assert first.startswith("[facts.txt#") and "Quillmoor" in first
    assert len(render_prompt(service.tokenizer, messages)) <= service.context_len * 3 // 4
    long = [{"role": "user", "content": "ferry " * 150}]  # no room left: the passages give way
    assert service.as_assistant(shop, long)[0]["content"] == "Answer from the passages."


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
