"""Custom assistants in the web UI, in a real browser: the form creates one from an uploaded file, the picker
chooses who answers, and an answer read from the assistant's files shows its citation and is stored under the
assistant's name. The model is scripted (tests/serving.py, `reading_script`): it reads a passage as the
fine-tuned assistant does, so what is checked is the page and the server, not a model's skill."""

from __future__ import annotations

import httpx
import pytest

from serving import LiveServer, make_app, make_checkpoint, make_tokenizer, reading_script
from test_webui import CHROMIUM, expect, page, reply, screenshot  # noqa: F401 (page is a fixture)

pytestmark = pytest.mark.skipif(not __import__("pathlib").Path(CHROMIUM).exists()
                                and not __import__("os").environ.get("CI"),
                                reason=f"no Chromium at {CHROMIUM}: install Debian's `chromium` package")

FACTS = "The Zorbel office opens at 08:15. The ferry to Quillmoor leaves from the north pier at 09:30."


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    from llmlab.scheduler import Scheduler

    from serving import ScriptModel

    root = tmp_path_factory.mktemp("webui-assistants")
    make_tokenizer(root / "tok")
    app = make_app(make_checkpoint(root / "tok", root / "ckpt", context_len=256), root / "feedback.db")
    service = app.state.service
    service.scheduler.shutdown()
    service.scheduler = Scheduler(ScriptModel(service.tokenizer.vocab_size, reading_script(service.tokenizer),
                                              context_len=service.context_len), service.tokenizer, max_batch=8)
    live = LiveServer(app)
    yield live, root
    live.stop()


def test_an_assistant_made_in_the_form_answers_from_its_file(server, page, tmp_path):
    live, root = server
    (tmp_path / "ferries.txt").write_text(FACTS)
    api = httpx.Client(base_url=live.url, timeout=10)
    page.goto(live.url + "/")
    picker = page.locator("[data-testid=assistant-picker]")
    expect(picker.locator("option")).to_have_count(1)  # the model alone

    # the form: a bad name is refused with the store's message and nothing is created
    page.click("[data-testid=new-assistant]")
    expect(page.locator("[data-testid=assistant-dialog]")).to_be_visible()
    page.fill("[data-testid=assistant-name]", "ferries")
    page.fill("[data-testid=assistant-instructions]", "Answer from the timetable.")
    page.set_input_files("[data-testid=assistant-files]", str(tmp_path / "ferries.txt"))
    page.check("#assistant-form input[value=calculator]")
    screenshot(page, tmp_path, "assistant-form")
    page.click("[data-testid=assistant-create]")
    expect(page.locator("[data-testid=assistant-dialog]")).to_be_hidden()
    made = api.get("/api/assistants").json()
    assert made == [{"name": "ferries", "instructions": "Answer from the timetable.", "tools": ["calculator"],
                     "files": ["ferries.txt"], "adapter": False}]
    expect(picker).to_have_value("ferries")  # the new assistant is picked

    page.click("[data-testid=new-assistant]")  # the same name again: the store's error, shown in the form
    page.fill("[data-testid=assistant-name]", "ferries")
    page.click("[data-testid=assistant-create]")
    expect(page.locator("[data-testid=assistant-error]")).to_contain_text("already exists")
    page.click("#assistant-cancel")
    assert len(api.get("/api/assistants").json()) == 1

    # the picked assistant answers from its file, cited; the answer is stored under its name
    page.fill("[data-testid=composer]", "When does the ferry to Quillmoor leave?")
    reply(page, lambda: page.press("[data-testid=composer]", "Enter"))
    cid = int(page.evaluate("location.hash").rsplit("/", 1)[1])
    stored = api.get(f"/api/conversations/{cid}").json()["messages"]
    cited = stored[-1]["settings"]["citation"]
    assert stored[-1]["model"] == "ferries" and cited["file"] == "ferries.txt" and "Quillmoor" in cited["text"]
    answer = page.locator("[data-testid=message-assistant]").last
    expect(answer.locator("[data-testid=message-text]")).to_have_text(f"09:30 [ferries.txt#{cited['passage']}]")
    expect(answer.locator("[data-testid=citation]")).to_have_text(f"ferries: from ferries.txt, passage {cited['passage']}")
    screenshot(page, tmp_path, "assistant-answer")

    # the picker back on the model: no reading, the model answers, stored under the model's name
    picker.select_option("")
    page.fill("[data-testid=composer]", "Hi")
    reply(page, lambda: page.press("[data-testid=composer]", "Enter"))
    stored = api.get(f"/api/conversations/{cid}").json()["messages"]
    assert stored[-1]["model"] == "test-model" and "citation" not in stored[-1]["settings"]
    # the choice survives a reload
    picker.select_option("ferries")
    page.reload()
    expect(page.locator("[data-testid=assistant-picker]")).to_have_value("ferries")
