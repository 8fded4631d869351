"""End to end in a real browser: headless Debian Chromium, driven by Playwright, labels through the page
served by uvicorn, by click and by keyboard, with one undo; the store then holds exactly those answers.

Uses /usr/bin/chromium (CI installs Debian's chromium package); never `playwright install`.
"""

import os

import pytest

CHROMIUM = "/usr/bin/chromium"
ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-quic", "--no-first-run",
        "--disable-component-update", "--disable-sync"]

pytestmark = pytest.mark.skipif(not os.path.exists(CHROMIUM),
                                reason=f"needs Debian's chromium at {CHROMIUM} (apt-get install chromium; CI does)")

pytest_plugins = ["feedback_fixtures"]  # store, make_store, live_server


@pytest.fixture(scope="module")
def browser():
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=ARGS)
        yield b
        b.close()


def wait_shown(page, n: int, state: str = "ready") -> None:
    """Wait until the n-th screen is up (the page counts them in <body data-shown>)."""
    page.wait_for_selector(f'body[data-state="{state}"][data-shown="{n}"]', state="attached", timeout=15_000)


def shown_pair(page) -> tuple[int, int]:
    return int(page.get_attribute("#left-img", "data-item-id")), int(page.get_attribute("#right-img", "data-item-id"))


def test_labeling_in_chromium_by_click_and_keyboard_with_undo(make_store, live_server, browser, tmp_path):
    store = make_store(n_items=8, n_queued=5)
    token = store.add_labeler("ann")
    server = live_server(store, seed=0, min_response_ms=0)  # the test clicks sooner than a person could
    page = browser.new_page(viewport={"width": 1000, "height": 720})
    problems = []
    page.on("pageerror", lambda err: problems.append(str(err)))
    page.on("console", lambda msg: problems.append(msg.text) if msg.type == "error" else None)

    page.goto(f"{server.url}/?token={token}")
    wait_shown(page, 1)
    assert "token" not in page.url  # taken out of the address bar (and history)
    assert "ann" in page.inner_text("#who") and "0 / 5" in page.inner_text("#progress-text")
    assert page.inner_text("#left-caption").startswith("x = (")
    expected = []

    a = shown_pair(page)
    page.click("#choose-left")
    expected.append((a, "left"))
    wait_shown(page, 2)
    b = shown_pair(page)
    page.keyboard.press("ArrowRight")  # answered, then taken back:
    wait_shown(page, 3)
    page.keyboard.press("u")
    wait_shown(page, 4)
    assert shown_pair(page) == b and "Undone" in page.inner_text("#status")
    page.keyboard.press("t")
    expected.append((b, "tie"))
    wait_shown(page, 5)
    c = shown_pair(page)
    page.click("#skip")
    expected.append((c, "skip"))
    wait_shown(page, 6)
    d = shown_pair(page)
    page.keyboard.press("ArrowDown")
    expected.append((d, "tie"))
    wait_shown(page, 7)
    page.screenshot(path=str(tmp_path / "labeling.png"))
    e = shown_pair(page)
    page.click("#choose-right")
    expected.append((e, "right"))
    wait_shown(page, 8, state="done")
    assert page.is_visible("#done") and "5 / 5" in page.inner_text("#progress-text")

    rows = store.comparisons()
    assert [((r["left"], r["right"]), r["choice"]) for r in rows] == expected
    assert all(r["labeler"] == "ann" and r["response_ms"] > 0 for r in rows)
    assert [frozenset(p) for p, _ in expected] == [frozenset(p) for p in store.queue()]  # in queue order
    assert not problems, problems


def test_the_page_without_a_valid_token_asks_for_one(make_store, live_server, browser):
    store = make_store(n_items=3)
    server = live_server(store)
    page = browser.new_page()
    page.goto(f"{server.url}/")
    page.wait_for_selector('body[data-state="login"]', state="attached")
    assert page.is_visible("#login") and not page.is_visible("#labeling")
    page.goto(f"{server.url}/?token=not-a-valid-token-0123456789")
    page.wait_for_selector('body[data-state="login"]', state="attached")
    assert "invalid token" in page.inner_text("#status")
    assert store.count_comparisons() == 0
