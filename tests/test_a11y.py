"""Keyboard, screen reader and feedback in a real browser (issue #12 §5, §6): Debian's
Chromium through Playwright against one `manage.py serve` and one simulator for the module.

* axe-core (axe-playwright-python, which bundles axe.min.js) finds no serious or critical
  violation on any page, in light and in dark mode;
* a live re-render keeps focus on the same control;
* the swap dialog takes focus, keeps Tab inside and gives focus back on close;
* a keyboard-only user loads, swaps and pins a slot, hearing each outcome (toasts);
* revoking a token asks first; a failed request shows a banner; tables fit a phone.
"""

from __future__ import annotations

from pathlib import Path

import httpx
import pytest

from tests.harness import (
    CHROMIUM,
    HAVE_CHROMIUM,
    Stack,
    browser_login,
    chromium,
    free_port,
    screenshot_of,
    wait_for,
)
from tests.sim_fixtures import start_simulator

ROOT = Path(__file__).resolve().parent.parent
ARTIFACTS = ROOT / "test-artifacts"  # docs/img/ holds copies of these screenshots
OTHER_CHAT_MODEL = "Qwen3-0.6B-GGUF"

pytestmark = [
    pytest.mark.e2e,
    pytest.mark.browser,
    pytest.mark.skipif(not HAVE_CHROMIUM,
                       reason=f"{CHROMIUM} is missing (apt-get install -y chromium)"),
]


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """One serve for the module: a simulator whose loads take long enough to see, a token,
    and a second node where nothing listens (dead and empty: folded to one line)."""
    ARTIFACTS.mkdir(exist_ok=True)
    sim = start_simulator(load_delay=0.6, pull_delay=0.3, token_delay=0.005)
    stack = Stack(tmp_path_factory.mktemp("a11y"), HAL0_LEMONADE_URL=sim.url,
                  HAL0_LOG_LEVEL="WARNING", HAL0_STATS_EVERY_S="1")
    try:
        stack.setup(username="operator")
        stack.manage("tokens", "create", "open-webui")
        stack.manage("shell", "-c", "from slots.models import Node\n"
                     f"Node.objects.create(name='spare', base_url='http://127.0.0.1:{free_port()}')")
        yield stack.serve(), sim, stack
    finally:
        stack.stop()
        sim.stop()


@pytest.fixture(scope="module")
def site(served):
    url, sim, _ = served
    return url, sim


@pytest.fixture(scope="module")
def browser():
    with chromium() as b:
        yield b


def login(browser, url: str, width: int = 1280, color_scheme: str = "light"):
    page = browser_login(browser, url, width=width, color_scheme=color_scheme)
    page.wait_for_selector("#live-status.on", timeout=10_000)
    return page


def active_id(page) -> str:
    return page.evaluate("document.activeElement && document.activeElement.id || ''")


def press_enter(page) -> None:
    """Enter on the focused control once htmx has wired it up (a pushed card is processed
    a moment after it lands, as it would be long before a person's next key press)."""
    # (no wait_for_function: its string predicate needs eval, which the CSP forbids)
    wait_for(lambda: page.evaluate("() => { const e = document.activeElement;"
                                   " return !!(e && e.isConnected && e['htmx-internal-data']); }"),
             timeout=5, interval=0.02)
    page.keyboard.press("Enter")


def tab_to(page, element_id: str, limit: int = 80) -> None:
    """Press Tab until `element_id` has focus, as a keyboard user would."""
    for _ in range(limit):
        if active_id(page) == element_id:
            return
        page.keyboard.press("Tab")
    raise AssertionError(f"Tab never reached #{element_id}; focus is on #{active_id(page)}")


PAGES = ["/", "/slots/chat/", "/tokens/", "/nodes/", "/logs/", "/no-such-page/"]


def serious(results) -> list[str]:
    return [f"{v['id']} ({v['impact']}): {v['help']} — "
            + "; ".join(n["target"][0] if isinstance(n["target"][0], str) else str(n["target"])
                        for n in v["nodes"][:3])
            for v in results.response["violations"] if v["impact"] in ("serious", "critical")]


def test_axe_finds_nothing_serious_on_any_page_in_either_theme(site, browser):
    from axe_playwright_python.sync_playwright import Axe

    url, _ = site
    axe = Axe()
    found: dict[str, list[str]] = {}
    for scheme in ("light", "dark"):
        anonymous = browser.new_context(color_scheme=scheme)
        login_page = anonymous.new_page()
        login_page.goto(f"{url}/accounts/login/")
        found[f"{scheme} /accounts/login/"] = serious(axe.run(login_page))
        anonymous.close()
        page = login(browser, url, color_scheme=scheme)
        for path in PAGES:
            page.goto(f"{url}{path}")
            page.wait_for_load_state("networkidle")
            found[f"{scheme} {path}"] = serious(axe.run(page))
        # and with the swap dialog open, and a toast showing
        page.goto(f"{url}/")
        page.wait_for_selector("#live-status.on")
        page.click("#act-chat-swap")
        page.wait_for_selector("#swap-dialog[open]")
        page.wait_for_selector("#picker-rows")
        found[f"{scheme} swap dialog"] = serious(axe.run(page))
        page.context.close()
    assert {k: v for k, v in found.items() if v} == {}


def test_a_keyboard_user_loads_swaps_and_pins_hearing_each_outcome(site, browser):
    from playwright.sync_api import expect

    url, _ = site
    page = login(browser, url)
    card = page.locator("#slot-chat")
    toasts = page.locator("#toasts")

    # the skip link is the first stop and jumps to the content
    page.keyboard.press("Tab")
    assert page.evaluate("document.activeElement.className") == "skip-link"
    page.keyboard.press("Enter")
    assert active_id(page) == "main"


    # load: Enter on "Load chat"; focus stays on it while the card re-renders
    tab_to(page, "act-chat-load")
    assert page.evaluate("document.activeElement.textContent") == "Load chat"
    page.evaluate("document.activeElement.dataset.before = 'yes'")
    press_enter(page)
    expect(card.locator(".badge")).to_have_text("ready", timeout=10_000)
    expect(toasts).to_contain_text("chat is loaded.", timeout=5_000)
    assert active_id(page) == "act-chat-load"
    # … and it is the new card's button, not a detached old one
    assert page.evaluate("document.activeElement.dataset.before") is None
    assert page.evaluate("document.activeElement.isConnected")

    # swap: the dialog takes focus (its filter), a swap closes it and focus comes back
    tab_to(page, "act-chat-swap")
    press_enter(page)
    dialog = page.locator("#swap-dialog")
    expect(dialog).to_be_visible()
    expect(page.locator("#picker-rows")).to_contain_text(OTHER_CHAT_MODEL)
    assert page.evaluate("document.activeElement.type") == "search"
    page.keyboard.type("Qwen3-0.6B")
    expect(page.locator("#picker-rows li").first).to_contain_text(OTHER_CHAT_MODEL)
    expect(page.locator("#picker-rows li")).not_to_have_count(61)
    tab_to(page, "swapto-Qwen3-0-6B-GGUF")
    press_enter(page)
    expect(dialog).to_have_count(0)
    assert active_id(page) == "act-chat-swap"
    expect(card.locator(".model")).to_have_text(OTHER_CHAT_MODEL, timeout=10_000)
    expect(toasts).to_contain_text(f"chat now serves {OTHER_CHAT_MODEL}", timeout=10_000)

    # pin: the same control turns into "Unpin chat", focus stays on it
    tab_to(page, "act-chat-pin")
    press_enter(page)
    expect(page.locator("#act-chat-pin")).to_have_text("Unpin chat")
    expect(toasts).to_contain_text("chat is pinned.")
    assert active_id(page) == "act-chat-pin"
    press_enter(page)
    expect(page.locator("#act-chat-pin")).to_have_text("Pin chat")
    screenshot_of(page, "#slot-chat", str(ARTIFACTS / "keyboard-focus.png"))  # pushed
    page.context.close()


def test_focus_stays_put_across_a_push_from_elsewhere(site, browser):
    from playwright.sync_api import expect

    url, sim = site
    page = login(browser, url)
    card = page.locator("#slot-embed")
    model = card.locator(".model").inner_text()
    page.focus("#act-embed-restart")
    page.evaluate("document.activeElement.dataset.before = 'yes'")
    # a change made behind hal0's back: the reconciler pushes a new card
    httpx.post(f"{sim.url}/v1/load", json={"model_name": model}, timeout=10)
    expect(card.locator(".badge")).not_to_have_text("offline", timeout=10_000)
    expect(page.locator("#act-embed-restart")).not_to_have_attribute("data-before", "yes")
    assert active_id(page) == "act-embed-restart"
    assert page.evaluate("document.activeElement.isConnected")
    httpx.post(f"{sim.url}/v1/unload", json={"model_name": model}, timeout=5)
    expect(card.locator(".badge")).to_have_text("offline", timeout=10_000)
    assert active_id(page) == "act-embed-restart"
    page.context.close()


def test_the_swap_dialog_keeps_tab_inside_and_gives_focus_back(site, browser):
    from playwright.sync_api import expect

    url, _ = site
    page = login(browser, url)
    page.focus("#act-embed-swap")
    press_enter(page)
    dialog = page.locator("#swap-dialog")
    expect(dialog).to_be_visible()
    expect(page.locator("#picker-rows")).to_be_visible()
    inside = "document.getElementById('swap-dialog').contains(document.activeElement)"
    for key in ["Tab"] * 12 + ["Shift+Tab"] * 12:
        page.keyboard.press(key)
        assert page.evaluate(inside), f"{key} left the dialog for #{active_id(page)}"
    page.locator("#swap-dialog").screenshot(path=str(ARTIFACTS / "swap-dialog.png"))
    page.keyboard.press("Escape")
    expect(dialog).to_have_count(0)
    assert active_id(page) == "act-embed-swap"
    # the × button closes it as well
    press_enter(page)
    expect(dialog).to_be_visible()
    page.get_by_role("button", name="Close the swap dialog").click()
    expect(dialog).to_have_count(0)
    assert active_id(page) == "act-embed-swap"
    page.context.close()


def test_revoking_a_token_asks_first_and_says_so(site, browser):
    from playwright.sync_api import expect

    url, _ = site
    page = login(browser, url)
    page.goto(f"{url}/tokens/")
    revoke = page.get_by_role("button", name="Revoke token open-webui")
    revoke.click()
    confirm = page.locator("#confirm")
    expect(confirm).to_be_visible()
    expect(confirm).to_contain_text("Revoke token open-webui?")
    assert active_id(page) == "confirm-cancel"  # the safe answer has focus
    page.keyboard.press("Enter")
    expect(confirm).to_be_hidden()
    assert active_id(page) == "revoke-open-webui"
    expect(page.locator("#token-open-webui")).not_to_contain_text("revoked")
    revoke.click()
    page.click("#confirm-ok")
    page.wait_for_url(f"{url}/tokens/")
    expect(page.locator("#toasts")).to_contain_text("Revoked token open-webui")
    expect(page.locator("#token-open-webui")).to_contain_text("revoked")
    page.context.close()


def test_a_request_that_cannot_reach_hal0_shows_a_banner(site, browser):
    from playwright.sync_api import expect

    url, _ = site
    page = login(browser, url)
    banner = page.locator("#conn-banner")
    expect(banner).to_be_hidden()
    page.route("**/do/pin/", lambda route: route.abort("connectionrefused"))
    page.click("#act-rerank-pin")
    expect(banner).to_be_visible()
    expect(banner).to_contain_text("hal0 cannot be reached")
    page.unroute("**/do/pin/")
    page.route("**/do/pin/", lambda route: route.fulfill(status=502, body="bad gateway",
                                                         content_type="text/plain"))
    page.click("#act-rerank-pin")
    expect(banner).to_contain_text("hal0 answered 502")
    page.unroute("**/do/pin/")
    page.click("#act-rerank-pin")  # a request that works clears it
    expect(banner).to_be_hidden()
    page.click("#act-rerank-pin")  # unpin again
    page.context.close()


def test_phone_tables_fit_touch_targets_and_a_quiet_console(site, browser):
    url, sim = site
    page = login(browser, url, width=390)
    problems: list[str] = []
    page.on("console", lambda m: problems.append(m.text) if m.type == "error" else None)
    page.on("pageerror", lambda e: problems.append(str(e)))
    for path in ("/tokens/", "/nodes/", "/", "/slots/chat/"):
        if path == "/slots/chat/":
            with page.expect_websocket() as socket:
                page.goto(f"{url}{path}")
        else:
            page.goto(f"{url}{path}")
        page.wait_for_load_state("networkidle")
        overflow = page.evaluate(
            "document.documentElement.scrollWidth - document.documentElement.clientWidth")
        assert overflow <= 0, path
        small = page.evaluate("""() => [...document.querySelectorAll('main button, main .button')]
            .filter(b => b.offsetParent !== null)
            .map(b => [b.textContent.trim(), b.getBoundingClientRect().height])
            .filter(([, h]) => h < 44)""")
        assert small == [], (path, small)
    # the slot page hears pushes for other cards (and node headers, the dashboard's grid):
    # none may log an htmx error (an out-of-band swap without a target)
    page.wait_for_selector("#live-status.on")
    model = "bge-reranker-v2-m3-GGUF"
    with socket.value.expect_event(
            "framereceived", lambda frame: 'id="slot-rerank"' in str(frame), timeout=10_000):
        httpx.post(f"{sim.url}/v1/load", json={"model_name": model}, timeout=10)
    with socket.value.expect_event(
            "framereceived", lambda frame: 'id="slot-rerank"' in str(frame), timeout=10_000):
        httpx.post(f"{sim.url}/v1/unload", json={"model_name": model}, timeout=5)
    page.evaluate("1")  # let the page's console messages arrive
    assert problems == []
    page.context.close()


def test_with_hal0_stopped_the_page_says_so(served, browser):
    """Last in the module: it stops the module's serve."""
    from playwright.sync_api import expect

    url, _, stack = served
    page = login(browser, url)
    banner = page.locator("#conn-banner")
    stack.stop()
    expect(banner).to_contain_text("The live connection to hal0 is lost", timeout=10_000)
    expect(page.locator("#live-status")).to_have_text("reconnecting")
    page.click("#act-rerank-pin")  # pin is legal in every state
    expect(banner).to_contain_text("hal0 cannot be reached", timeout=10_000)
    page.context.close()
