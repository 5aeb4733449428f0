"""The last steps of the long-running commands (`serve`, `reconcile`) after SIGTERM or
Ctrl-C: give back what other processes wait for, and never hang on lemond."""

import atexit
import logging
import os
import sys
from typing import NoReturn

from django.conf import settings

log = logging.getLogger("hal0.shutdown")


def finish() -> NoReturn:
    """Release this process's serving claims, give running actions HAL0_SHUTDOWN_GRACE_S
    to finish (the rest are recorded as interrupted), then exit without joining worker
    threads: a normal exit waits for every one of them, and one may be waiting on lemond
    for HAL0_LEMONADE_LOAD_TIMEOUT (a load, a joined load, an idle unload); systemd would
    kill us first, with nothing recorded."""
    from slots import runtime

    if runtime.current().stop(settings.HAL0_SHUTDOWN_GRACE_S):
        log.warning("exiting without waiting for lemond (see the interrupted actions above)")
    # What the process registered to run at exit still runs (logging's flush, `demo`
    # stopping its simulator); only the interpreter's join of worker threads is skipped.
    atexit._run_exitfuncs()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
