"""The slot pages' "Try it" panels and the Activity page in a real browser (issue #12 §3,
§4, §6): Debian's Chromium through Playwright against one `manage.py serve` and one
simulator for the whole module, one browser and one logged-in page.

* each capability's panel answers through the gateway with the session as the credential,
  labelled as the simulator's: chat streams text and shows TTFT and tokens/s, embed a
  similarity, rerank an order, stt the text of a WAV made here, tts a playable audio
  element, img an image;
* a `/v1` request made with an API token from outside the browser appears on the open
  Activity page by itself.

Screenshots of both go to test-artifacts/ (try-it.png, activity.png), and with
HAL0_DOCS_SCREENSHOTS=1 to docs/img/, so a test run leaves the tree clean.
"""

from __future__ import annotations

import io
import json
import os
import re
import threading
import time
import wave
from pathlib import Path

import httpx
import pytest

from tests.harness import CHROMIUM, HAVE_CHROMIUM, Stack, browser_login, chromium, wait_for
from tests.sim_fixtures import start_simulator

ROOT = Path(__file__).resolve().parent.parent
DOC_IMAGES = ROOT / ("docs/img" if os.environ.get("HAL0_DOCS_SCREENSHOTS") == "1"
                     else "test-artifacts")

pytestmark = [
    pytest.mark.e2e,
    pytest.mark.browser,
    pytest.mark.skipif(not HAVE_CHROMIUM,
                       reason=f"{CHROMIUM} is missing (apt-get install -y chromium)"),
]


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    """One serve, one simulator and one API token for the module."""
    sim = start_simulator(load_delay=0.2, token_delay=0.01)
    stack = Stack(tmp_path_factory.mktemp("cockpit"), HAL0_LEMONADE_URL=sim.url,
                  HAL0_LOG_LEVEL="WARNING", HAL0_STATS_EVERY_S="1")
    try:
        stack.setup(username="operator")
        token = stack.manage("tokens", "create", "ci-bot").stdout.strip().split()[-1]
        yield stack.serve(), token, stack, sim
    finally:
        stack.stop()
        sim.stop()


@pytest.fixture(scope="module")
def page(site):
    url = site[0]
    with chromium() as browser:
        tab = browser_login(browser, url)
        yield tab
        tab.context.close()


def _wav(seconds: float = 0.5) -> bytes:
    out = io.BytesIO()
    with wave.open(out, "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(16000)
        w.writeframes(b"\x00\x00" * int(16000 * seconds))
    return out.getvalue()


def _open(page, url: str, slot: str):
    from playwright.sync_api import expect

    page.goto(f"{url}/slots/{slot}/")
    expect(page.locator("#try .sim-note")).to_contain_text("simulator")
    return page.locator("#try")


def test_each_try_panel_answers_through_the_gateway(site, page):
    from playwright.sync_api import expect

    url = site[0]
    panel = _open(page, url, "chat")
    panel.get_by_role("button", name="Send (chat)").click()
    expect(panel.locator(".try-answer")).not_to_be_empty(timeout=20_000)
    expect(panel.locator("#try-stats")).to_contain_text("tok/s", timeout=20_000)
    assert re.search(r"TTFT \d+ ms", panel.locator("#try-stats").inner_text())
    DOC_IMAGES.mkdir(exist_ok=True)
    panel.screenshot(path=str(DOC_IMAGES / "try-it.png"))

    panel = _open(page, url, "embed")
    panel.get_by_role("button", name="Compare (embed)").click()
    expect(panel.locator(".try-similarity")).to_have_text(re.compile(r"^-?[01]\.\d{4}$"),
                                                          timeout=20_000)
    assert int(panel.locator("dd").first.inner_text()) > 1  # the dimensions

    panel = _open(page, url, "rerank")
    panel.get_by_role("button", name="Rank (rerank)").click()
    ranked = panel.locator(".try-ranked li")
    expect(ranked).to_have_count(3, timeout=20_000)
    # the line sharing the query's words first, the unrelated one not
    expect(ranked.first).to_contain_text("Cats eat fish")

    panel = _open(page, url, "stt")
    panel.locator("#try-file").set_input_files(
        files=[{"name": "hello.wav", "mimeType": "audio/wav", "buffer": _wav()}])
    panel.get_by_role("button", name="Transcribe (stt)").click()
    expect(panel.locator(".try-answer")).to_contain_text("Simulated transcription",
                                                         timeout=20_000)

    panel = _open(page, url, "tts")
    panel.get_by_role("button", name="Speak (tts)").click()
    audio = panel.locator("audio.try-audio")
    expect(audio).to_have_count(1, timeout=20_000)
    # playable: the browser decoded the WAV's header (readyState >= HAVE_METADATA)
    wait_for(lambda: audio.evaluate("a => a.readyState >= 1 && a.duration > 0"), timeout=10)

    panel = _open(page, url, "img")
    panel.get_by_role("button", name="Generate (img)").click()
    image = panel.locator("img.try-image")
    expect(image).to_have_count(1, timeout=20_000)
    wait_for(lambda: image.evaluate("i => i.complete && i.naturalWidth > 0"), timeout=10)


def test_a_try_error_shows_the_gateways_message(site, page):
    from playwright.sync_api import expect

    url, token = site[:2]
    panel = _open(page, url, "chat")
    panel.locator("#try-prompt").fill("")  # the browser's own check stops an empty prompt
    panel.get_by_role("button", name="Send (chat)").click()
    assert panel.locator(".try-error").count() == 0
    # the gateway refuses a disabled slot: its message, in the panel
    page.goto(f"{url}/slots/img/")
    page.locator("#id_enabled").uncheck()
    page.get_by_role("button", name="Save", exact=True).click()
    expect(page.locator("#slot-form .saved")).to_be_visible(timeout=10_000)
    # the gateway's routing table is cached (HAL0_GATEWAY_ROUTE_CACHE_S): until it says so
    wait_for(lambda: httpx.post(
        f"{url}/v1/images/generations", json={"model": "img", "prompt": "x"}, timeout=30,
        headers={"Authorization": f"Bearer {token}"}).status_code == 409, timeout=10)
    panel = page.locator("#try")
    panel.get_by_role("button", name="Generate (img)").click()
    expect(panel.locator(".try-error")).to_contain_text("disabled", timeout=20_000)


def test_a_v1_request_appears_live_on_the_activity_page(site, page):
    from playwright.sync_api import expect

    url, token = site[:2]
    page.goto(f"{url}/activity/")
    expect(page.locator("#live-status.on")).to_be_visible(timeout=10_000)
    rows = page.locator("#activity-rows tr")
    response = httpx.post(f"{url}/v1/chat/completions", timeout=30,
                          headers={"Authorization": f"Bearer {token}"},
                          json={"model": "chat", "max_tokens": 5,
                                "messages": [{"role": "user", "content": "hi"}]})
    assert response.status_code == 200, response.text
    # pushed, not reloaded: the token's chat request arrives on top (the panels' requests
    # above, when they ran first, are listed under user:operator)
    ours = rows.filter(has_text="/v1/chat/completions").filter(has_text="ci-bot")
    expect(ours).to_have_count(1, timeout=5_000)
    newest = rows.first
    expect(newest).to_contain_text("/v1/chat/completions")
    expect(newest).to_contain_text("ci-bot")
    expect(newest.locator("td.status")).to_have_text("200")
    assert " UTC" in newest.locator("time").inner_text()
    page.locator("table.activity").screenshot(path=str(DOC_IMAGES / "activity.png"))


def test_the_activity_pages_queue_figures_follow_by_themselves(site, page):
    """The queue table (serving / limit, waiting) changes as requests queue and leave,
    without a reload, like the rows below it."""
    from playwright.sync_api import expect

    url, token, stack, sim = site
    limit = stack.tmp_path / "queue.json"
    limit.write_text(json.dumps({"slots": [{"name": "chat", "max_concurrency": 1,
                                            "queue_timeout_s": 60}]}))
    stack.manage("slots", "import", str(limit))
    time.sleep(1.5)  # serve's routing table is cached for HAL0_GATEWAY_ROUTE_CACHE_S (1 s)
    headers = {"Authorization": f"Bearer {token}"}
    body = {"model": "chat", "messages": [{"role": "user", "content": "Say hello."}]}
    assert httpx.post(f"{url}/v1/chat/completions", json=body, headers=headers,
                      timeout=60).status_code == 200  # loaded, and the limit is in force
    page.goto(f"{url}/activity/")
    expect(page.locator("#live-status.on")).to_be_visible(timeout=10_000)
    queue = page.locator("#queue-chat")
    expect(queue.get_by_test_id("queue-waiting")).to_have_text("0")
    sim.configure(token_delay=0.1, reply_length=200)  # a stream of about 20 s
    second: list[int] = []
    try:
        with httpx.stream("POST", f"{url}/v1/chat/completions", headers=headers,
                          json={**body, "stream": True}, timeout=60) as holding:
            chunks = holding.iter_raw()  # kept: a dropped iterator closes the stream
            next(chunks)  # it holds the slot's one place
            behind = threading.Thread(target=lambda: second.append(httpx.post(
                f"{url}/v1/chat/completions", json={**body, "max_tokens": 3},
                headers=headers, timeout=60).status_code))
            behind.start()
            expect(queue.get_by_test_id("queue-waiting")).to_have_text("1", timeout=10_000)
            expect(queue.get_by_test_id("queue-serving")).to_have_text("1 / 1")
        # the stream is gone: the one behind it is served, then nothing waits
        behind.join(60)
        assert second == [200]
        expect(queue.get_by_test_id("queue-waiting")).to_have_text("0", timeout=10_000)
        expect(queue.get_by_test_id("queue-serving")).to_have_text("0 / 1", timeout=10_000)
    finally:
        sim.configure(token_delay=0.01, reply_length=0)
        limit.write_text(json.dumps({"slots": [{"name": "chat", "max_concurrency": None}]}))
        stack.manage("slots", "import", str(limit))
