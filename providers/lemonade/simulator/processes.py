"""Real backend processes: every loaded model owns a small child process.

lemond runs one backend process per loaded model (llama-server, whisper-server, ...) and
reports its pid in `/v1/health`; lemond's own tests kill that pid to play a crashed
backend. So the simulator starts a real, idle child (`sleep`) per load, reports its pid,
stops it when the model is evicted, and treats a child that died as a crashed backend:

* v10.8+ (the watchdog): the next request to that model evicts the dead entry and loads
  the model again (a new pid), keeping its pin;
* before v10.8: the entry stays listed and its requests fail as lemond's did when the
  backend's port no longer answered (a network error).

The child asks the kernel to kill it when the simulator dies (PR_SET_PDEATHSIG), so a
killed simulator leaves nothing behind.
"""

from __future__ import annotations

import contextlib
import ctypes
import signal
import subprocess
from typing import TYPE_CHECKING

from providers.lemonade.simulator.wire import ApiError

if TYPE_CHECKING:
    from providers.lemonade.simulator.residency import LoadedModel

PR_SET_PDEATHSIG = 1


def _die_with_parent() -> None:  # runs in the child, between fork and exec
    with contextlib.suppress(Exception):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)


def spawn_backend() -> subprocess.Popen | None:
    """An idle child standing in for a backend process (None if none can be started)."""
    try:
        return subprocess.Popen(["sleep", "infinity"], stdin=subprocess.DEVNULL,
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                preexec_fn=_die_with_parent, close_fds=True)
    except OSError:
        return None


def stop_backend(process: subprocess.Popen | None) -> None:
    if process is None:
        return
    if process.poll() is None:
        process.kill()
    with contextlib.suppress(subprocess.TimeoutExpired):
        process.wait(timeout=2)


class ProcessMixin:
    """Backend liveness for the residency mixin (a Simulator mixin)."""

    @staticmethod
    def backend_alive(model: LoadedModel) -> bool:
        process = getattr(model, "process", None)
        return process is None or process.poll() is None

    def check_backend(self, model: LoadedModel) -> None:
        """Before v10.8 a dead backend fails its requests (lemond kept forwarding to it)."""
        if not self.since(10, 8) and not self.backend_alive(model):
            raise ApiError(500, {"error": {
                "message": f"Network error: could not reach the backend of {model.name} "
                           "(Connection refused)", "type": "network_error"}})

    def stop_all_backends(self) -> None:
        for model in list(self.state.loaded.values()):
            stop_backend(getattr(model, "process", None))
