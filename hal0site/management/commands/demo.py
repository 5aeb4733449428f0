"""`manage.py demo`: the one-command local demo. Migrates, makes sure an admin login
exists, starts the lemond simulator when no lemond answers at HAL0_LEMONADE_URL, and serves
hal0 on 127.0.0.1:8000 with its reconciler."""

import atexit
import subprocess
import sys
import time
from urllib.parse import urlsplit

import httpx
from django.conf import settings
from django.core.management import call_command
from django.core.management.base import BaseCommand, CommandError

LOOPBACK = {"127.0.0.1", "localhost", "::1"}


def lemond_answers(url: str, timeout: float = 1.5) -> bool:
    try:
        return httpx.get(f"{url}/live", timeout=timeout, trust_env=False).status_code == 200
    except httpx.HTTPError:
        return False


class Command(BaseCommand):
    help = "Set up and run the local demo (simulated lemond when no real one is reachable)."

    def add_arguments(self, parser):
        parser.add_argument("--host", default="127.0.0.1")
        parser.add_argument("--port", type=int, default=8000)
        parser.add_argument("--no-simulator", action="store_true",
                            help="never start the simulator, even when lemond is unreachable")

    def handle(self, *args, host, port, no_simulator, **options):
        call_command("migrate", interactive=False, verbosity=0)
        self.stdout.write("Database ready.")
        call_command("ensure_admin", stdout=self.stdout)
        url = settings.HAL0_LEMONADE_URL
        if lemond_answers(url):
            self.stdout.write(f"lemond answers at {url}: using it.")
        elif no_simulator:
            self.stdout.write(self.style.WARNING(f"No lemond at {url}; the dashboard will say so."))
        else:
            self._start_simulator(url)
        call_command("serve", host=host, port=port, stdout=self.stdout)

    def _start_simulator(self, url: str) -> None:
        parts = urlsplit(url)
        if parts.hostname not in LOOPBACK:
            raise CommandError(f"No lemond answers at {url}, and the simulator only runs on "
                               "loopback. Start lemond there, or unset HAL0_LEMONADE_URL.")
        sim_port = parts.port or 13305
        self.stdout.write(self.style.WARNING(
            f"No lemond at {url}: starting the lemond simulator on 127.0.0.1:{sim_port}. "
            "It loads and unloads like lemond but does no real inference; the dashboard "
            "labels it 'simulated'."))
        proc = subprocess.Popen(
            [sys.executable, "manage.py", "lemond_sim", "--port", str(sim_port)],
            cwd=settings.BASE_DIR,
        )
        atexit.register(_stop, proc)
        deadline = time.monotonic() + 20
        while not lemond_answers(url, timeout=0.5):
            if proc.poll() is not None or time.monotonic() > deadline:
                raise CommandError("the lemond simulator did not start (see its output above)")
            time.sleep(0.2)


def _stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            proc.kill()
