"""The chat page (apps/web/chat.html, served by `serve` at /) and eval's report.html, driven in a real headless
browser: Debian's chromium through Playwright's Python API (the browser is the system's, never downloaded).

The chat runs against the tiny demo family (models/demo) with a large lambda and a small alpha, where
contrastive decoding changes picks. Every request the browser makes is intercepted: one that leaves
127.0.0.1 fails the test. EPICODE_EDGE_SCREENSHOTS=DIR saves light and dark screenshots of the page there.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from urllib.parse import urlparse

import pytest

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-background-networking",
        "--disable-component-update", "--disable-sync"]
try:
    import playwright.sync_api  # noqa: F401
    _why = None if os.path.exists(CHROMIUM) else (
        "no chromium browser (Debian: apt-get install chromium)")
except ImportError:
    _why = "Playwright's Python package is not installed (pip install playwright; the browser is Debian's chromium)"
pytestmark = pytest.mark.skipif(_why is not None, reason=f"browser tests: {_why}")

KEY = "page-key-42"
PROMPT = "Compute 3 * 14 - 9."
LAM, ALPHA, MAX = 10.0, 0.001, 40  # the demo family changes picks here (it is confident elsewhere)

from test_eval_html import evaluated  # noqa: E402,F401  (the report with won and lost items)


@pytest.fixture(scope="module")
def demo_rt():
    from epicode_edge.apps.demo import demo_bundle, family_dir
    from epicode_edge.runtime import load

    family = family_dir(Path(__file__).resolve().parents[1] / "models" / "demo")
    b, _ = demo_bundle(family, mu=0.1)
    rt = load(b.path, n_ctx=512, n_threads=1)
    yield rt
    rt.close()


@pytest.fixture(scope="module")
def srv(demo_rt):
    from test_serve import _Running

    s = _Running(demo_rt, parallel=2, max_queue=4, api_key=KEY)  # the model ids: tiny, tiny:finetuned
    yield s
    s.stop()


@pytest.fixture(scope="module")
def browser():
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=ARGS)
        yield b
        b.close()


class Guard:
    """Route interception on a browser context: requests to 127.0.0.1 (and file:, data:) go through, every
    other one is aborted and recorded."""

    def __init__(self, context):
        self.outside, self.requests = [], []
        context.route("**/*", self._route)

    def _route(self, route):
        u = urlparse(route.request.url)
        if u.scheme in ("file", "data") or u.hostname == "127.0.0.1":
            self.requests.append((route.request.method, route.request.url, route.request.post_data))
            route.continue_()
        else:
            self.outside.append(route.request.url)
            route.abort()


def _answer(page, which):
    page.wait_for_selector(f".answer.{which}:not(.streaming) .ep-summary", timeout=60_000)
    return page.locator(f".turn >> nth=-1 >> .answer.{which}")


def test_chat_page_streams_highlights_explains_and_compares(browser, srv, demo_rt, tmp_path):
    from playwright.sync_api import expect

    ctx = browser.new_context(viewport={"width": 1280, "height": 860})
    guard = Guard(ctx)
    page = ctx.new_page()
    errors = []
    page.on("pageerror", lambda e: errors.append(str(e)))
    page.goto(srv.url + "/")
    # the key is asked once (the server wants one) and kept in the tab
    page.wait_for_selector("#key[open]")
    page.fill("#key input[name=key]", KEY)
    page.click("#key button")
    expect(page.locator("#model-name")).to_have_text("tiny")
    # settings: a large lambda and a small alpha
    page.click("#open-settings")
    page.fill("input[name=lambda]", str(LAM))
    page.fill("input[name=alpha]", str(ALPHA))
    page.fill("input[name=max_tokens]", str(MAX))
    page.click("#settings button[value=ok]")
    # send a prompt: the answer streams in, with the changed picks highlighted
    page.fill("#prompt", PROMPT)
    page.press("#prompt", "Enter")
    ans = _answer(page, "epicode")
    want = demo_rt.generate(PROMPT, max_tokens=MAX, lam=LAM, alpha=ALPHA)
    assert want.changed_tokens > 0
    assert ans.locator(".ep-answer").text_content() == want.text
    changed = ans.locator(".ep-tok.ep-changed")
    assert changed.count() == want.changed_tokens
    assert f"{want.changed_tokens} changed picks" in ans.locator(".ep-summary").inner_text()
    body = json.loads(next(b for m, u, b in guard.requests if u.endswith("/v1/chat/completions")))
    assert body["stream"] is True and body["epicode"] == {"explain": True} and body["lambda"] == LAM
    # a changed token's candidate view: the winner is the picked token, the expert's own pick is another one
    changed.first.click()
    pop = page.locator(".ep-pop")
    pop.wait_for(state="visible")
    assert "changed by contrastive decoding" in pop.inner_text()
    winner = pop.locator("tr.ep-picked")
    assert winner.count() == 1 and "winner" in winner.inner_text()
    assert pop.locator("tr.ep-own").count() == 1 and pop.locator("tr.ep-own.ep-picked").count() == 0
    assert json.dumps(changed.first.text_content())[1:-1] in winner.locator("code").inner_text()
    page.keyboard.press("Escape")
    # the finetuned model alone: no changed picks, its own answer
    page.click("#view button[data-v=finetuned]")
    page.fill("#prompt", PROMPT)
    page.press("#prompt", "Enter")
    ft = _answer(page, "finetuned")
    assert ft.locator(".ep-tok.ep-changed").count() == 0 and ft.locator(".ep-tok").count() > 0
    assert page.locator(".turn >> nth=-1 >> .answer.epicode").count() == 0
    # side by side, regenerated: both answers in one turn
    page.click("#view button[data-v=both]")
    page.click("#regen")
    _answer(page, "epicode"), _answer(page, "finetuned")
    assert page.locator(".turn >> nth=-1 >> .answers.two .answer").count() == 2
    assert page.locator(".turn").count() == 2
    if os.environ.get("EPICODE_EDGE_SCREENSHOTS"):
        _screenshots(browser, page, Path(os.environ["EPICODE_EDGE_SCREENSHOTS"]))
    # the conversation is kept in the browser (not the key), and the key is not asked again in this tab
    page.reload()
    page.wait_for_selector(".turn")
    assert page.locator(".turn").count() == 2 and page.locator("#convs li").count() == 1
    assert not page.locator("#key[open]").count()
    stored = page.evaluate("JSON.stringify(Object.assign({}, localStorage))")
    assert KEY not in stored and PROMPT in stored
    assert page.evaluate("sessionStorage.getItem('epicode-key')") == KEY
    assert guard.outside == [] and errors == []
    ctx.close()


def test_stop_ends_the_answer_and_frees_its_slot(browser, srv, monkeypatch):
    import time

    import httpx

    from epicode_edge.decoding import batch_loop

    pick = batch_loop._pick

    def slow_pick(*a, **k):  # a slow model: the answer is still streaming when Stop is pressed
        time.sleep(0.2)
        return pick(*a, **k)

    monkeypatch.setattr(batch_loop, "_pick", slow_pick)
    before = httpx.get(srv.url + "/health").json()["schedulers"]["epicode"]["cancelled"]
    ctx = browser.new_context()
    guard = Guard(ctx)
    ctx.add_init_script(f"sessionStorage.setItem('epicode-key', {json.dumps(KEY)})")
    page = ctx.new_page()
    page.goto(srv.url + "/")
    page.fill("#prompt", PROMPT)
    page.press("#prompt", "Enter")
    page.wait_for_selector(".answer.epicode.streaming .ep-tok")
    page.click("#stop")
    ans = _answer(page, "epicode")
    assert "stopped" in ans.locator(".ep-summary").inner_text()
    assert 0 < ans.locator(".ep-tok").count() < 10  # the whole answer has 21 tokens
    t0 = time.time()
    while httpx.get(srv.url + "/health").json()["schedulers"]["epicode"]["cancelled"] == before:
        assert time.time() - t0 < 30, "the server did not cancel the stopped request"
        time.sleep(0.1)
    assert page.locator("#send").is_enabled() and not page.locator("#stop").is_enabled()
    assert guard.outside == []
    ctx.close()


def test_errors_show_in_the_answer_and_the_page_goes_on(browser, srv, monkeypatch):
    """A request the server refuses (400, before any token) and one that fails while it streams (an error event
    in the stream): each answer box shows the server's message, no script error, and the next prompt works."""
    from epicode_edge.decoding import batch_loop
    from epicode_edge.errors import NumericError

    ctx = browser.new_context()
    guard = Guard(ctx)
    ctx.add_init_script(f"sessionStorage.setItem('epicode-key', {json.dumps(KEY)})")
    page = ctx.new_page()
    errors = []
    page.on("pageerror", lambda e: errors.append(str(e)))
    page.goto(srv.url + "/")
    page.click("#open-settings")
    page.fill("input[name=max_tokens]", "100000")  # beyond the server's limit (its context): a 400, not the page's
    page.click("#settings button[value=ok]")
    page.fill("#prompt", PROMPT)
    page.press("#prompt", "Enter")
    err = page.locator(".turn >> nth=-1 >> .answer.epicode .err")
    err.wait_for(timeout=30_000)
    assert "'max_tokens' is 100000, more than this server's limit" in err.inner_text()
    page.click("#open-settings")
    page.fill("input[name=max_tokens]", str(MAX))
    page.click("#settings button[value=ok]")

    pick, calls = batch_loop._pick, []

    def failing_pick(q, *a, **k):  # the engine's logits turn bad after a few tokens of this answer
        calls.append(1)
        if len(calls) > 3:
            raise NumericError("expert logits are not finite at position 12 (test)")
        return pick(q, *a, **k)

    monkeypatch.setattr(batch_loop, "_pick", failing_pick)
    page.fill("#prompt", PROMPT)
    page.press("#prompt", "Enter")
    err = page.locator(".turn >> nth=-1 >> .answer.epicode .err")
    err.wait_for(timeout=30_000)
    assert "not finite at position 12" in err.inner_text()
    assert page.locator(".turn >> nth=-1 >> .answer.epicode .ep-tok").count() == 3  # what came before stays
    monkeypatch.setattr(batch_loop, "_pick", pick)
    page.fill("#prompt", PROMPT)
    page.press("#prompt", "Enter")
    ans = _answer(page, "epicode")
    assert ans.locator(".err").count() == 0 and ans.locator(".ep-tok").count() > 0
    assert guard.outside == [] and errors == []
    ctx.close()


def _screenshots(browser, page, out: Path) -> None:
    """The page side by side with a changed pick's candidates open, light and dark."""
    out.mkdir(parents=True, exist_ok=True)
    page.locator(".turn >> nth=-1 >> .answer.epicode .ep-tok.ep-changed").first.click()
    page.locator(".ep-pop").wait_for(state="visible")
    page.screenshot(path=str(out / "chat-light.png"))
    page.keyboard.press("Escape")
    state = page.context.storage_state()
    dark = browser.new_context(viewport={"width": 1280, "height": 860}, color_scheme="dark", storage_state=state)
    Guard(dark)
    dark.add_init_script(f"sessionStorage.setItem('epicode-key', {json.dumps(KEY)})")  # a tab that has the key
    p = dark.new_page()
    p.goto(page.url)
    changed = p.locator(".turn >> nth=-1 >> .answer.epicode .ep-tok.ep-changed").first
    changed.wait_for()
    changed.click()
    p.locator(".ep-pop").wait_for(state="visible")
    p.screenshot(path=str(out / "chat-dark.png"))
    dark.close()


def test_report_html_filters_and_explains(browser, evaluated):
    _, report = evaluated
    ctx = browser.new_context()
    guard = Guard(ctx)
    page = ctx.new_page()
    errors = []
    page.on("pageerror", lambda e: errors.append(str(e)))
    page.goto((report.out_dir / "report.html").as_uri())
    assert page.locator("#rows tbody tr").count() == 2
    items = page.locator(".item")
    assert items.count() == 2
    page.click(".filters button[data-f=won]")
    assert [i.get_attribute("data-outcome") for i in items.all() if i.is_visible()] == ["won"]
    page.click(".filters button[data-f=lost]")
    assert [i.get_attribute("data-outcome") for i in items.all() if i.is_visible()] == ["lost"]
    page.click(".filters button[data-f=all]")
    changed = page.locator(".ep-tok.ep-changed")
    assert changed.count() > 0
    changed.first.hover()
    page.locator(".ep-pop").wait_for(state="visible")
    assert "changed by contrastive decoding" in page.locator(".ep-pop").inner_text()
    assert guard.outside == [] and errors == []
    ctx.close()
