"""The chat page at ``/`` in a real headless Chromium (Debian's, driven by Python playwright).

One server for the module: SmolLM2 (``smollm2``), Gemma-3-270M (``gemma3``) and SmolLM2 with a
small context (``smollm2-tiny``, for trimming). Screenshots go to ``test-artifacts/``.
Chromium comes from ``apt-get install chromium`` (``scripts/ci-system-deps.sh``); never from
``playwright install``.
"""

from __future__ import annotations

import json
import re
import shutil
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from playwright.sync_api import Browser, Page, sync_playwright

from tests.conftest import GEMMA_RESOURCE, REPO, SMOLLM_RESOURCE, RunningServer
from tests.test_embeddings import minilm_path

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]
ARTIFACTS = REPO / "test-artifacts"
# End-of-generation tokens of SmolLM2 (0, 2, 4) and Gemma 3 (1, 106, 212): banned, a reply
# runs until max_tokens or the stop button.
NO_EOS = {str(t): -100 for t in (0, 1, 2, 4, 106, 212)}
WAIT_MS = 90_000

LAST_REPLY = "document.querySelector('#log .turn:last-child .reply')"


@pytest.fixture(scope="session")
def shared_models_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One models dir for the session: Gemma is assembled into it once."""
    return tmp_path_factory.getbasetemp() / "shared-models"


@pytest.fixture(scope="module")
def chat_server(
    start_server: Callable[..., RunningServer], shared_models_dir: Path
) -> RunningServer:
    minilm = shared_models_dir / ".converted" / minilm_path().name
    if not minilm.exists():  # an embedding model too: the page must leave it out
        minilm.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(minilm_path(), minilm)
    return start_server(
        f"""
[server]
host = "127.0.0.1"
threads = 1
keepalive_seconds = 0.5
models_dir = "{shared_models_dir}"

[[models]]
name = "smollm2"
resource = "{SMOLLM_RESOURCE}"
n_ctx = 2048

[[models]]
name = "gemma3"
resource = "{GEMMA_RESOURCE}"
chat_format = "gemma"
n_ctx = 1024

[[models]]
name = "smollm2-tiny"
resource = "{SMOLLM_RESOURCE}"
n_ctx = 512

[[models]]
name = "minilm"
path = ".converted/{minilm.name}"
n_ctx = 512
embedding = true
"""
    )


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    if not CHROMIUM.is_file():
        pytest.fail(
            f"{CHROMIUM} is missing: run scripts/ci-system-deps.sh (apt-get install chromium)"
        )
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(
            executable_path=str(CHROMIUM), headless=True, args=CHROMIUM_ARGS
        )
        yield browser
        browser.close()


@pytest.fixture
def open_page(browser: Browser, chat_server: RunningServer) -> Iterator[Callable[..., Page]]:
    """Open ``/`` in a fresh browser context; page errors and requests that leave the
    server (a CDN, a font) fail the test."""
    contexts = []
    errors: list[str] = []
    foreign: list[str] = []

    def open_(path: str = "/", init_script: str | None = None) -> Page:
        context = browser.new_context(viewport={"width": 1280, "height": 820})
        contexts.append(context)
        if init_script:
            context.add_init_script(init_script)
        page = context.new_page()
        page.set_default_timeout(WAIT_MS)
        page.on("pageerror", lambda exc: errors.append(str(exc)))
        page.on(
            "request",
            lambda req: None if req.url.startswith(chat_server.url) else foreign.append(req.url),
        )
        page.goto(chat_server.url + path)
        page.wait_for_selector("#transport[data-transport]")
        return page

    yield open_
    for context in contexts:
        context.close()
    assert not errors, errors
    assert not foreign, foreign


def seed(page: Page, history: object, settings: dict[str, object]) -> None:
    """Put a conversation and settings into localStorage, as the page saves them, and reload."""
    page.evaluate(
        """([history, settings]) => {
            localStorage.setItem("llmis.chat.history.v1", JSON.stringify(history));
            localStorage.setItem("llmis.chat.settings.v1", JSON.stringify(settings));
        }""",
        [history, settings],
    )
    page.reload()
    page.wait_for_selector("#transport[data-transport]")


def set_extra(page: Page, value: str) -> None:
    """Fill "More parameters" (a closed <details> at first, as a user finds it)."""
    if not page.locator("details").evaluate("d => d.open"):
        page.click("details summary")
    page.fill("#extra", value)


def send(page: Page, text: str) -> None:
    page.fill("#prompt", text)
    page.click("#send")


def wait_streaming_text(page: Page, longer_than: int = 0) -> str:
    """Wait until the last reply shows more than ``longer_than`` chars while still generating."""
    page.wait_for_function(
        f"""n => {{
            const r = {LAST_REPLY};
            return r && r.dataset.status === "streaming"
                && r.querySelector(".content").textContent.length > n;
        }}""",
        arg=longer_than,
    )
    return page.locator("#log .turn").last.locator(".reply .content").first.text_content() or ""


def stream_long_reply(page: Page, prompt: str) -> str:
    """Ask SmolLM2 for a reply that cannot end by itself; return its text once it has grown
    twice while still generating (it streams, it is not sent at the end)."""
    page.select_option("#model", "smollm2")
    page.fill("#max_tokens", "800")
    set_extra(page, json.dumps({"logit_bias": NO_EOS}))
    send(page, prompt)
    first = wait_streaming_text(page)
    wait_streaming_text(page, len(first))
    return first


def screenshot(page: Page, name: str) -> None:
    ARTIFACTS.mkdir(exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / name))


def wait_all_done(page: Page) -> None:
    page.wait_for_function(
        """() => {
            const replies = document.querySelectorAll('#log .turn:last-child .reply');
            return replies.length > 0 && [...replies].every(
                r => !["streaming", "stopping"].includes(r.dataset.status));
        }"""
    )


def test_page_is_rendered_by_the_server_with_every_asset_local(
    chat_server: RunningServer,
) -> None:
    with urllib.request.urlopen(chat_server.url + "/", timeout=30) as resp:
        html = resp.read().decode()
        assert resp.headers["Content-Type"].startswith("text/html")
        assert "script-src 'self'" in resp.headers["Content-Security-Policy"]
    for name in ("smollm2", "gemma3", "smollm2-tiny"):
        assert f'<option value="{name}" data-state="loaded"' in html
    for asset in ("/static/chat.js", "/static/chat.css", "/static/favicon.svg"):
        assert asset in html
        with urllib.request.urlopen(chat_server.url + asset, timeout=30) as resp:
            body = resp.read().decode()
            assert resp.status == 200 and body
    assert "https://" not in html and "http://" not in html


def test_stream_stop_reload_and_new_chat(open_page: Callable[..., Page]) -> None:
    page = open_page()
    assert page.text_content("#transport") == "WebSocket"
    first = stream_long_reply(page, "Tell me a long story about a lighthouse keeper.")
    assert page.is_enabled("#stop") and page.is_disabled("#send")
    page.click("#stop")
    # "cancelled" is the server's done event for this id, not a local guess.
    page.wait_for_selector("#log .reply[data-status=cancelled]")
    assert page.is_disabled("#stop") and page.is_enabled("#send")
    stopped = page.text_content("#log .reply .content") or ""
    assert len(stopped) > len(first)
    page.wait_for_timeout(500)
    assert page.text_content("#log .reply .content") == stopped  # no more text after stop

    page.reload()
    page.wait_for_selector("#transport[data-transport]")
    assert page.text_content("#log .user") == "Tell me a long story about a lighthouse keeper."
    assert page.text_content("#log .reply .content") == stopped
    assert page.get_attribute("#log .reply", "data-status") == "cancelled"
    assert page.text_content("#log .reply .reply-status") == "stopped"

    page.click("#new-chat")
    assert page.locator("#log .turn").count() == 0
    page.reload()
    page.wait_for_selector("#transport[data-transport]")
    assert page.locator("#log .turn").count() == 0


def test_compare_mode_streams_two_models_side_by_side(open_page: Callable[..., Page]) -> None:
    page = open_page()
    page.check("#compare")
    page.select_option("#model", "smollm2")
    page.select_option("#model2", "gemma3")
    page.fill("#system", "You are a concise assistant.")
    page.fill("#temperature", "0.2")
    page.fill("#max_tokens", "24")
    set_extra(page, json.dumps({"logit_bias": NO_EOS}))
    # Count the text updates of each reply as they land.
    page.evaluate(
        """() => {
            window.__updates = {};
            new MutationObserver(records => {
                for (const rec of records) {
                    const reply = rec.target.parentElement?.closest('.reply')
                        || rec.target.closest?.('.reply');
                    if (reply && reply.dataset.status === 'streaming') {
                        window.__updates[reply.dataset.model] =
                            (window.__updates[reply.dataset.model] || 0) + 1;
                    }
                }
            }).observe(document.getElementById('log'),
                       {subtree: true, childList: true, characterData: true});
        }"""
    )
    send(page, "Name three colors of the rainbow.")
    wait_all_done(page)

    replies = page.locator("#log .turn").last.locator(".replies.compare .reply")
    assert replies.count() == 2
    assert [replies.nth(i).get_attribute("data-model") for i in range(2)] == ["smollm2", "gemma3"]
    for i in range(2):
        assert replies.nth(i).get_attribute("data-status") == "length"
        assert (replies.nth(i).locator(".content").text_content() or "").strip()
    # Side by side on screen, each filled in many pieces.
    left, right = (replies.nth(i).bounding_box() for i in range(2))
    assert left is not None and right is not None
    assert left["x"] + left["width"] <= right["x"] and abs(left["y"] - right["y"]) < 2
    updates = page.evaluate("window.__updates")
    assert updates["smollm2"] > 2 and updates["gemma3"] > 2, updates

    screenshot(page, "chat-compare.png")


def test_sse_fallback_without_websocket(open_page: Callable[..., Page]) -> None:
    page = open_page(init_script="delete window.WebSocket;")
    assert page.text_content("#transport") == "SSE"
    stream_long_reply(page, "Tell me a long story about a sailor.")
    page.click("#stop")
    page.wait_for_selector("#log .reply[data-status=cancelled]")

    set_extra(page, "")
    page.fill("#max_tokens", "4")
    send(page, "Say hi.")
    wait_all_done(page)
    last = page.locator("#log .turn").last.locator(".reply")
    assert last.get_attribute("data-status") in ("stop", "length")
    assert (last.locator(".content").text_content() or "").strip()


def test_history_beyond_the_context_is_trimmed_and_the_page_says_so(
    open_page: Callable[..., Page],
) -> None:
    page = open_page()
    filler = "The lighthouse keeper counted the ships again. " * 9  # ~80 tokens
    turns = [
        {
            "user": f"Part {i}: {filler}",
            "replies": [{"model": "smollm2-tiny", "content": f"Noted {i}.", "status": "stop"}],
        }
        for i in range(7)
    ]
    seed(page, {"turns": turns}, {"model": "smollm2-tiny", "max_tokens": "16"})
    assert page.locator("#log .turn").count() == 7
    send(page, "What was part 6 about?")
    wait_all_done(page)
    notice = page.locator("#log .turn").last.locator(".trim-notice")
    assert notice.count() == 1
    text = notice.text_content() or ""
    assert "Context full" in text
    dropped = int(text.split("left out the ")[1].split()[0])
    assert dropped >= 2 and dropped % 2 == 0  # whole (user, assistant) turns
    assert page.locator("#log .turn").count() == 8  # the page keeps the whole history
    page.reload()
    page.wait_for_selector("#transport[data-transport]")
    assert page.locator("#log .turn").last.locator(".trim-notice").count() == 1


XSS = '<img src=x onerror="window.__xss=1"><script>window.__xss=2</script>'


def test_model_output_with_html_is_shown_as_text(open_page: Callable[..., Page]) -> None:
    """SmolLM2 at temperature 0 echoes the markup after a few echo examples (real output);
    the examples' own HTML goes through the same rendering as stored replies."""
    page = open_page()
    examples = [
        ("hello world", "hello world"),
        ("<b>bold</b> text", "<b>bold</b> text"),
        ("<i>x</i><u>y</u>", "<i>x</i><u>y</u>"),
    ]
    turns = [
        {"user": u, "replies": [{"model": "smollm2", "content": a, "status": "stop"}]}
        for u, a in examples
    ]
    settings = {
        "model": "smollm2",
        "system": "You are an echo machine. Reply with the user's message exactly, nothing else.",
        "temperature": "0",
        "max_tokens": "40",
    }
    seed(page, {"turns": turns}, settings)
    title = page.title()
    send(page, XSS)
    wait_all_done(page)

    reply = page.locator("#log .turn").last.locator(".reply .content")
    text = reply.text_content() or ""
    assert "<script>" in text and "onerror=" in text, text  # the model produced the markup
    assert page.locator("#log .turn").last.locator(".user").text_content() == XSS
    # Nothing was parsed as HTML: no elements from any reply or prompt, no script ran.
    assert page.locator("#log img, #log script, #log b, #log i, #log u").count() == 0
    assert page.locator("#log .turn").nth(1).locator(".reply .content").text_content() == (
        "<b>bold</b> text"
    )
    page.wait_for_timeout(300)
    assert page.evaluate("window.__xss") is None
    assert page.title() == title
    screenshot(page, "chat-xss.png")


# ----- issue 16: Markdown, conversations, edit/regenerate, stats, keys, narrow layout -----

# What sanitised Markdown may put in a reply (chat.js RENDERED_TAGS), plus the page's own
# highlighting spans and copy buttons.
RENDERED = {"P", "BR", "HR", "H1", "H2", "H3", "H4", "H5", "H6", "STRONG", "EM", "DEL", "CODE"}
RENDERED |= {
    "PRE",
    "BLOCKQUOTE",
    "UL",
    "OL",
    "LI",
    "A",
    "TABLE",
    "THEAD",
    "TBODY",
    "TR",
    "TH",
    "TD",
}
CONTENT_TAGS = """() => [...document.querySelectorAll('#log .content *')].map(
    n => n.tagName === 'SPAN' ? (n.className.startsWith('hljs') ? 'HLJS' : 'SPAN')
       : n.tagName === 'BUTTON' ? (n.className === 'copy' ? 'COPY' : 'BUTTON') : n.tagName)"""

MARKDOWN = (
    "Here is **bold**, *slanted* and `inline code`:\n\n"
    "- first\n- second\n\n"
    "```python\ndef answer():\n    return 42\n```\n\n"
    '<img src=x onerror="window.__xss=3"> [ok](https://example.com) [bad](javascript:alert(1))'
)


def test_markdown_code_blocks_copy_buttons_and_highlighting(
    open_page: Callable[..., Page],
) -> None:
    page = open_page()
    page.context.grant_permissions(["clipboard-read", "clipboard-write"])
    turn = {
        "user": "show me",
        "replies": [{"model": "smollm2", "content": MARKDOWN, "status": "stop"}],
    }
    seed(page, {"turns": [turn]}, {"model": "smollm2"})
    content = page.locator("#log .reply .content").first
    assert content.locator("strong").text_content() == "bold"
    assert content.locator("em").text_content() == "slanted"
    assert content.locator("ul > li").count() == 2
    code = content.locator("pre code")
    assert code.text_content() == "def answer():\n    return 42\n"
    assert code.locator("span.hljs-keyword").count() >= 2  # def, return: highlighted
    tags = set(page.evaluate(CONTENT_TAGS))
    assert tags <= RENDERED | {"HLJS", "COPY"}, tags
    assert page.locator("#log img").count() == 0 and "<img" in (content.text_content() or "")
    hrefs = content.locator("a").evaluate_all("links => links.map(a => a.getAttribute('href'))")
    assert "https://example.com" in hrefs and not any(h and "javascript" in h for h in hrefs)
    content.locator("pre button.copy").click()
    page.wait_for_selector("#log pre button.copy[data-copied=true]")
    assert page.locator("#chat-list .chat-item").count() == 1  # the seeded one, kept
    assert page.evaluate("navigator.clipboard.readText()") == "def answer():\n    return 42\n"
    page.wait_for_timeout(200)
    assert page.evaluate("window.__xss") is None


def test_reply_renders_markdown_while_streaming_and_shows_its_speed(
    open_page: Callable[..., Page],
) -> None:
    page = open_page()
    stream_long_reply(page, "Write a long list of ideas for a picnic.")
    # mid-stream the reply is already rendered Markdown (paragraphs), not raw text
    tags = set(page.evaluate(CONTENT_TAGS))
    assert tags and tags <= RENDERED | {"HLJS", "COPY"}, tags
    page.click("#stop")
    page.wait_for_selector("#log .reply[data-status=cancelled]")
    set_extra(page, "")
    page.fill("#max_tokens", "8")
    send(page, "Say hello.")
    wait_all_done(page)
    stats = page.locator("#log .turn").last.locator(".reply-stats").text_content() or ""
    match = re.fullmatch(r"(\d+) tokens · ([\d.]+) tok/s · TTFT (\d+) ms", stats)
    assert match, stats
    assert 1 <= int(match[1]) <= 8 and float(match[2]) > 0 and int(match[3]) > 0
    page.reload()
    page.wait_for_selector("#transport[data-transport]")
    assert page.locator("#log .turn").last.locator(".reply-stats").text_content() == stats


def test_conversations_new_rename_search_delete_and_export(
    open_page: Callable[..., Page], tmp_path: Path
) -> None:
    page = open_page()
    page.select_option("#model", "smollm2")
    page.fill("#max_tokens", "3")
    send(page, "First conversation about cats")
    wait_all_done(page)
    page.click("#new-chat")
    assert page.locator("#log .turn").count() == 0
    send(page, "Second conversation about boats")
    wait_all_done(page)
    items = page.locator("#chat-list .chat-item")
    assert items.count() == 2
    assert items.nth(0).locator(".chat-open").text_content() == "Second conversation about boats"

    items.nth(1).locator(".chat-open").click()  # switch back
    assert page.text_content("#log .user") == "First conversation about cats"
    items.nth(1).locator(".chat-rename").click()
    page.fill("#chat-list .chat-title-input", "Cats")
    page.press("#chat-list .chat-title-input", "Enter")
    assert "Cats" in [t.strip() for t in page.locator("#chat-list .chat-open").all_text_contents()]

    page.fill("#chat-search", "boats")
    assert page.locator("#chat-list .chat-open").all_text_contents() == [
        "Second conversation about boats"
    ]
    page.fill("#chat-search", "")

    with page.expect_download() as download:
        page.click("#export-chats")
    path = tmp_path / "export.json"
    download.value.save_as(path)
    exported = json.loads(path.read_text())
    titles = sorted(c["title"] or c["turns"][0]["user"] for c in exported["conversations"])
    assert titles == ["Cats", "Second conversation about boats"]
    assert all(c["turns"][0]["replies"][0]["status"] == "length" for c in exported["conversations"])

    page.reload()
    page.wait_for_selector("#transport[data-transport]")
    assert page.locator("#chat-list .chat-item").count() == 2  # kept in localStorage
    page.locator("#chat-list .chat-item.current .chat-delete").click()
    assert page.locator("#chat-list .chat-item").count() == 1
    assert page.text_content("#log .user") == "Second conversation about boats"


def test_edit_and_resend_and_regenerate(open_page: Callable[..., Page]) -> None:
    page = open_page()
    page.select_option("#model", "smollm2")
    page.fill("#max_tokens", "4")
    send(page, "Name a fruit.")
    wait_all_done(page)
    send(page, "Name a vegetable.")
    wait_all_done(page)
    assert page.locator("#log .turn").count() == 2

    page.locator("#log .turn").nth(0).locator("button.edit").click()
    assert page.input_value("#prompt") == "Name a fruit."
    assert page.is_visible("#editing")
    page.fill("#prompt", "Name a colour.")
    page.click("#send")
    wait_all_done(page)
    # the edited message replaced the first turn and everything after it
    assert page.locator("#log .user").all_text_contents() == ["Name a colour."]

    page.locator("#log .reply button.regenerate").first.click()
    # the old reply is cleared and asked for again: a fresh generation with its own stats
    assert page.get_attribute("#log .reply", "data-status") == "streaming"
    assert page.text_content("#log .reply .reply-stats") == ""
    wait_all_done(page)
    reply = page.locator("#log .reply").first
    assert reply.get_attribute("data-status") in ("stop", "length")
    assert (reply.locator(".content").text_content() or "").strip()
    assert re.match(r"\d+ tokens", reply.locator(".reply-stats").text_content() or "")
    assert page.locator("#log .turn").count() == 1


def test_picker_has_no_embedding_model_and_a_bad_json_keeps_the_message(
    open_page: Callable[..., Page], chat_server: RunningServer
) -> None:
    with urllib.request.urlopen(chat_server.url + "/", timeout=30) as resp:
        assert 'value="minilm"' not in resp.read().decode()
    page = open_page()
    page.wait_for_timeout(300)  # the /v1/models refresh ran
    assert "minilm" not in page.locator("#model option").evaluate_all(
        "options => options.map(o => o.value)"
    )
    set_extra(page, "{not json")
    send(page, "Keep this text please")
    assert page.is_visible("#composer-error")
    assert "not valid JSON" in (page.text_content("#composer-error") or "")
    assert page.input_value("#prompt") == "Keep this text please"
    assert page.locator("#log .turn").count() == 0


def test_narrow_layout_puts_the_settings_in_a_drawer(open_page: Callable[..., Page]) -> None:
    page = open_page()
    page.set_viewport_size({"width": 420, "height": 800})
    assert not page.is_visible("#settings") and not page.is_visible("#sidebar")
    assert not page.is_visible("#api-key")  # this server needs no key
    composer = page.locator("#composer").bounding_box()
    assert composer is not None and composer["x"] >= 0 and composer["width"] <= 420
    assert composer["y"] + composer["height"] <= 800
    page.click("#settings-toggle")
    assert page.is_visible("#settings")
    box = page.locator("#settings").bounding_box()
    assert box is not None and box["width"] >= 300 and box["x"] + box["width"] <= 421
    field = page.locator("#system").bounding_box()
    assert field is not None and field["width"] >= 250  # not squeezed into a strip
    screenshot(page, "chat-narrow-settings.png")
    page.click("#settings-close")
    assert not page.is_visible("#settings")
    page.click("#chats-toggle")
    assert page.is_visible("#sidebar")


@pytest.fixture(scope="module")
def keyed_server(start_server: Callable[..., RunningServer]) -> RunningServer:
    return start_server(
        f"""
[server]
host = "127.0.0.1"
threads = 1

[auth]
api_keys = ["page-key-1"]

[[models]]
name = "smollm2"
resource = "{SMOLLM_RESOURCE}"
n_ctx = 1024
"""
    )


@pytest.mark.parametrize("transport", ["WebSocket", "SSE"])
def test_api_key_field_for_a_server_with_keys(
    browser: Browser, keyed_server: RunningServer, transport: str
) -> None:
    context = browser.new_context(viewport={"width": 1280, "height": 820})
    try:
        page = context.new_page()
        page.set_default_timeout(WAIT_MS)
        sockets: list[str] = []
        page.on("websocket", lambda ws: sockets.append(ws.url))
        query = "?transport=sse" if transport == "SSE" else ""
        page.goto(keyed_server.url + "/" + query)
        page.wait_for_selector("#transport[data-transport]")
        assert page.is_visible("#api-key")
        assert page.locator("#model option").count() == 0  # nothing listed without the key
        page.fill("#api-key", "page-key-1")
        page.dispatch_event("#api-key", "change")
        page.wait_for_selector("#model option[value=smollm2]", state="attached")
        page.wait_for_selector(f"#transport[data-transport={transport}]")
        page.fill("#max_tokens", "3")
        send(page, "Hi")
        wait_all_done(page)
        assert page.get_attribute("#log .reply", "data-status") == "length"
        assert all("page-key-1" not in url for url in sockets)
        assert page.evaluate("sessionStorage.getItem('llmis.chat.apikey')") == "page-key-1"
        assert page.evaluate("localStorage.getItem('llmis.chat.apikey')") is None
    finally:
        context.close()


def test_docs_screenshot(open_page: Callable[..., Page]) -> None:
    """Refresh docs/chat.png: two conversations, a Markdown reply with code, the stats footer."""
    page = open_page()
    turns = [
        {
            "user": "How do I read a file line by line in Python?",
            "replies": [
                {
                    "model": "smollm2",
                    "status": "stop",
                    "stats": {"tokens": 61, "tps": 48.2, "ttft_ms": 84},
                    "content": "Open it with a `with` block and iterate over it:\n\n"
                    "```python\nwith open('notes.txt') as f:\n    for line in f:\n"
                    "        print(line.rstrip())\n```\n\n- the file is closed for you\n"
                    "- lines keep their `\\n` until you strip it",
                }
            ],
        }
    ]
    seed(page, {"turns": [{"user": "Plan a picnic", "replies": []}]}, {})
    seed(page, {"turns": turns}, {"model": "smollm2"})
    page.select_option("#model", "smollm2")
    page.fill("#max_tokens", "24")
    send(page, "Give me two tips for clean code, as a list.")
    wait_all_done(page)
    page.screenshot(path=str(REPO / "docs" / "chat.png"))


def test_presets_are_in_the_picker_and_answer(open_page: Callable[..., Page]) -> None:
    page = open_page()
    group = page.locator("#model optgroup[label=Presets] option")
    values = group.evaluate_all("options => options.map(o => o.value)")
    assert {"summarize", "classify", "answer", "extract"} <= set(values)
    page.select_option("#model", "summarize")
    page.fill("#max_tokens", "6")
    send(page, "The lighthouse keeper counted the ships every night and wrote them down.")
    wait_all_done(page)
    reply = page.locator("#log .reply").last
    assert reply.get_attribute("data-model") == "summarize"
    assert reply.get_attribute("data-status") in ("stop", "length")
    assert (reply.locator(".content").text_content() or "").strip()
