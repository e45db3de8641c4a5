"""The chat page in headless Chromium (Debian's, driven by Playwright): with API keys on, send a message, watch the
reply stream in piece by piece, send a second turn, stop a long third one midway, and save a screenshot to
artifacts/chat_page.png."""

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


# The reply's own text: the bubble's first text node (the meta line after it is a separate span).
REPLY_TEXT = (
    "(sel) => { const n = document.querySelector(sel)?.firstChild; return n && n.nodeType === 3 ? n.textContent : ''; }"
)


def _idle_soon(server, timeout: float = 2.0) -> bool:
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
    const b = document.querySelector('.msg.assistant.streaming');
    if (b && b.firstChild && b.firstChild.nodeType === 3 && b.firstChild.textContent) window.__updates++;
  }).observe(document.getElementById('messages'), {subtree: true, childList: true, characterData: true});
}"""


def test_chat_page_streams_a_reply(embedded_server):
    playwright = pytest.importorskip("playwright.sync_api")
    with playwright.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=FLAGS)
        try:
            page = browser.new_page(viewport={"width": 1000, "height": 700})
            errors = []
            page.on("pageerror", lambda e: errors.append(str(e)))
            page.goto(embedded_server.base_url + "/")
            page.wait_for_selector("#status:has-text('could not list models')")  # no key yet: 401
            page.click("#settings-toggle")
            page.fill("#api_key", embedded_server.api_key)
            page.dispatch_event("#api_key", "change")
            page.wait_for_selector(f"#model option[value='{embedded_server.model}']", state="attached")
            page.fill("#max_tokens", "40")
            page.fill("#temperature", "0")
            page.dispatch_event("#max_tokens", "change")
            page.click("#settings-toggle")
            page.evaluate(WATCH)

            page.fill("#input", "What is the capital of France?")
            page.keyboard.press("Enter")
            page.wait_for_selector(".msg.assistant:not(.streaming) .meta", timeout=60_000)
            reply = page.inner_text(".msg.assistant")
            meta = page.inner_text(".msg.assistant .meta")
            assert "tok/s" in meta and "tokens" in meta, meta
            assert reply.replace(meta, "").strip(), "empty reply"
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
