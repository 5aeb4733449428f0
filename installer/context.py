"""What every install step shares: the options it was given (`Options`), the target (real
system, a `--root` directory, or a dry run), the paths it works on, the runner for
external commands, the hal0 session, and the output (`Output`).

Steps never build a filesystem path from a string themselves: `ctx.path("/opt/lemonade")`
puts it under `--root` when there is one, so one code path serves the real install, the
tests and the dry run.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from pathlib import Path

from installer.hal0ctl import Hal0Session
from installer.runner import Runner


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
        self._hal0: Hal0Session | None = None  # started on first use

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

    def hal0(self) -> Hal0Session:
        """The hal0 session (a child process with hal0's production settings)."""
        if self._hal0 is None:
            self._hal0 = Hal0Session(self)
        return self._hal0

    def close(self) -> None:
        if self._hal0 is not None:
            self._hal0.close()
            self._hal0 = None
