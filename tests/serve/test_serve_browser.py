"""The web page in a real Chromium (Debian's /usr/bin/chromium, driven by Playwright) against a real uvicorn server on a demo world."""

import os
import re
import threading
import time
from pathlib import Path

import pytest

from storage import Store
from tests.serve.worlds import indexed_world

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--no-first-run",
]
Q = "a red circle"
PASSWORD = "pw for the browser test"

pytestmark = [
    pytest.mark.browser,
    pytest.mark.skipif(
        not os.path.exists(CHROMIUM), reason=f"no Chromium at {CHROMIUM}: apt-get install chromium (.ci/run does)"
    ),
]
sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is not installed: pip install 'clipbt[test]'")
expect = sync_api.expect


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """(data home, {image id: outlined}) of 500 world images indexed with the shipped model."""
    home = tmp_path_factory.mktemp("browser-home")
    outlined = indexed_world(home, 500, seed=0)
    with Store.open(home=home) as store:
        for name in ("alice", "bob", "carol"):
            store.add_account(name, PASSWORD)
    return home, outlined


@pytest.fixture(scope="module")
def server(world):
    """A real uvicorn server on 127.0.0.1 at a random port, in a thread: its base URL."""
    import uvicorn

    from engine.serve import ServeConfig, create_app

    server = uvicorn.Server(
        uvicorn.Config(create_app(ServeConfig(home=world[0])), host="127.0.0.1", port=0, log_level="warning")
    )
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 120
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "the server did not start"
        time.sleep(0.05)
    port = server.servers[0].sockets[0].getsockname()[1]
    yield f"http://127.0.0.1:{port}"
    server.should_exit = True
    thread.join(30)


@pytest.fixture(scope="module")
def browser():
    with sync_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        yield browser
        browser.close()


@pytest.fixture
def open_page(browser, server, tmp_path):
    """A logged-in page of a user in a fresh browser context; a screenshot is kept if the test fails."""
    contexts = []

    def open_as(name, width=1280, height=900):
        context = browser.new_context(viewport={"width": width, "height": height})
        contexts.append(context)
        page = context.new_page()
        page.goto(server + "/")
        page.get_by_label("Name").fill(name)
        page.get_by_label("Password").fill(PASSWORD)
        page.get_by_role("button", name="Log in").click()
        expect(page.get_by_role("search")).to_be_visible()
        return page

    yield open_as
    for n, context in enumerate(contexts):
        for page in context.pages:
            page.screenshot(path=str(tmp_path / f"last-page-{n}.png"), full_page=True)
        context.close()


def search(page, text=Q) -> list[int]:
    """Search from the page; the ids of the results shown, best first."""
    before = page.locator("#app-view").get_attribute("data-generation") or "0"
    page.get_by_role("searchbox", name="Search text").fill(text)
    page.get_by_role("button", name="Search", exact=True).click()
    return _results_after(page, before)


def _results_after(page, generation: str) -> list[int]:
    view = page.locator("#app-view")
    expect(view).not_to_have_attribute("data-generation", generation)
    expect(view).to_have_attribute("aria-busy", "false")
    return [int(i) for i in page.locator("#results > li").evaluate_all("items => items.map(li => li.dataset.id)")]


def answer_duels(page, outlined: dict[int, bool], n: int) -> int:
    """Answer n duels in favour of outlined shapes; returns how many duels had exactly one outlined."""
    informative = 0
    for _ in range(n):
        choices = page.locator("#duel .duel-pair > button")
        expect(choices).to_have_count(2)
        a, b = (int(i) for i in choices.evaluate_all("buttons => buttons.map(b => b.dataset.id)"))
        informative += outlined[a] != outlined[b]
        winner = b if outlined[b] and not outlined[a] else a
        generation = page.locator("#app-view").get_attribute("data-generation")
        page.get_by_role("button", name=f"Prefer image {winner}", exact=True).click()
        _results_after(page, generation)
    return informative


def open_history(page) -> None:
    if page.locator("#history").get_attribute("open") is None:
        page.get_by_text("My preferences").click()


def test_duels_for_outlined_shapes_bring_more_of_them_to_the_top(open_page, world, server):
    home, outlined = world
    page = open_page("alice")
    before = search(page)[:10]
    expect(page.get_by_role("heading", name="Which do you prefer?")).to_be_visible()
    informative = answer_duels(page, outlined, 10)
    after = search(page)[:10]
    shots = os.environ.get("CLIPBT_SCREENSHOTS")
    if shots:
        Path(shots).mkdir(parents=True, exist_ok=True)
        open_history(page)
        page.screenshot(path=f"{shots}/desktop.png", full_page=True)
        page.set_viewport_size({"width": 390, "height": 844})
        page.screenshot(path=f"{shots}/phone.png", full_page=True)
        page.set_viewport_size({"width": 1280, "height": 900})
    n_before, n_after = sum(outlined[i] for i in before), sum(outlined[i] for i in after)
    print(f"outlined in the top 10: before {n_before}, after {n_after} ({informative} informative duels of 10)")
    assert n_after > n_before
    history = page.locator("#history-list > li")
    open_history(page)
    expect(history).to_have_count(10)
    page.on("dialog", lambda dialog: dialog.accept())
    page.get_by_role("button", name="Delete all my data").click()
    expect(page.get_by_role("heading", name="Log in")).to_be_visible()
    with Store.open(home=home) as store:
        assert "alice" not in store.users() and "alice" not in store.accounts()


def test_another_users_page_is_unaffected(open_page, world):
    _, outlined = world
    bob = open_page("bob", width=390, height=844)  # a phone-sized window
    bob_before = search(bob)
    carol = open_page("carol")
    search(carol)
    answer_duels(carol, outlined, 5)
    carol.get_by_role("button", name=re.compile(r"^Thumbs down image ")).first.click()
    bob.reload()
    expect(bob.get_by_role("search")).to_be_visible()
    assert search(bob) == bob_before
    open_history(bob)
    expect(bob.locator("#history-list > li")).to_have_count(0)
    expect(bob.get_by_text("My preferences (0)")).to_be_visible()
