"""`manage.py reconcile`: the reconciler loop as its own process (for several web processes
sharing Redis; run those with `serve --no-reconciler`).

Several `reconcile` processes may run (e.g. one per box for failover): each lemond node is
polled by the one holding its lease, and another takes over within `HAL0_LEASE_TTL_S` + 1 s
when that one dies. Ctrl-C or SIGTERM gives the leases back at once.
"""

import asyncio
import logging
import signal

from django.conf import settings
from django.core.management.base import BaseCommand

from slots import reconciler
from slots.actions.config import do_follow_lemonade_url
from slots.runtime import Runtime

log = logging.getLogger("hal0.reconciler")


class Command(BaseCommand):
    help = "Run the reconciler alone: poll lemond, record what changed, push it to dashboards."

    def handle(self, *args, **options):
        runtime = Runtime().start()
        if moved := do_follow_lemonade_url(actor="reconcile"):  # hal0.env governs the local node
            log.warning("%s", moved)
        self.stdout.write("hal0 reconciler running (Ctrl-C to stop)")
        self.stdout.flush()
        # Not asyncio.run(): on the way out it waits, without a limit, for the loop's worker
        # threads; lemond calls run on the runtime's pools, which `stop` does not wait for.
        loop = asyncio.new_event_loop()
        try:
            loop.run_until_complete(self.main())
        except KeyboardInterrupt:
            pass
        # restores still loading: recorded as interrupted, not waited for
        if runtime.stop(settings.HAL0_SHUTDOWN_GRACE_S):
            log.warning("exiting without waiting for lemond (see the interrupted actions above)")
        self.stdout.write("reconciler stopped")
        self.stdout.flush()

    async def main(self):
        task = asyncio.current_task()
        loop = asyncio.get_running_loop()
        # SIGTERM (systemd stop) and Ctrl-C end the loop: leases are released on the way out
        loop.add_signal_handler(signal.SIGTERM, task.cancel)
        loop.add_signal_handler(signal.SIGINT, task.cancel)
        try:
            await reconciler.run_forever(standalone=True)
        except asyncio.CancelledError:
            pass
