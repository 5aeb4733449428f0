"""`tests/fresh-boot` (`make test-fresh-boot`) runs a command with the monotonic clock near
zero, the way hal0 starts on an appliance seconds after power-on."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from tests.harness import ROOT


def test_fresh_boot_starts_the_monotonic_clock_near_zero():
    probe = "import time; print(time.monotonic(), time.clock_gettime(time.CLOCK_BOOTTIME))"
    run = subprocess.run([ROOT / "tests" / "fresh-boot", sys.executable, "-c", probe],
                         capture_output=True, text=True, timeout=60)
    if run.returncode != 0 and os.environ.get("HAL0_REQUIRE_SERVICES") != "1":
        pytest.skip(f"no time namespaces here (root and Linux >= 5.6): {run.stderr.strip()}")
    assert run.returncode == 0, run.stderr
    monotonic, boottime = (float(v) for v in run.stdout.split())
    assert 0 < monotonic < 60 and 0 < boottime < 60
