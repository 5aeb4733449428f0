"""Run a `manage.py` command (normally `serve`) with cProfile switched on and off by signals:
SIGUSR1 starts profiling the main thread (under `serve`, the event loop: where the
gateway's per-request work runs), SIGUSR2 stops it and writes the stats to the file given
in HAL0_PROFILE_OUT. `bench/gateway_cpu.py --profile` drives it around the measured
requests, so startup and warm-up stay out of the counts.

    HAL0_PROFILE_OUT=/tmp/serve.prof python bench/profiled.py serve --port 8001

Run with the working directory set to the checkout whose `manage.py` should run.
"""

from __future__ import annotations

import cProfile
import os
import runpy
import signal
import sys

profile = cProfile.Profile()


def _start(signum, frame) -> None:
    profile.enable()


def _stop(signum, frame) -> None:
    profile.disable()
    profile.dump_stats(os.environ["HAL0_PROFILE_OUT"])


if __name__ == "__main__":
    signal.signal(signal.SIGUSR1, _start)
    signal.signal(signal.SIGUSR2, _stop)
    sys.argv = ["manage.py", *sys.argv[1:]]
    sys.path.insert(0, os.getcwd())  # the checkout's packages, before anything installed
    runpy.run_path(os.path.join(os.getcwd(), "manage.py"), run_name="__main__")
