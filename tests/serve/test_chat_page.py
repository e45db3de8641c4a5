"""The chat page in headless Chromium (Debian's, driven by Playwright): with API keys on, enter the key the page
asks for, send a message, watch the reply stream in piece by piece, send a second turn, stop a long third one
midway; markdown (a fenced code block is a <pre>, HTML is sanitized), a conversation kept across a reload, and no
element wider than the viewport at 1280, 390 and 360 px. Screenshots go to artifacts/."""

from __future__ import annotations

import shutil
import time
from pathlib import Path

import pytest

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]


# The reply's own text (the meta line is a separate span).
REPLY_TEXT = "(sel) => document.querySelector(sel + ' .content')?.textContent || ''"


def _idle_soon(server, timeout: float = 10.0) -> bool:
    """The stopped request leaves the engine within `timeout`: far less than its 300 tokens would take even on an
    idle machine, so a busy one cannot pass it by finishing, nor fail it by being slow to notice."""
    deadline = time.monotonic() + timeout
    while server.metric("lmforge_num_requests_running") > 0:
        if time.monotonic() > deadline:
            return False
        time.sleep(0.02)
    return True


ARTIFACTS = Path(__file__).resolve().parents[2] / "artifacts"

pytestmark = pytest.mark.skipif(CHROMIUM is None, reason="chromium is not installed (apt-get install -y chromium)")

# Counts how often the reply bubble changes while it is still streaming, to prove token-by-token rendering.
WATCH = """() => {
  window.__updates = 0;
  new MutationObserver(() => {
    const c = document.querySelector('.msg.assistant.streaming .content');
    if (c && c.textContent) window.__updates++;
  }).observe(document.getElementById('messages'), {subtree: true, childList: true, characterData: true});
}"""


def enter_key(page, server) -> None:
    """A keyed server: the page says it needs a key (no empty card, no empty model list), then takes it."""
    page.wait_for_selector("#auth:not([hidden])")
    assert page.is_disabled("#send") and page.locator(".msg").count() == 0
    page.fill("#auth_key", "wrong-key")
    page.click("#auth-form button")
    page.wait_for_selector("#auth-error:has-text('refused')")
    page.fill("#auth_key", server.api_key)
    page.click("#auth-form button")
    page.wait_for_selector(f"#model option[value='{server.model}']", state="attached")
    assert page.is_hidden("#auth") and not page.is_disabled("#send")


def test_chat_page_streams_a_reply(embedded_server):
    playwright = pytest.importorskip("playwright.sync_api")
    with playwright.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=FLAGS)
        try:
            page = browser.new_page(viewport={"width": 1000, "height": 700})
            errors = []
            page.on("pageerror", lambda e: errors.append(str(e)))
            page.goto(embedded_server.base_url + "/")
            enter_key(page, embedded_server)
            page.click("#settings-toggle")
            page.fill("#max_tokens", "40")
            page.fill("#temperature", "0")
            page.dispatch_event("#max_tokens", "change")
            page.click("#settings-toggle")
            page.evaluate(WATCH)

            page.fill("#input", "What is the capital of France?")
            page.keyboard.press("Enter")
            page.wait_for_selector(".msg.assistant:not(.streaming) .meta", timeout=60_000)
            reply = page.inner_text(".msg.assistant .content")
            meta = page.inner_text(".msg.assistant .meta")
            assert "tok/s" in meta and "tokens" in meta, meta
            assert reply.strip(), "empty reply"
            assert page.evaluate("window.__updates") >= 2, "the reply did not stream"

            page.fill("#input", "And of Italy?")  # second turn: history goes along
            page.click("#send")
            page.wait_for_function(
                "document.querySelectorAll('.msg.assistant:not(.streaming) .meta').length == 2", timeout=60_000
            )
            assert page.locator(".msg.user").count() == 2 and page.locator(".msg.error").count() == 0

            # stop button: a long reply, stopped after a few pieces; the server aborts it at once
            page.click("#settings-toggle")
            page.fill("#max_tokens", "300")
            page.click("#settings-toggle")
            page.fill("#input", "Write a long story about a dragon who learns to bake bread.")
            page.click("#send")
            page.wait_for_function(f"({REPLY_TEXT})('.msg.assistant.streaming').split(' ').length > 4", timeout=60_000)
            page.click("#stop")
            page.wait_for_selector(".msg.assistant:nth-of-type(6):not(.streaming) .meta:has-text('stopped')")
            stopped = page.evaluate(f"({REPLY_TEXT})('.msg.assistant:nth-of-type(6)')")
            assert len(stopped.split()) > 4, stopped
            assert _idle_soon(embedded_server), "the stopped request still runs"
            ARTIFACTS.mkdir(exist_ok=True)
            shot = ARTIFACTS / "chat_page.png"
            page.screenshot(path=str(shot), full_page=True)
            assert shot.stat().st_size > 10_000
            assert not errors, errors
        finally:
            browser.close()


# Elements that stick out of the viewport (ignoring what scrolls inside a <pre> or a table, which scroll sideways
# on their own), and whether the page itself scrolls sideways.
OVERFLOW = """() => {
  const w = document.documentElement.clientWidth, bad = [];
  for (const el of document.querySelectorAll('body *')) {
    if (el.closest('pre, table') && !el.matches('pre, table')) continue;
    const r = el.getBoundingClientRect();
    if (r.width && (r.right > w + 1 || r.left < -1)) bad.push(`${el.tagName}#${el.id}.${el.className} ${r.right}`);
  }
  return {bad, scroll: document.documentElement.scrollWidth - w};
}"""
STORED = [
    {"role": "user", "content": "Show me some code, a table and a very long word"},
    {
        "role": "assistant",
        "content": "Here:\n\n```python\nprint('hello')  # "
        + "x" * 300
        + "\n```\n\n| a | b |\n|---|---|\n| "
        + " | ".join(["wide" * 30] * 2)
        + " |\n\nand `inline code`, **bold**, "
        + "https://example.org/"
        + "a" * 200
        + ' <img width="16" src="/static/favicon.svg" onerror="window.__xss = 1"><script>window.__xss = 2</script>',
        "meta": "12 tokens",
    },
]


def test_chat_page_layout_markdown_and_reload(embedded_server):
    playwright = pytest.importorskip("playwright.sync_api")
    import json

    with playwright.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=FLAGS)
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 800})
            errors, missing = [], []
            page.on("pageerror", lambda e: errors.append(str(e)))
            page.on("response", lambda r: missing.append(r.url) if r.status == 404 else None)
            page.goto(embedded_server.base_url + "/")
            enter_key(page, embedded_server)
            assert "temperature 0.2" in page.inner_text("#defaults")  # the embedded model's own defaults
            assert page.get_attribute("#temperature", "placeholder") == "model: 0.2"

            # a stored conversation comes back after a reload, rendered as markdown, with the HTML made inert
            page.evaluate(f"localStorage.setItem('lmforge.conversation', {json.dumps(json.dumps(STORED))})")
            page.reload()
            page.wait_for_selector(".msg.assistant .content pre code")
            assert "print('hello')" in page.inner_text(".msg.assistant pre")
            assert page.locator(".msg.assistant table").count() == 1
            assert page.locator(".msg.assistant :not(pre) > code").inner_text() == "inline code"
            assert page.locator(".msg.assistant img[onerror], .msg.assistant script").count() == 0
            assert page.evaluate("window.__xss") is None

            # a real turn is kept too
            page.wait_for_selector(f"#model option[value='{embedded_server.model}']", state="attached")
            page.click("#settings-toggle")
            page.fill("#max_tokens", "12")
            page.fill("#temperature", "0")
            page.dispatch_event("#max_tokens", "change")
            page.click("#settings-toggle")
            page.fill("#input", "Say hello.")
            page.keyboard.press("Enter")
            page.wait_for_function(
                "document.querySelectorAll('.msg.assistant:not(.streaming) .meta').length == 2", timeout=60_000
            )
            page.reload()
            page.wait_for_function("document.querySelectorAll('.msg.assistant').length == 2")
            assert page.locator(".msg.user").count() == 2

            ARTIFACTS.mkdir(exist_ok=True)
            for width, shot in ((1280, "chat_page_1280.png"), (390, "chat_page_390.png"), (360, None)):
                page.set_viewport_size({"width": width, "height": 800})
                if page.is_hidden("#settings"):
                    page.click("#settings-toggle")  # the settings panel ran off phone screens before
                result = page.evaluate(OVERFLOW)
                assert not result["bad"] and result["scroll"] <= 0, (width, result)
                if shot:
                    page.screenshot(path=str(ARTIFACTS / shot), full_page=True)
                    assert (ARTIFACTS / shot).stat().st_size > 10_000
            assert not errors, errors
            assert not missing, missing  # the favicon included
        finally:
            browser.close()
