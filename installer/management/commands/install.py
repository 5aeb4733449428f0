"""`python manage.py install`: install and bootstrap lemond and hal0 under systemd.

The steps live in `installer.steps`; this module only turns the command line into
`Options` and the outcome into an exit code (0 ok, 1 a step failed, 2 bad usage).
"""

from pathlib import Path

from django.core.management.base import BaseCommand, CommandError

from installer.context import Options, Output
from installer.errors import UsageError
from installer.layout import LEMOND_VERSION
from installer.steps import STEP_NAMES, Installer


class Command(BaseCommand):
    help = ("Install lemond and hal0 as systemd services (run as root). Every step is "
            "idempotent: re-running only fixes what is not in place. See docs/installer.md.")
    requires_system_checks = []  # must work before hal0's own database exists

    def add_arguments(self, parser):
        parser.add_argument("--dry-run", action="store_true",
                            help="print every command and file change (as diffs); "
                                 "change nothing")
        parser.add_argument("--root", type=Path, metavar="DIR",
                            help="put every path under DIR and record system commands "
                                 "(useradd, chown, systemctl) instead of running them")
        parser.add_argument("--tarball", metavar="PATH_OR_URL",
                            help="lemond release tarball: a local path, file:// or http(s) "
                                 "URL (default: the pinned GitHub release)")
        parser.add_argument("--sha256", metavar="HEX",
                            help="expected sha256 of the tarball (default: the pinned "
                                 f"v{LEMOND_VERSION} hash)")
        parser.add_argument("--lemond-version", metavar="VER",
                            help="lemond version to install (default: keep the installed "
                                 f"one, else {LEMOND_VERSION}; another version needs "
                                 "--sha256)")
        parser.add_argument("--only", action="append", default=[], metavar="STEP",
                            help="run only this step (repeatable or comma-separated; "
                                 "preflight and summary always run): "
                                 + ", ".join(STEP_NAMES))
        parser.add_argument("--set", action="append", default=[], metavar="KEY.PATH=VALUE",
                            help="override a lemond config.json setting (JSON value; "
                                 "repeatable; kept for later runs)")
        parser.add_argument("--unset", action="append", default=[], metavar="KEY.PATH",
                            help="drop a kept --set override (repeatable)")
        parser.add_argument("--checkpoint", action="append", default=[],
                            metavar="MODEL=ORG/REPO[:VARIANT]",
                            help="checkpoint for a slot's custom model, so it can be "
                                 "registered with lemond (repeatable; kept for later runs)")
        parser.add_argument("--admin-password-file", type=Path, metavar="FILE",
                            help="password for the first admin login (else one is "
                                 "generated and printed once)")
        parser.add_argument("--host", default="127.0.0.1",
                            help="address hal0 listens on (default 127.0.0.1)")
        parser.add_argument("--port", type=int, default=8000,
                            help="port hal0 listens on (default 8000)")
        parser.add_argument("--wait-timeout", type=float, default=30.0, metavar="SECONDS",
                            help="how long to wait for each service to answer (default 30)")

    def handle(self, *args, **opts):
        options = Options(
            root=opts["root"], dry_run=opts["dry_run"], tarball=opts["tarball"],
            sha256=opts["sha256"], lemond_version=opts["lemond_version"], only=opts["only"],
            set=opts["set"], unset=opts["unset"], checkpoint=opts["checkpoint"],
            admin_password_file=opts["admin_password_file"], host=opts["host"],
            port=opts["port"], wait_timeout=opts["wait_timeout"],
        )
        installer = Installer(options, Output(self.stdout, self.style))
        try:
            code = installer.run()
        except UsageError as exc:
            raise CommandError(str(exc), returncode=2) from None
        if code == 130:
            raise CommandError("interrupted", returncode=130)
        if code and installer.would_stop:  # the summary has said why
            raise CommandError("dry run failed; see the summary above", returncode=code)
        if code:
            raise CommandError("the install stopped; see the step above", returncode=code)
