"""Memory, capacity and the catalogue-backed Model field in a real browser (Chromium via
Playwright) against one `manage.py serve` and one lemond simulator for the module.

* the Model field refuses a typo naming the closest model, and its picker fills it in;
* on a slot's page that picker downloads and loads a model in one step (fit shown, a big
  download confirmed first);
* a load that would make lemond's LRU evict a pinned slot is refused, the reason shown in
  the confirm step, and nothing is loaded;
* the node header shows used/total memory and each loaded card what its model takes.

Screenshots of the memory bars and the fit verdict go to test-artifacts/; with
HAL0_DOCS_SCREENSHOTS=1 to docs/img/ (docs/dashboard.md), so a test run leaves the
tracked images alone.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import httpx
import pytest

from tests.harness import (
    CHROMIUM,
    HAVE_CHROMIUM,
    Stack,
    browser_login,
    chromium,
    screenshot_of,
)
from tests.sim_fixtures import TEST_DEFAULTS, start_simulator

ROOT = Path(__file__).resolve().parent.parent
DOCS_IMG = ROOT / ("docs/img" if os.environ.get("HAL0_DOCS_SCREENSHOTS") == "1"
                   else "test-artifacts")
CHAT = "Qwen3-4B-Instruct-2507-GGUF"
SMALL = "Qwen3-0.6B-GGUF"

pytestmark = [
    pytest.mark.e2e,
    pytest.mark.browser,
    pytest.mark.skipif(not HAVE_CHROMIUM,
                       reason=f"{CHROMIUM} is missing (apt-get install -y chromium)"),
]


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    """One serve + simulator (lemond 10.6: one model per type, no pins) for the module,
    with `chat` loaded and pinned through the CLI."""
    sim = start_simulator(**TEST_DEFAULTS)
    stack = Stack(tmp_path_factory.mktemp("capacity"), HAL0_LEMONADE_URL=sim.url,
                  HAL0_DEBUG="1", HAL0_LOG_LEVEL="WARNING", HAL0_STATS_EVERY_S="0.5")
    try:
        stack.setup(username="operator")
        stack.manage("slots", "load", "chat")
        stack.manage("slots", "pin", "chat")
        yield stack.serve(), sim, stack
    finally:
        stack.stop()
        sim.stop()


def make_slot(hal0: Stack, name: str, model: str) -> None:
    """A chat slot on the local node, offline, made (or reset) the way an operator would,
    with `slots import`: each test sets up the slots it needs, whatever ran before it."""
    path = hal0.tmp_path / f"slot-{name}.json"
    path.write_text(json.dumps([{"name": name, "capability": "chat", "device": "gpu-vulkan",
                                 "model_name": model, "node": "local", "enabled": True}]))
    hal0.manage("slots", "import", str(path))
    hal0.manage("slots", "unload", name)


@pytest.fixture(scope="module")
def page(stack):
    url = stack[0]
    with chromium() as browser:
        page = browser_login(browser, url)
        yield page
        page.context.close()


def test_model_field_refuses_a_typo_and_its_picker_fills_it(stack, page):
    from playwright.sync_api import expect

    url = stack[0]
    page.goto(f"{url}/new-slot/")
    page.fill("#id_name", "picked")
    page.select_option("#id_capability", "chat")
    page.select_option("#id_device", "gpu-vulkan")
    page.fill("#id_model_name", SMALL + "F")
    page.get_by_role("button", name="Create").click()
    error = page.locator("#slot-form .field-error")
    expect(error).to_contain_text(f"does not know '{SMALL}F'")
    expect(error).to_contain_text(f"Did you mean {SMALL}")

    page.get_by_role("button", name="Browse catalogue…").click()
    dialog = page.get_by_role("dialog")
    expect(dialog).to_contain_text("Pick a chat model on local")
    dialog.get_by_label("Filter models").fill("<1")
    dialog.get_by_role("button", name=f"Use {SMALL}", exact=True).click()
    expect(page.locator("#id_model_name")).to_have_value(SMALL)
    page.get_by_role("button", name="Create").click()
    page.wait_for_url(f"{url}/slots/picked/")


def test_fit_check_refuses_a_load_that_would_evict_a_pinned_slot(stack, page):
    from playwright.sync_api import expect

    url, sim, hal0 = stack
    make_slot(hal0, "chat2", SMALL)  # offline; `chat` holds the pool, loaded and pinned
    page.goto(f"{url}/")
    page.wait_for_selector("#live-status.on", timeout=10_000)
    node = page.locator("#node-local")
    expect(node.locator(".gauge.gpu")).to_contain_text("/ 111.6 GB")  # VRAM + GTT
    expect(node.locator(".gauge.ram")).to_contain_text("/ 31.3 GB")
    expect(page.locator("#slot-chat .takes")).to_contain_text("estimate")
    DOCS_IMG.mkdir(parents=True, exist_ok=True)
    # the node header is pushed every HAL0_STATS_EVERY_S
    screenshot_of(page, "#nodesection-local, #node-local", str(DOCS_IMG / "memory-bars.png"))

    calls = sim.state()["load_calls"]
    page.locator("#slot-chat2").get_by_role("button", name="Load chat2", exact=True).click()
    dialog = page.get_by_role("dialog")
    verdict = dialog.get_by_test_id("fit-verdict")
    expect(verdict).to_contain_text("Refused")
    expect(verdict).to_contain_text(f"evict {CHAT} (pinned slot 'chat')")
    expect(dialog.get_by_role("button", name="Load anyway")).to_have_count(0)
    dialog.screenshot(path=str(DOCS_IMG / "fit-refused.png"))
    dialog.get_by_text("Close", exact=True).click()
    expect(dialog).to_have_count(0)  # closed, focus back on the Load button
    expect(page.locator("#slot-chat2 .badge")).to_have_text("offline")
    assert sim.state()["load_calls"] == calls

    # the swap picker shows each row's verdict before anything is clicked
    page.locator("#act-chat2-swap").click()
    picker = page.get_by_role("dialog")
    picker.get_by_label("Filter models").fill("qwen3-1.7b")
    expect(picker.locator("li", has_text="Bonsai")).to_have_count(0)  # filtered
    row = picker.locator("li", has_text="Qwen3-1.7B-GGUF").first
    expect(row.get_by_test_id("fit-verdict")).to_contain_text("pinned slot 'chat'")
    # downloading alone evicts nothing: only "Download & swap" is refused
    expect(row.locator("[id^=pullbtn-]")).to_be_enabled()
    expect(row.locator("[id^=pullswap-]")).to_be_disabled()
    picker.screenshot(path=str(DOCS_IMG / "fit-picker.png"))


def test_model_field_downloads_and_loads_in_one_step(stack, page):
    """On a slot's page, the Model field's picker offers "Download & load" for a model not
    downloaded, with its fit shown first and a confirmation for a big one; the field is
    filled in, the progress shows, and the slot ends up serving the model."""
    from playwright.sync_api import expect

    url, sim, hal0 = stack
    big = "Qwen3-Embedding-8B-GGUF"  # 8.05 GB: over the 5 GB that asks first
    assert big not in sim.state().get("downloaded", [])
    hal0.manage("slots", "unload", "embed")
    page.goto(f"{url}/slots/embed/")
    page.wait_for_selector("#live-status.on", timeout=10_000)
    page.get_by_role("button", name="Browse catalogue…").click()
    dialog = page.locator("#pick-dialog")
    expect(dialog).to_contain_text("Download & load")
    dialog.get_by_label("Filter models").fill("embedding-8b")
    row = dialog.locator("li", has_text=big)
    expect(row).to_have_count(1)
    expect(row.get_by_test_id("fit-verdict")).to_contain_text("needs ~")
    expect(row).to_contain_text("not downloaded")

    row.get_by_role("button", name=f"Download & load {big} in embed").click()
    confirm = page.locator("#confirm")
    expect(confirm).to_contain_text(f"Download {big} (8.05 GB), then load it in embed?")
    expect(page.locator("#id_model_name")).not_to_have_value(big)  # nothing yet
    confirm.locator("#confirm-ok").click()
    expect(page.locator("#id_model_name")).to_have_value(big)
    expect(page.locator("#slot-embed")).to_contain_text(big, timeout=20_000)
    expect(page.locator("#slot-embed .badge")).to_have_text("ready", timeout=20_000)
    assert big in sim.state()["downloaded"]
    health = httpx.get(f"{sim.url}/v1/health", timeout=10).json()
    assert big in [m["model_name"] for m in health["all_models_loaded"]]
