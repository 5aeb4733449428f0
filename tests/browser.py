"""Debian's Chromium through Playwright, for the browser tests (`playwright install` cannot
download a browser here: apt-get install -y chromium)."""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

CHROMIUM = os.environ.get("HAL0_CHROMIUM", "/usr/bin/chromium")
HAVE_CHROMIUM = Path(CHROMIUM).exists()


@contextlib.contextmanager
def chromium():
    """A headless Chromium with no traffic of its own (this machine has no internet:
    background networking would only fail)."""
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(
            executable_path=CHROMIUM,
            args=["--no-sandbox", "--disable-gpu", "--disable-background-networking"])
        try:
            yield browser
        finally:
            browser.close()
