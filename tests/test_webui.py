"""The web chat UI in a real browser (Playwright + Debian's Chromium) against the real server.

The model has random weights, so answers are gibberish: the test checks structure and what the server stored,
never words. One test walks the whole flow, since each step builds on the conversation of the one before:
streaming, a rating and a flag, compare mode and choosing, an error line, editing (with markup that must
stay text), regenerating, reloading, and the phone layout. Screenshots go to $LLMLAB_SCREENSHOT_DIR (else the
test's tmp_path) and to runs/screenshots/ in the repository, for people to look at.
"""

from __future__ import annotations

import os
import re
import shutil
from pathlib import Path

import httpx
import pytest

from serving import LiveServer, make_checkpoint, make_tokenizer

CHROMIUM = "/usr/bin/chromium"
REPO = Path(__file__).resolve().parents[1]
XSS = '<img src=x onerror="window.__xss = 1"><b>bold?</b>'

# In CI (`make test` installs Chromium) a missing browser is a failure, not a skip: the UI must be tested there.
pytestmark = pytest.mark.skipif(not Path(CHROMIUM).exists() and not os.environ.get("CI"),
                                reason=f"no Chromium at {CHROMIUM}: install Debian's `chromium` package")


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory) -> Path:
    tmp = tmp_path_factory.mktemp("webui")
    make_tokenizer(tmp / "tokenizer")
    return make_checkpoint(tmp / "tokenizer", tmp / "ckpt", context_len=512)  # room for six turns


def start_server(ckpt: Path, db: Path, api_key: str = "") -> LiveServer:
    from llmlab.server.app import ServerConfig, create_app

    with pytest.MonkeyPatch.context() as mp:
        mp.delenv("LLMLAB_API_KEY", raising=False)  # the key is the test's choice, not the environment's
        return LiveServer(create_app(ServerConfig(checkpoint=str(ckpt), db=str(db), api_key=api_key)))


@pytest.fixture(scope="module")
def server(ckpt):
    live = start_server(ckpt, ckpt.parent / "feedback.db")
    yield live
    live.stop()


@pytest.fixture
def page():
    sync_api = pytest.importorskip("playwright.sync_api")
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        page = browser.new_page(viewport={"width": 1280, "height": 800})
        page.set_default_timeout(15_000)
        errors = []
        page.on("pageerror", lambda e: errors.append(str(e)))
        # what the Content-Security-Policy blocked (a script, a style, an image the page needs)
        page.on("console", lambda m: errors.append(m.text) if "Content Security Policy" in m.text else None)
        yield page
        browser.close()
        assert not errors, f"JavaScript errors on the page: {errors}"


def expect(locator):
    """Playwright's `expect` (retrying assertions, not `wait_for_function`: that evaluates a string in the page,
    which the page's Content-Security-Policy forbids), imported when a test runs: the module collects without
    Playwright."""
    from playwright.sync_api import expect as playwright_expect

    return playwright_expect(locator)


def screenshot(page, tmp_path: Path, name: str) -> None:
    """Save to $LLMLAB_SCREENSHOT_DIR (else tmp_path) and to runs/screenshots/ in the repository."""
    out = Path(os.environ.get("LLMLAB_SCREENSHOT_DIR") or tmp_path)
    out.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(out / f"{name}.png"))
    keep = REPO / "runs" / "screenshots"
    keep.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(out / f"{name}.png", keep / f"{name}.png")


def reply(page, action) -> None:
    """Do `action` (which sends a reply request) and wait until its stream has been handled."""
    with page.expect_response("**/reply"):
        action()
    expect(page.locator("#app")).not_to_have_class(re.compile(r"\bbusy\b"))


def stored_messages(api: httpx.Client, cid: int) -> list[dict]:
    return api.get(f"/api/conversations/{cid}").raise_for_status().json()["messages"]


def test_chat_flow(server, page, tmp_path):
    api = httpx.Client(base_url=server.url, timeout=10)
    page.goto(server.url + "/")
    model = api.get("/v1/models").json()["data"][0]["id"]
    expect(page.locator("#model-name")).to_have_text(model)

    # settings: the server's defaults until changed; here short answers and greedy decoding, so the streamed
    # answer is the same every run
    page.click("[data-testid=settings] summary")
    expect(page.locator("#temperature")).to_have_value("0.7")
    assert page.input_value("[data-testid=top-p]") == "0.95" and page.input_value("[data-testid=max-tokens]") == "256"
    page.fill("[data-testid=max-tokens]", "24")
    page.fill("[data-testid=temperature]", "0")
    page.fill("[data-testid=system-prompt]", "You are a helpful assistant.")

    # send with Enter: the user's bubble, then an answer that streams in delta by delta
    page.fill("[data-testid=composer]", "Hello! What is the capital of France?")
    reply(page, lambda: page.press("[data-testid=composer]", "Enter"))
    cid = int(page.evaluate("location.hash").rsplit("/", 1)[1])
    stored = stored_messages(api, cid)
    assert [m["role"] for m in stored] == ["user", "assistant"]
    assert stored[1]["settings"]["temperature"] == 0 and stored[1]["settings"]["max_tokens"] <= 24
    # the page logs its answer's length after each delta event it renders (the server merges the tokens that
    # arrive together into one event; a 24-token answer has come in 15-21 events here)
    lengths = [e["length"] for e in page.evaluate("window.llmlab.streamLog")]
    assert len(lengths) >= 2 and lengths[0] > 0, f"the answer did not stream: {lengths}"
    assert lengths == sorted(lengths) and lengths[-1] > lengths[0]
    answer = page.locator(f"[data-testid=message-assistant][data-message-id='{stored[1]['id']}']")
    assert answer.locator("[data-testid=message-text]").text_content() == stored[1]["content"]
    assert page.locator("[data-testid=message-user] [data-testid=message-text]").text_content() == stored[0]["content"]
    assert page.locator("[data-testid=system-note]").is_visible()

    # thumbs down (shown as pressed and stored), then a flag with a reason and a better answer
    answer.locator("[data-testid=thumb-down]").click()
    page.wait_for_selector("[data-testid=thumb-down][aria-pressed=true]")
    answer.locator("[data-testid=flag]").click()
    page.fill("[data-testid=flag-reason]", "makes no sense")
    page.fill("[data-testid=flag-correction]", "Paris.")
    page.click("[data-testid=flag-submit]")
    page.wait_for_selector("[data-testid=flagged]")
    rated = stored_messages(api, cid)[1]
    assert rated["rating"] == -1
    assert [(f["reason"], f["correction"]) for f in rated["flags"]] == [("makes no sense", "Paris.")]

    # compare mode: two answers side by side (sampled, so they differ); choosing one keeps it, hides the other
    page.fill("[data-testid=temperature]", "1")
    page.check("[data-testid=compare-toggle]")
    page.fill("[data-testid=composer]", "Tell me more.")
    reply(page, lambda: page.click("[data-testid=send]"))
    pair = page.locator("[data-testid=compare] [data-testid=message-assistant]")
    assert pair.count() == 2 and page.locator("[data-testid=prefer]").count() == 2
    a, b = (int(pair.nth(i).get_attribute("data-message-id")) for i in range(2))
    assert page.locator("[data-testid=send]").is_disabled()  # pick first, then continue
    screenshot(page, tmp_path, "webui-desktop-compare")
    with page.expect_response("**/choose") as chosen:
        page.locator("[data-testid=prefer]").nth(1).click()
    assert chosen.value.json()["chosen"] == b
    page.wait_for_selector("[data-testid=compare]", state="detached")
    assert page.locator(f"[data-message-id='{a}']").count() == 0
    assert page.locator(f"[data-testid=message-assistant][data-message-id='{b}']").count() == 1
    assert [m["id"] for m in stored_messages(api, cid) if m["role"] == "assistant"] == [stored[1]["id"], b]
    page.uncheck("[data-testid=compare-toggle]")

    # a request the server refuses: its error message is shown inline
    page.fill("[data-testid=max-tokens]", "100000")
    page.fill("[data-testid=composer]", "This one fails.")
    reply(page, lambda: page.click("[data-testid=send]"))
    error = page.locator("[data-testid=error]")
    assert error.is_visible() and "max_tokens" in error.text_content()

    # edit the last user message into markup: it is shown as text, never run; the answer is redone
    page.fill("[data-testid=max-tokens]", "24")
    page.locator("[data-testid=message-user] [data-testid=edit]").last.click()
    page.fill("[data-testid=edit-input]", XSS)
    reply(page, lambda: page.click("[data-testid=edit-save]"))
    assert not error.is_visible(), error.text_content()
    assert page.locator("[data-testid=message-user] [data-testid=message-text]").last.text_content() == XSS
    assert page.locator("#thread img").count() == 0 and page.evaluate("window.__xss") is None
    messages = stored_messages(api, cid)
    assert [m["role"] for m in messages][-2:] == ["user", "assistant"] and messages[-2]["content"] == XSS

    # regenerate the last answer: a new stored message replaces it
    before = messages[-1]["id"]
    reply(page, lambda: page.locator("[data-testid=regenerate]").click())
    after = stored_messages(api, cid)[-1]["id"]
    assert after != before and page.locator(f"[data-message-id='{after}'] [data-testid=regenerate]").count() == 1
    assert page.locator("[data-testid=regenerate]").count() == 1  # only on the last answer

    # reload: the conversation is listed; opening it shows its messages with their rating and flag
    page.goto(server.url + "/")
    item = page.locator("[data-testid=conversation-item]", has_text="Hello! What is the capital")
    item.click()
    page.wait_for_selector(f"[data-message-id='{after}']")
    assert page.locator("[data-testid=message-user]").count() == len(messages) // 2
    assert page.locator("[data-testid=message-assistant]").count() == len(messages) // 2
    first = page.locator(f"[data-message-id='{stored[1]['id']}']")
    assert first.locator("[data-testid=thumb-down]").get_attribute("aria-pressed") == "true"
    assert first.locator("[data-testid=flagged]").is_visible()
    screenshot(page, tmp_path, "webui-desktop")

    # phone width: nothing wider than the screen; the sidebar hides behind the menu button
    page.set_viewport_size({"width": 390, "height": 844})
    assert page.evaluate("document.documentElement.scrollWidth <= innerWidth")
    assert not page.locator("[data-testid=sidebar]").is_visible()
    screenshot(page, tmp_path, "webui-phone")
    page.click("[data-testid=sidebar-toggle]")
    page.wait_for_selector("[data-testid=sidebar]", state="visible")
    page.wait_for_timeout(300)  # the slide-in animation
    screenshot(page, tmp_path, "webui-phone-sidebar")
    page.locator("[data-testid=new-chat]").click()
    page.wait_for_selector("[data-testid=sidebar]", state="hidden")
    assert page.locator("[data-testid=message-user]").count() == 0
    assert page.evaluate("document.documentElement.scrollWidth <= innerWidth")


def test_api_key_and_delete(ckpt, page, tmp_path):
    live = start_server(ckpt, tmp_path / "feedback.db", api_key="s3cret")
    try:
        api = httpx.Client(base_url=live.url, timeout=10, headers={"Authorization": "Bearer s3cret"})
        # without the key the server refuses: the page says so and opens the settings
        page.goto(live.url + "/")
        error = page.locator("[data-testid=error]")
        error.wait_for(state="visible")
        assert "API key" in error.text_content()
        page.fill("[data-testid=api-key]", "s3cret")
        page.press("[data-testid=api-key]", "Tab")
        expect(page.locator("#model-name")).not_to_have_text("")
        assert not error.is_visible()
        assert page.evaluate("JSON.parse(localStorage.getItem('llmlab.apiKey'))") == "s3cret"

        # with it, a chat works (every request carries the key)
        page.fill("[data-testid=max-tokens]", "8")
        page.fill("[data-testid=composer]", "Hello!")
        reply(page, lambda: page.click("[data-testid=send]"))
        assert not error.is_visible()
        (conversation,) = api.get("/api/conversations").json()
        stored = api.get(f"/api/conversations/{conversation['id']}").json()["messages"]
        assert [m["role"] for m in stored] == ["user", "assistant"]
        settings = stored[1]["settings"]  # what the user left alone is the server's default (api/defaults)
        assert (settings["temperature"], settings["top_p"], settings["max_tokens"]) == (0.7, 0.95, 8)

        # deleting takes two clicks; deleting the open conversation leaves an empty new chat
        delete = page.locator("[data-testid=conversation-item] [data-testid=delete-conversation]")
        delete.click()
        assert page.locator("[data-testid=conversation-item]").count() == 1
        delete.click()
        page.wait_for_selector("[data-testid=conversation-item]", state="detached")
        assert api.get("/api/conversations").json() == []
        assert page.locator("[data-testid=message-user]").count() == 0
    finally:
        live.stop()


def test_docs_page_renders_from_this_server_under_its_policy(server, page):
    """/docs (Swagger UI) draws the API's operations with scripts from this server only: nothing is
    fetched from elsewhere (the machine may have no internet) and its Content-Security-Policy blocks nothing
    it needs (the page fixture fails on a violation)."""
    elsewhere = []

    def record(route):
        if not route.request.url.startswith(server.url):
            elsewhere.append(route.request.url)
            return route.abort()
        return route.continue_()

    page.route("**/*", record)
    page.goto(server.url + "/docs")
    expect(page.locator(".opblock-summary-path", has_text="/v1/chat/completions")).to_be_visible()
    assert elsewhere == []


def fully_visible(page, locator) -> bool:
    """Whether all of the element shows: its box lies inside the window and inside the scrolled thread (whose
    overflow is clipped above the composer), and the middle of each of its edges is not under anything else
    (the corners are rounded off: the page there is what lies beneath)."""
    box = locator.bounding_box()
    view = page.viewport_size
    thread = page.locator("#messages").bounding_box()
    inside = (0 <= box["x"] and box["x"] + box["width"] <= view["width"] and 0 <= box["y"]
              and box["y"] + box["height"] <= view["height"])
    inside &= thread["y"] <= box["y"] and box["y"] + box["height"] <= thread["y"] + thread["height"]
    on_top = locator.evaluate("""(el) => {
        const r = el.getBoundingClientRect();
        const [x, y] = [(r.left + r.right) / 2, (r.top + r.bottom) / 2];
        return [[r.left + 1, y], [r.right - 1, y], [x, r.top + 1], [x, r.bottom - 1]]
            .every(([px, py]) => el.contains(document.elementFromPoint(px, py)));
    }""")
    return inside and on_top


@pytest.mark.parametrize("width, height", [(1200, 900), (390, 844)])
def test_compare_buttons_fit_the_page_and_the_answers_differ(server, page, tmp_path, width, height):
    """Compare mode after a long message, at temperature 0 (where both answers start as the same greedy one):
    the two answers shown differ (the server sampled B again, and the note says so), and each "I prefer this"
    button can be seen whole: at once for the last one (and for both, side by side, on a desktop), after
    scrolling it into view for the other on a phone."""
    api = httpx.Client(base_url=server.url, timeout=10)
    page.set_viewport_size({"width": 1200, "height": 900})  # the settings live in the sidebar, hidden on a phone
    page.goto(server.url + "/")
    page.click("[data-testid=settings] summary")
    page.fill("[data-testid=max-tokens]", "40")
    page.fill("[data-testid=temperature]", "0")
    page.set_viewport_size({"width": width, "height": height})
    page.check("[data-testid=compare-toggle]")
    page.fill("[data-testid=composer]", "\n".join(["Hello!"] * 40))  # a message taller than the page
    reply(page, lambda: page.click("[data-testid=send]"))
    assert not page.locator("[data-testid=error]").is_visible(), page.locator("[data-testid=error]").text_content()

    pair = page.locator("[data-testid=compare] [data-testid=message-assistant]")
    assert pair.count() == 2
    ids = [int(pair.nth(i).get_attribute("data-message-id")) for i in range(2)]
    cid = int(page.evaluate("location.hash").rsplit("/", 1)[1])
    stored = {m["id"]: m for m in stored_messages(api, cid)}
    shown = [pair.nth(i).locator("[data-testid=message-text]").text_content() for i in range(2)]
    assert shown == [stored[i]["content"] for i in ids] and shown[0] != shown[1]
    assert stored[ids[1]]["settings"]["resampled"] >= 1
    expect(page.locator("[data-testid=compare-notice]")).to_contain_text("sampled again")

    buttons = page.locator("[data-testid=prefer]")
    assert buttons.count() == 2
    assert fully_visible(page, buttons.nth(1)), buttons.nth(1).bounding_box()  # the end of the thread is in view
    if width >= 1200:
        assert fully_visible(page, buttons.nth(0)), buttons.nth(0).bounding_box()
    buttons.nth(0).scroll_into_view_if_needed()
    assert fully_visible(page, buttons.nth(0)), buttons.nth(0).bounding_box()
    assert page.evaluate("document.documentElement.scrollWidth <= innerWidth")
    screenshot(page, tmp_path, f"webui-compare-{width}x{height}")
    with page.expect_response("**/choose") as chosen:
        buttons.nth(0).click()
    assert chosen.value.json()["chosen"] == ids[0]
