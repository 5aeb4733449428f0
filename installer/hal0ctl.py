"""The hal0 session: a child process with hal0's *production* settings (the values of
`/etc/hal0/hal0.env`), running as the `hal0` user, that the installer asks about slots
(step 6) and has migrate, collect static files, seed slots and create the admin (step 8).

Why a child: the installer itself runs with whatever settings the shell gave it (the
checkout's demo database, debug static storage, root), while hal0-api will run as `hal0`
with the env file. Doing the database and static work in a process with exactly the
service's environment and user gets the right database, the right static storage
(the manifest the service needs) and files owned by `hal0`. One child serves the whole
run, so Django starts once, not once per step.

Protocol: one JSON object per line on stdin (`{"op": ...}`) and one JSON reply per line
on stdout; anything hal0 prints while handling a request comes back in `output`.
Run as `python -m installer.hal0ctl` from the project directory.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import sys
import tempfile
import traceback
from pathlib import Path
from typing import TYPE_CHECKING

import django
from django.conf import settings
from django.contrib.auth import get_user_model
from django.contrib.staticfiles.finders import get_finders
from django.core.management import call_command
from django.db import DatabaseError, connection
from django.db.migrations.executor import MigrationExecutor

from installer.errors import StepFailed
from installer.layout import DATABASE_FILE, ENV_FILE, STATE_DIR, USER
from installer.units import parse_env
from slots.seed import DEFAULT_SLOTS

if TYPE_CHECKING:  # context.py imports this module to start the session
    from installer.context import Context

# --- parent side -------------------------------------------------------------------------


class Hal0Session:
    """The installer's handle on the child. Started on first use, closed by the context."""

    def __init__(self, ctx: Context):
        self.ctx = ctx
        self.proc = None
        self.errors = None

    def unavailable(self) -> str | None:
        """Why the child cannot be asked anything yet (None when it can)."""
        ctx = self.ctx
        if not ctx.path(ENV_FILE).exists():
            return f"{ENV_FILE} does not exist yet (written by the units step)"
        if not ctx.path(STATE_DIR).is_dir():
            return f"{STATE_DIR} does not exist yet"
        if ctx.root is None:
            if os.geteuid() != 0:
                return "hal0's database can only be inspected as root"
            if ctx.runner.getent("passwd", USER) is None:
                return f"the {USER} user does not exist yet"
        return None

    def environment(self) -> dict[str, str]:
        ctx = self.ctx
        values = parse_env(ctx.path(ENV_FILE).read_text())
        env = {
            "PATH": os.environ.get("PATH", "/usr/sbin:/usr/bin:/sbin:/bin"),
            "LANG": os.environ.get("LANG", "C.UTF-8"),
            "PYTHONUNBUFFERED": "1",
            **values,
            "DJANGO_SETTINGS_MODULE": "hal0site.settings",
        }
        if ctx.root is not None:
            # The env file names the real system's paths; under --root they move into DIR.
            for key in ("HAL0_VAR_DIR", "HAL0_STATIC_ROOT"):
                if env.get(key, "").startswith("/"):
                    env[key] = str(ctx.path(env[key]))
            url = env.get("DATABASE_URL", "")
            if url.startswith("sqlite:////"):
                env["DATABASE_URL"] = "sqlite:///" + str(ctx.path(url[len("sqlite:///"):]))
            else:
                env["DATABASE_URL"] = "sqlite:///" + str(ctx.path(DATABASE_FILE))
                if url:
                    ctx.note(f"under --root the database is {env['DATABASE_URL']}, "
                             f"not {url.split('@')[-1]}")
        return env

    def command(self) -> list[str]:
        cmd = [sys.executable, "-m", "installer.hal0ctl"]
        if self.ctx.root is None:
            cmd = ["runuser", "-u", USER, "--", *cmd]
        return cmd

    def _start(self) -> None:
        reason = self.unavailable()
        if reason:
            raise StepFailed(f"cannot reach hal0's database: {reason}",
                             "run the whole installer (or the `units` step) first")
        self.errors = tempfile.TemporaryFile(mode="w+")
        try:
            self.proc = self.ctx.runner.spawn(self.command(), env=self.environment(),
                                              cwd=settings.BASE_DIR, stderr=self.errors)
        except OSError as exc:
            raise StepFailed(f"cannot start `{' '.join(self.command())}`: {exc}",
                             "runuser (util-linux) must be installed") from None
        self._read()  # the "ready" line

    def _read(self) -> dict:
        line = self.proc.stdout.readline()
        if not line:
            self.proc.wait()
            self.errors.seek(0)
            err = self.errors.read().strip()
            raise StepFailed(
                f"the hal0 helper process stopped (exit {self.proc.returncode})"
                + (f": {err.splitlines()[-1]}" if err else ""),
                f"run `{' '.join(self.command())}` by hand from {Path.cwd()} to see why "
                f"(with the variables of {ENV_FILE}); the hal0 user must be able to read "
                "the project directory and its virtualenv")
        reply = json.loads(line)
        if not reply.get("ok", False):
            raise StepFailed(f"hal0: {reply.get('error', 'unknown error')}",
                             reply.get("hint") or "see the message above")
        return reply

    def request(self, op: str, **params) -> dict:
        if self.proc is None:
            self._start()
        self.proc.stdin.write(json.dumps({"op": op, **params}) + "\n")
        self.proc.stdin.flush()
        return self._read()

    def close(self) -> None:
        if self.proc is not None:
            with contextlib.suppress(OSError):
                self.proc.stdin.close()
            try:
                self.proc.wait(timeout=10)
            except Exception:
                self.proc.kill()
                self.proc.wait()
            self.proc = None
        if self.errors is not None:
            self.errors.close()
            self.errors = None


# --- child side ------------------------------------------------------------------------------
# Django is imported at the top but only set up in `main()`: hal0's models (`slots.models`)
# can only be imported after that, so those imports stay inside the ops.


def _sqlite_missing() -> bool:
    db = settings.DATABASES["default"]
    return db["ENGINE"].endswith("sqlite3") and not Path(str(db["NAME"])).exists()


def op_slots(_params: dict) -> dict:
    if _sqlite_missing():
        return {"db": "missing", "slots": []}
    from slots.models import Slot  # noqa: PLC0415 - only after django.setup() in main()

    try:
        rows = list(Slot.objects.values("name", "model_name", "capability", "device",
                                        "enabled"))
    except DatabaseError:
        return {"db": "unmigrated", "slots": []}
    return {"db": "ok", "slots": rows}


def _static_fingerprint() -> str:
    entries = [settings.STORAGES["staticfiles"]["BACKEND"]]
    for finder in get_finders():
        for path, storage in finder.list(["CVS", ".*", "*~"]):
            st = os.stat(storage.path(path))
            entries.append(f"{path}\0{st.st_size}\0{st.st_mtime_ns}")
    return hashlib.sha256("\n".join(sorted(entries)).encode()).hexdigest()


class _Report:
    """What `op_setup` did (or would do, in a dry run), part by part."""

    def __init__(self, dry: bool):
        self.dry = dry
        self.changes: list[str] = []
        self.in_place: list[str] = []
        self.output = io.StringIO()  # what the management commands printed

    def reply(self) -> dict:
        return {"changes": self.changes, "in_place": self.in_place,
                "output": self.output.getvalue()}


def _migrate(report: _Report) -> list | None:
    """Apply pending migrations. Returns the plan: None when there is no database yet,
    [] when the schema is up to date."""
    if _sqlite_missing():
        pending = None
    else:
        executor = MigrationExecutor(connection)
        pending = executor.migration_plan(executor.loader.graph.leaf_nodes())
    if pending == []:
        report.in_place.append("database schema up to date")
    elif report.dry:
        report.changes.append("would create the database" if pending is None
                              else f"would apply {len(pending)} migration(s)")
    else:
        call_command("migrate", interactive=False, verbosity=0, stdout=report.output)
        report.changes.append("database created" if pending is None
                              else f"applied {len(pending)} migration(s)")
    return pending


def _collect_static(report: _Report) -> None:
    """collectstatic, skipped when the sources have not changed since the last collect."""
    marker = Path(settings.VAR_DIR) / "static-fingerprint"
    fingerprint = _static_fingerprint()
    current = marker.read_text().strip() if marker.exists() else ""
    if current == fingerprint and Path(settings.STATIC_ROOT).is_dir():
        report.in_place.append("static files up to date")
    elif report.dry:
        report.changes.append(f"would collect static files into {settings.STATIC_ROOT}")
    else:
        call_command("collectstatic", interactive=False, verbosity=0, stdout=report.output)
        tmp = marker.with_name(marker.name + ".tmp")
        tmp.write_text(fingerprint + "\n")
        os.replace(tmp, marker)
        report.changes.append(f"collected static files into {settings.STATIC_ROOT}")


def _seed_slots(report: _Report) -> None:
    """Seed the default slots that are missing (edited or extra slots are left alone)."""
    from slots.models import Node, Slot  # noqa: PLC0415 - only after django.setup() in main()

    missing = [s for s in DEFAULT_SLOTS if not Slot.objects.filter(name=s["name"]).exists()]
    if not missing:
        report.in_place.append("default slots present")
    elif report.dry:
        report.changes.append("would seed slot(s) " + ", ".join(s["name"] for s in missing))
    else:
        node = Node.local()
        for spec in missing:
            has_default = Slot.objects.filter(capability=spec["capability"],
                                              is_default=True).exists()
            Slot.objects.create(node=node, seeded=True, is_default=not has_default, **spec)
        report.changes.append("seeded slot(s) " + ", ".join(s["name"] for s in missing))


def _ensure_admin(report: _Report, params: dict) -> None:
    """The first admin login."""
    if get_user_model().objects.filter(is_superuser=True).exists():
        report.in_place.append("admin login exists")
    elif report.dry:
        report.changes.append("would create an admin login")
    else:
        password = params.get("admin_password")
        if password is None:
            call_command("ensure_admin", stdout=report.output)
        else:
            # This child runs as hal0, which may not read the operator's file: the password
            # comes over the pipe and ensure_admin reads a private copy (gone when we
            # return), so it is told to name the operator's file in its message.
            source = params.get("admin_password_source") or "--admin-password-file"
            with tempfile.NamedTemporaryFile("w", prefix="hal0-admin-", delete=True) as fh:
                fh.write(password)
                fh.flush()
                call_command("ensure_admin", password_file=Path(fh.name),
                             password_source=source, stdout=report.output)
        report.changes.append("created the admin login")


def op_setup(params: dict) -> dict:
    """migrate, collectstatic, seed missing default slots, first admin. Each part checks
    first and does nothing when already in place; `dry_run` only reports."""
    report = _Report(params.get("dry_run", False))
    pending = _migrate(report)
    _collect_static(report)
    if pending != [] and report.dry:  # the tables may not exist yet: nothing more to ask
        report.changes += ["would seed the default slots that are missing",
                           "would create an admin login if there is none"]
        return report.reply()
    _seed_slots(report)
    _ensure_admin(report, params)
    return report.reply()


OPS = {"slots": op_slots, "setup": op_setup}


def main() -> int:
    proto = sys.stdout
    sys.stdout = io.StringIO()  # stray prints must not corrupt the protocol

    def reply(payload: dict) -> None:
        proto.write(json.dumps(payload) + "\n")
        proto.flush()

    try:
        django.setup()
    except Exception as exc:
        reply({"ok": False, "error": f"hal0 settings: {exc}",
               "hint": f"check {ENV_FILE} (HAL0_SECRET_KEY, DATABASE_URL)"})
        return 1
    reply({"ok": True, "ready": True})
    for line in sys.stdin:
        if not line.strip():
            continue
        request = json.loads(line)
        try:
            result = OPS[request["op"]](request)
            reply({"ok": True, **result})
        except Exception as exc:
            traceback.print_exc()
            reply({"ok": False, "error": f"{type(exc).__name__}: {exc}"})
    return 0


if __name__ == "__main__":
    sys.exit(main())
