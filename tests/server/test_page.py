"""The web page at ``/``, end to end: Playwright driving Debian's Chromium
against a real uvicorn on loopback.

The model is the scripted echo (``You said: ...``) with a delay between
words, so a long message streams for seconds: long enough to watch the text
grow, reload in the middle, or follow it from a second tab.

Screenshots go to ``$CHATSESSION_TEST_ARTIFACTS/page`` (default:
``test-artifacts/page`` at the repository root).

Skipped (with the reason) only when the ``playwright`` package or
``/usr/bin/chromium`` is missing.
"""

from __future__ import annotations

import itertools
import os
import re
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from starlette.responses import JSONResponse

from chatsession import Agent, ScriptedLLM
from chatsession.server.routes.page import STATIC_FILES
from tests.server.conftest import LiveServer, live_server

CHROMIUM = "/usr/bin/chromium"
ROOT = Path(__file__).resolve().parents[2]
ARTIFACTS = Path(os.environ.get("CHATSESSION_TEST_ARTIFACTS", ROOT / "test-artifacts")) / "page"
STATIC = ROOT / "src" / "chatsession" / "server" / "static"
CHUNK_DELAY = 0.05  # seconds between streamed words


def words(count: int, tag: str) -> str:
    """A message of ``count`` numbered words (the echo streams one word at a time)."""
    return " ".join(f"{tag}{i}" for i in range(count))


def echo(message: str) -> str:
    """What the scripted model answers."""
    return f"You said: {message}"


@pytest.fixture(scope="module")
def server() -> Iterator[LiveServer]:
    """A server with a slow echo model, and users alice and bob."""
    agent = Agent(ScriptedLLM(chunk_delay=CHUNK_DELAY))
    with live_server(agent=agent) as running:
        running.user("alice")
        running.user("bob")
        yield running


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    """Headless Chromium (Debian's) through Playwright."""
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        pytest.skip("the playwright package is not installed (pip install playwright)")
    if not Path(CHROMIUM).exists():
        pytest.skip(f"{CHROMIUM} is missing (apt-get install -y chromium)")
    args = ["--no-sandbox"] if os.geteuid() == 0 else []
    with sync_playwright() as playwright:
        launched = playwright.chromium.launch(executable_path=CHROMIUM, headless=True, args=args)
        try:
            yield launched
        finally:
            launched.close()


@pytest.fixture
def context(browser: Any) -> Iterator[Any]:
    """A fresh browser context (its own session storage); page errors fail the test."""
    ctx = browser.new_context(viewport={"width": 1280, "height": 860})
    errors: list[str] = []
    ctx.on("weberror", lambda error: errors.append(str(error.error)))
    yield ctx
    ctx.close()
    assert not errors, f"errors in the page: {errors}"


def shot(page: Any, name: str) -> None:
    """Save a screenshot as a test artifact."""
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / f"{name}.png"), full_page=True)


def sign_in(page: Any, server: LiveServer, who: str) -> None:
    """Open the page and sign in with ``who``'s key."""
    page.goto(server.url + "/")
    page.get_by_label("API key").fill(server.keys[who])
    page.get_by_role("button", name="Sign in").click()
    page.get_by_role("button", name="New session").wait_for()


def new_session(page: Any) -> str:
    """Create a session from the page; returns its id (from the address)."""
    before = page.url
    page.get_by_role("button", name="New session").click()
    page.wait_for_function(
        "before => location.href !== before && location.hash.startsWith('#s=')", arg=before
    )
    page.get_by_label("Message", exact=True).wait_for(state="visible")
    return current_id(page)


def current_id(page: Any) -> str:
    """The open session's id."""
    match = re.search(r"#s=([^&]+)", page.url)
    assert match, page.url
    return match.group(1)


def send(page: Any, text: str) -> None:
    """Type a message and send it."""
    box = page.get_by_label("Message", exact=True)
    page.wait_for_function("() => !document.getElementById('message').disabled")
    box.fill(text)
    page.get_by_role("button", name="Send").click()


def conversation(page: Any) -> Any:
    """The conversation log."""
    return page.get_by_role("log", name="Conversation")


def live_text(page: Any) -> str:
    """The text of the answer in progress ('' when there is none)."""
    live = conversation(page).get_by_role("article", name="Answer in progress")
    if live.count() == 0:
        return ""
    try:
        return "".join(live.first.locator(".text").all_inner_texts())
    except Exception:  # it was replaced by the stored answer meanwhile
        return ""


def assistant_texts(page: Any) -> list[str]:
    """The stored assistant answers shown, oldest first."""
    items = conversation(page).locator("article.msg.assistant:not(.live) .text")
    return [str(text) for text in items.all_inner_texts()]


def wait_answer(page: Any, expected: str, timeout: float = 30) -> None:
    """Wait until ``expected`` is shown as a stored answer and nothing streams."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if expected in assistant_texts(page) and live_text(page) == "":
            return
        time.sleep(0.05)
    raise AssertionError(f"the answer never appeared whole: {assistant_texts(page)!r}")


def watch_growth(page: Any, final: str, timeout: float = 30) -> list[str]:
    """The texts the answer in progress showed until ``final`` was stored."""
    seen: list[str] = []
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        text = live_text(page)
        if text and (not seen or seen[-1] != text):
            seen.append(text)
        if final in assistant_texts(page):
            return seen
        time.sleep(0.03)
    raise AssertionError(f"no whole answer; the live text went {seen[-3:]!r}")


def assert_grew(seen: list[str], final: str, least: int = 3) -> None:
    """The live text showed at least ``least`` growing prefixes of ``final``."""
    partial = [text for text in seen if text != final]
    assert len(partial) >= least, f"the answer did not stream: {seen!r}"
    for earlier, later in itertools.pairwise(partial):
        assert later.startswith(earlier.rstrip()), (earlier, later)
    for text in partial:
        assert final.startswith(text.rstrip()), (text, final)


def api(server: LiveServer, who: str, method: str, path: str, **kwargs: Any) -> Any:
    """Call the API as ``who``."""
    with server.client() as client:
        return client.request(method, path, headers=server.headers(who), **kwargs)


def turn_ends(server: LiveServer, who: str, session_id: str) -> list[str]:
    """The statuses of the session's turn ends."""
    reply = api(server, who, "GET", f"/v1/sessions/{session_id}/history?limit=1000")
    assert reply.status_code == 200, reply.text
    return [
        event["data"].get("status", "completed")
        for event in reply.json()["events"]
        if event["type"] == "turn_end"
    ]


# ---- served files (no browser needed) ---------------------------------------------


def test_page_and_static_files_are_served_from_the_package(server: LiveServer) -> None:
    with server.client() as client:
        index = client.get("/")
        assert index.status_code == 200
        assert index.headers["content-type"].startswith("text/html")
        policy = index.headers["content-security-policy"]
        assert "connect-src 'self'" in policy and "script-src 'self'" in policy
        assert index.headers["x-content-type-options"] == "nosniff"
        assert 'src="/static/app.js"' in index.text
        for name, media_type in STATIC_FILES.items():
            reply = client.get(f"/static/{name}")
            assert reply.status_code == 200, name
            assert reply.headers["content-type"] == media_type
            assert reply.content == (STATIC / name).read_bytes()
        for bad in ("nope.js", "..%2Fapp.py", "%2E%2E%2F__init__.py"):
            reply = client.get(f"/static/{bad}")
            assert reply.status_code == 404, bad
            assert reply.json()["error"]["type"] == "not_found"
        # the page is not part of the API's schema
        assert "/static/{name}" not in client.get("/openapi.json").json()["paths"]


def test_the_page_fetches_nothing_from_elsewhere_and_never_writes_html() -> None:
    for name in STATIC_FILES:
        text = (STATIC / name).read_text()
        assert not re.search(r"https?://", text), f"{name} names another origin"
        assert "@import" not in text
    script = (STATIC / "app.js").read_text()
    for sink in ("innerHTML", "outerHTML", "insertAdjacentHTML", "document.write", "eval("):
        assert sink not in script, sink


# ---- in the browser ------------------------------------------------------------------


def test_sign_in_and_a_streamed_answer(server: LiveServer, context: Any) -> None:
    page = context.new_page()
    page.goto(server.url + "/")
    page.get_by_label("API key").fill("csk_000000000000_not-a-real-key")
    page.get_by_role("button", name="Sign in").click()
    assert "unknown or was revoked" in page.get_by_role("alert").first.inner_text()
    shot(page, "01-sign-in-refused")

    sign_in(page, server, "alice")
    session_id = new_session(page)
    message = words(40, "w")
    send(page, message)
    seen = watch_growth(page, echo(message))
    assert_grew(seen, echo(message))
    wait_answer(page, echo(message))
    shot(page, "02-streamed-answer")
    assert page.get_by_role("article", name=re.compile(r"You message \d+")).last.inner_text()
    assert turn_ends(server, "alice", session_id) == ["completed"]

    # usage and context use
    usage = page.get_by_role("definition").first
    page.wait_for_function("() => document.querySelectorAll('#usage dd').length > 0")
    assert int(usage.inner_text()) > 0
    page.wait_for_function("() => document.getElementById('context-meter').value > 0")
    assert "tokens" in page.locator("#context-text").inner_text()

    # the tree lists it; a reload keeps the key (this tab) and the open session
    tree = page.get_by_role("tree", name="Sessions and forks")
    assert tree.locator(f'[data-session-id="{session_id}"]').count() == 1
    page.reload()
    page.get_by_role("button", name="New session").wait_for()
    wait_answer(page, echo(message))


def test_text_is_escaped(server: LiveServer, context: Any) -> None:
    page = context.new_page()
    sign_in(page, server, "alice")
    new_session(page)
    hostile = '<img src=x onerror="window.__owned=1"> <b>bold</b> &amp;'
    send(page, hostile)
    wait_answer(page, echo(hostile))
    log = conversation(page)
    assert log.locator("img").count() == 0
    assert log.locator("b").count() == 0
    assert page.evaluate("() => window.__owned === undefined")
    shot(page, "03-escaped")


def test_reload_mid_answer_still_shows_the_whole_answer(server: LiveServer, context: Any) -> None:
    page = context.new_page()
    sign_in(page, server, "alice")
    session_id = new_session(page)
    message = words(90, "r")  # ~4.5 s of streaming
    send(page, message)
    deadline = time.monotonic() + 20
    while len(live_text(page)) < 60:
        assert time.monotonic() < deadline, "the answer never started"
        time.sleep(0.03)
    before = live_text(page)
    page.reload()
    page.get_by_role("article", name="Answer in progress").wait_for(timeout=10_000)
    shot(page, "04-after-reload-mid-answer")
    seen = watch_growth(page, echo(message))
    assert_grew(seen, echo(message), least=2)
    assert len(seen[0]) >= len(before) - 20, "the reload lost the text shown before it"
    wait_answer(page, echo(message))
    shot(page, "05-after-reload-whole")
    assert assistant_texts(page).count(echo(message)) == 1
    # the reload did not cancel the turn
    assert turn_ends(server, "alice", session_id) == ["completed"]


def test_a_second_tab_shows_the_answer_live(server: LiveServer, context: Any) -> None:
    first = context.new_page()
    sign_in(first, server, "alice")
    session_id = new_session(first)
    second = context.new_page()  # its own session storage: it signs in too
    sign_in(second, server, "alice")
    second.goto(f"{server.url}/#s={session_id}")
    second.get_by_label("Message", exact=True).wait_for(state="visible")
    second.wait_for_function("() => !document.getElementById('message').disabled")
    message = words(50, "t")
    send(first, message)
    seen = watch_growth(second, echo(message))
    assert_grew(seen, echo(message))
    wait_answer(second, echo(message))
    # the second tab shows the first tab's message too
    mine = conversation(second).get_by_role("article", name=re.compile(r"You message"))
    assert mine.last.locator(".text").inner_text() == message
    shot(second, "06-second-tab")
    wait_answer(first, echo(message))


def test_fork_from_a_message_and_the_tree_of_forks(server: LiveServer, context: Any) -> None:
    page = context.new_page()
    sign_in(page, server, "alice")
    parent = new_session(page)
    send(page, "first question")
    wait_answer(page, echo("first question"))
    send(page, "second question")
    wait_answer(page, echo("second question"))
    first_answer = (
        conversation(page).get_by_role("article", name=re.compile(r"Assistant message \d+")).first
    )
    seq = int(first_answer.get_attribute("data-seq"))
    first_answer.get_by_role("button", name=f"Fork from message {seq}").click()
    page.wait_for_function("parent => !location.hash.includes(parent)", arg=parent)
    fork = current_id(page)
    wait_answer(page, echo("first question"))
    assert echo("second question") not in assistant_texts(page)
    send(page, "a different second question")
    wait_answer(page, echo("a different second question"))
    # the tree shows the fork under its parent
    tree = page.get_by_role("tree", name="Sessions and forks")
    parent_item = tree.locator(f'[role="treeitem"][data-session-id="{parent}"]')
    assert parent_item.locator(f'[role="group"] [data-session-id="{fork}"]').count() == 1
    shot(page, "07-fork-tree")
    # forked at the end of that answer's turn: the fork's first turn is closed, not interrupted
    assert conversation(page).get_by_text("Turn interrupted").count() == 0
    reply = api(server, "alice", "GET", f"/v1/sessions/{fork}")
    fork_point = reply.json()["parent"]
    assert fork_point["session_id"] == parent
    history = api(server, "alice", "GET", f"/v1/sessions/{parent}/history").json()["events"]
    ends = [e["seq"] for e in history if e["type"] == "turn_end" and e["seq"] > seq]
    assert fork_point["seq"] == ends[0]
    assert turn_ends(server, "alice", fork) == ["completed", "completed"]
    # the parent is untouched
    parent_item.get_by_role("button").first.click()
    page.wait_for_function("parent => location.hash.includes(parent)", arg=parent)
    wait_answer(page, echo("second question"))
    assert echo("a different second question") not in assistant_texts(page)


def test_checkpoint_and_rewind(server: LiveServer, context: Any) -> None:
    page = context.new_page()
    sign_in(page, server, "alice")
    session_id = new_session(page)
    send(page, "before the checkpoint")
    wait_answer(page, echo("before the checkpoint"))
    page.get_by_label("Checkpoint name").fill("safe")
    page.get_by_role("button", name="Save checkpoint").click()
    page.get_by_role("button", name="Rewind to checkpoint safe").wait_for()
    send(page, "after the checkpoint")
    wait_answer(page, echo("after the checkpoint"))
    page.wait_for_function(
        "() => /[0-9]+ messages/.test(document.getElementById('context-text').textContent)"
    )
    page.get_by_role("button", name="Rewind to checkpoint safe").click()
    conversation(page).get_by_text(re.compile(r"Rewound to #\d+ \(checkpoint safe\)")).wait_for()
    page.wait_for_function(
        "() => / 2 messages/.test(document.getElementById('context-text').textContent)"
    )
    shot(page, "08-rewound")
    reply = api(server, "alice", "GET", f"/v1/sessions/{session_id}/context")
    assert reply.json()["messages"] == 2


def test_another_user_sees_none_of_the_first_users_sessions(
    server: LiveServer, context: Any
) -> None:
    alice_page = context.new_page()
    sign_in(alice_page, server, "alice")
    alice_session = new_session(alice_page)
    send(alice_page, "alice's secret")
    wait_answer(alice_page, echo("alice's secret"))

    bob_context = context.browser.new_context()
    try:
        bob = bob_context.new_page()
        sign_in(bob, server, "bob")
        tree = bob.get_by_role("tree", name="Sessions and forks")
        assert bob.locator("#sessions-status").inner_text() == "No sessions yet."
        assert tree.locator(f'[data-session-id="{alice_session}"]').count() == 0
        assert tree.get_by_role("treeitem").count() == 0
        assert "alice" not in bob.locator("body").inner_text()
        # opening alice's session by its address: not found, nothing shown
        bob.goto(f"{server.url}/#s={alice_session}")
        bob.reload()
        alert = bob.locator("#chat-error")
        alert.wait_for()
        assert "Not found" in alert.inner_text()
        assert "secret" not in bob.locator("body").inner_text()
        shot(bob, "09-second-user")
        assert api(server, "bob", "GET", f"/v1/sessions/{alice_session}").status_code == 404
    finally:
        bob_context.close()


def test_sent_as_json_and_shown_from_the_live_events(server: LiveServer, context: Any) -> None:
    """With the live-events route, the turn does not belong to the page's connection."""
    page = context.new_page()
    posts: list[Any] = []
    watches: list[str] = []
    page.on("request", lambda r: posts.append(r.post_data_json) if r.method == "POST" else None)
    page.on("request", lambda r: watches.append(r.url) if r.url.endswith("/events") else None)
    sign_in(page, server, "alice")
    session_id = new_session(page)
    message = words(20, "j")
    send(page, message)
    wait_answer(page, echo(message))
    assert {"message": message, "stream": False} in posts
    assert any(session_id in url for url in watches)


def test_without_the_live_events_route_the_answer_streams_from_the_post(
    context: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An older server (no ``/events``): the page reads the POST's own event stream."""
    import tests.server.conftest as harness

    made = harness.create_app

    def without_events(*args: Any, **kwargs: Any) -> Any:
        app = made(*args, **kwargs)

        async def older_server(scope: Any, receive: Any, send: Any) -> None:
            if scope["type"] == "http" and scope["path"].endswith("/events"):
                body = {"error": {"type": "not_found", "message": "Not Found"}}
                await JSONResponse(body, status_code=404)(scope, receive, send)
                return
            await app(scope, receive, send)

        return older_server

    monkeypatch.setattr(harness, "create_app", without_events)
    with live_server(agent=Agent(ScriptedLLM(chunk_delay=CHUNK_DELAY))) as old:
        old.user("alice")
        page = context.new_page()
        posts: list[Any] = []
        page.on("request", lambda r: posts.append(r.post_data_json) if r.method == "POST" else None)
        refused: list[int] = []
        page.on(
            "response",
            lambda r: refused.append(r.status) if r.url.endswith("/events") else None,
        )
        sign_in(page, old, "alice")
        new_session(page)
        deadline = time.monotonic() + 10
        while not refused:  # the page tried the route once
            assert time.monotonic() < deadline
            page.wait_for_timeout(20)
        assert refused == [404]
        message = words(40, "b")
        send(page, message)
        seen = watch_growth(page, echo(message))
        assert_grew(seen, echo(message))
        wait_answer(page, echo(message))
        assert {"message": message, "stream": True} in posts
        shot(page, "10-without-live-events")


def test_windows_and_paging(server: LiveServer, context: Any) -> None:
    carol = server.user("carol")
    assert carol
    for i in range(55):
        reply = api(server, "carol", "POST", "/v1/sessions", json={"title": f"old {i:02d}"})
        assert reply.status_code == 201, reply.text
    page = context.new_page()
    sign_in(page, server, "carol")
    tree = page.get_by_role("tree", name="Sessions and forks")
    assert tree.get_by_role("treeitem").count() == 50
    page.get_by_role("button", name="More sessions").click()
    page.wait_for_function("() => document.querySelectorAll('[role=treeitem]').length === 55")
    assert page.get_by_role("button", name="More sessions").is_hidden()
    page.get_by_label("Window", exact=True).fill("tab-7")
    page.get_by_role("button", name="Open window").click()
    page.locator("#chat-meta").get_by_text(re.compile("window tab-7")).wait_for()
    first = current_id(page)
    page.get_by_label("Window", exact=True).fill("tab-7")
    page.get_by_role("button", name="Open window").click()
    page.wait_for_function("() => document.getElementById('message').disabled === false")
    assert current_id(page) == first  # the same window: the same session
    assert tree.get_by_role("treeitem").count() == 56
    shot(page, "11-windows-and-paging")
