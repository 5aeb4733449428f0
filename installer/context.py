"""What every install step shares: the target (real system, a `--root` directory, or a
dry run), the paths it works on, the runner for external commands, and the output.

Steps never build a filesystem path from a string themselves: `ctx.path("/opt/lemonade")`
puts it under `--root` when there is one, so one code path serves the real install, the
tests and the dry run.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from pathlib import Path

# --- where things live on the real system ------------------------------------------
LEMONADE_DIR = "/opt/lemonade"
LEMOND_BIN = "/opt/lemonade/lemond"
MARKER = "/opt/lemonade/.installed-version"
STATE_DIR = "/var/lib/hal0"
LEMONADE_STATE = "/var/lib/hal0/lemonade"  # lemond's cache dir: config.json, user_models.json
MODELS_DIR = "/var/lib/hal0/models"  # HF_HOME for lemond's model downloads
STATIC_ROOT = "/var/lib/hal0/static"
DATABASE_FILE = "/var/lib/hal0/hal0.sqlite3"
OVERRIDES_FILE = "/var/lib/hal0/installer-overrides.json"
CONFIG_FILE = "/var/lib/hal0/lemonade/config.json"
USER_MODELS_FILE = "/var/lib/hal0/lemonade/user_models.json"
ENV_DIR = "/etc/hal0"
ENV_FILE = "/etc/hal0/hal0.env"
UNIT_DIR = "/etc/systemd/system"
WANTS_DIR = "/etc/systemd/system/multi-user.target.wants"
LEMONADE_UNIT = "hal0-lemonade.service"
API_UNIT = "hal0-api.service"
# Under --root, the commands that were recorded instead of run are appended here.
RECORD_LOG = "/.hal0-install/recorded-commands.log"

USER = "hal0"
GROUP = "hal0"
EXTRA_GROUPS = ("render", "video")  # GPU device access for lemond's backends

LEMOND_VERSION = "10.6.0"
LEMOND_SHA256 = "3b50b5cc5a9695f970b85f5cf3023297bde215f2230c993134e670baab2474a1"
LEMOND_URL = (
    "https://github.com/lemonade-sdk/lemonade/releases/download/"
    "v{ver}/lemonade-embeddable-{ver}-ubuntu-x64.tar.gz"
)
PLACEHOLDER_SHA256 = "0" * 64


class StepFailed(Exception):
    """A step could not finish. `hint` says what to check; nothing is left half-written."""

    def __init__(self, message: str, hint: str = ""):
        super().__init__(message)
        self.hint = hint


class UsageError(Exception):
    """Bad flags or values (exit code 2); raised before anything is changed."""


@dataclass
class Options:
    root: Path | None = None
    dry_run: bool = False
    tarball: str | None = None
    sha256: str | None = None
    lemond_version: str | None = None  # None: keep the installed one, else the pinned
    only: list[str] = field(default_factory=list)
    set: list[str] = field(default_factory=list)
    unset: list[str] = field(default_factory=list)
    checkpoint: list[str] = field(default_factory=list)
    admin_password_file: Path | None = None
    host: str = "127.0.0.1"
    port: int = 8000
    wait_timeout: float = 30.0


class Output:
    """Line-oriented output with a little styling; `tty` decides rich progress vs
    plain progress lines."""

    def __init__(self, stream=None, style=None):
        self.stream = stream or sys.stdout
        self.style = style  # Django's color style, or None
        raw = getattr(self.stream, "_out", self.stream)  # unwrap Django's OutputWrapper
        self.raw = raw
        self.tty = bool(getattr(raw, "isatty", lambda: False)())

    def _styled(self, kind: str, text: str) -> str:
        func = getattr(self.style, kind, None) if self.style else None
        return func(text) if func else text

    pending: str | None = None  # a step's header, printed before its first detail line

    def line(self, text: str = "") -> None:
        if self.pending:
            header, self.pending = self.pending, None
            self.stream.write(header + "\n")
        self.stream.write(text + "\n")
        self.flush()

    def success(self, text: str) -> None:
        self.line(self._styled("SUCCESS", text))

    def warning(self, text: str) -> None:
        self.line(self._styled("WARNING", text))

    def error(self, text: str) -> None:
        self.line(self._styled("ERROR", text))

    def flush(self) -> None:
        flush = getattr(self.stream, "flush", None)
        if flush:
            flush()


class Context:
    """One install run: options, the runner, path mapping, and what each step reported."""

    def __init__(self, options: Options, out: Output, runner=None):
        from installer.runner import Runner

        self.options = options
        self.out = out
        self.root = Path(options.root).resolve() if options.root else None
        self.dry_run = options.dry_run
        self.runner = runner or Runner(self.root, self.dry_run, out)
        # Real installs wait for the services to answer; --root only records systemctl
        # and --dry-run only prints. Tests may switch this on to exercise the waits.
        self.wait_for_services = self.root is None and not self.dry_run
        self.warnings: list[str] = []
        self.changed: set[str] = set()  # names of things changed this run (restart triggers)
        self._hal0 = None  # lazily started hal0 session (installer.hal0ctl)

    def path(self, system_path: str) -> Path:
        """The real path for a system path: under --root when there is one."""
        if self.root is None:
            return Path(system_path)
        return self.root / system_path.lstrip("/")

    def note(self, text: str) -> None:
        self.out.line(f"       {text}")

    def warn(self, text: str) -> None:
        self.warnings.append(text)
        self.out.warning(f"       WARNING: {text}")

    def hal0(self):
        """The hal0 session (a child process with hal0's production settings)."""
        if self._hal0 is None:
            from installer.hal0ctl import Hal0Session

            self._hal0 = Hal0Session(self)
        return self._hal0

    def close(self) -> None:
        if self._hal0 is not None:
            self._hal0.close()
            self._hal0 = None
