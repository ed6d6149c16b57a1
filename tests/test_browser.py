"""The chat page at ``/`` in a real headless Chromium (Debian's, driven by Python playwright).

One server for the module: SmolLM2 (``smollm2``), Gemma-3-270M (``gemma3``) and SmolLM2 with a
small context (``smollm2-tiny``, for trimming). Screenshots go to ``test-artifacts/``.
Chromium comes from ``apt-get install chromium`` (``scripts/ci-system-deps.sh``); never from
``playwright install``.
"""

from __future__ import annotations

import json
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from playwright.sync_api import Browser, Page, sync_playwright

from tests.conftest import GEMMA_RESOURCE, REPO, SMOLLM_RESOURCE, RunningServer

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
