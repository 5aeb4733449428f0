"""`manage.py tokens`: API tokens for the OpenAI gateway and the JSON API.

    tokens create NAME [--slots a,b] [--list chat] [--may-manage] [--rpm N] [--tpm N]
                       [--expires-days N]
                                                          prints the token once, on stdout
    tokens list [--json]
    tokens revoke NAME

`create` writes only the token to stdout (everything else goes to stderr), so
`TOKEN=$(manage.py tokens create ci)` captures exactly the token.
"""

from __future__ import annotations

import json
import math

from django.core.exceptions import ValidationError
from django.core.management.base import BaseCommand, CommandError, CommandParser
from django.utils import timezone

from slots import tokens
from slots.models import ApiToken, Slot


class Command(BaseCommand):
    help = "Create, list and revoke API tokens for the gateway (/v1/) and the JSON API."

    def add_arguments(self, parser: CommandParser) -> None:
        sub = parser.add_subparsers(dest="subcommand", required=True, metavar="SUBCOMMAND",
                                    parser_class=type(parser))
        p = sub.add_parser("create", help="create a token and print it once",
                           called_from_command_line=True)
        p.add_argument("name", help="a unique name (letters, digits, - and _)")
        p.add_argument("--slots", default="", help="comma-separated slots it may use "
                                                   "(default: all)")
        p.add_argument("--list", dest="listed", default="", metavar="SLOTS_OR_CAPABILITIES",
                       help="what GET /v1/models shows it, e.g. `chat` for a model picker "
                            "(default: every slot it may use; it may still use the others)")
        p.add_argument("--may-manage", action="store_true",
                       help="may load and unload its slots (POST /models/load and "
                            "/models/unload, as llama.cpp's router takes them)")
        p.add_argument("--rpm", default=None, metavar="N",
                       help="at most N requests per minute (default: unlimited)")
        p.add_argument("--tpm", default=None, metavar="N",
                       help="at most N input + output tokens per minute (default: unlimited)")
        p.add_argument("--expires-days", type=float, default=None,
                       help="expire after N days (default: never)")
        p = sub.add_parser("list", help="every token (never the token itself)",
                           called_from_command_line=True)
        p.add_argument("--json", action="store_true", help="machine-readable output")
        p = sub.add_parser("revoke", help="revoke a token by name", called_from_command_line=True)
        p.add_argument("name")

    def handle(self, *args, subcommand: str, **options):
        return getattr(self, f"do_{subcommand}")(**options)

    def do_create(self, name: str, slots: str, listed: str, expires_days: float | None,
                  may_manage: bool = False, rpm: str | None = None, tpm: str | None = None,
                  **_):
        rpm_limit, tpm_limit = _limit("--rpm", rpm), _limit("--tpm", tpm)
        wanted = tokens.parse_slots(slots)
        if wanted:
            known = set(Slot.objects.values_list("name", flat=True))
            unknown = [s for s in wanted.split(",") if s not in known]
            if unknown:
                raise CommandError(f"no slot named {', '.join(unknown)} "
                                   f"(slots: {', '.join(sorted(known))})")
        if expires_days is not None and not (math.isfinite(expires_days)
                                             and 0 < expires_days <= 3650):
            raise CommandError("--expires-days must be a number of days from 0 to 3650")
        if ApiToken.objects.filter(name=name).exists():
            raise CommandError(f"a token named {name!r} exists already (revoke it or pick "
                               "another name)")
        try:
            token, raw = tokens.create_token(name, slots=wanted, listed=listed,
                                             may_manage=may_manage,
                                             rpm_limit=rpm_limit, tpm_limit=tpm_limit,
                                             expires_days=expires_days, created_by="cli")
        except ValidationError as exc:
            raise CommandError("; ".join(exc.messages)) from None
        self.stdout.write(raw)
        scope = token.slots or "all slots"
        if token.listed:
            scope += f", listing {token.listed}"
        if token.may_manage:
            scope += ", may load and unload"
        if token.rpm_limit:
            scope += f", {token.rpm_limit} requests/min"
        if token.tpm_limit:
            scope += f", {token.tpm_limit} tokens/min"
        until = token.expires_at.isoformat(timespec="minutes") if token.expires_at else "never"
        self.stderr.write(f"created token {token.name!r} for {scope}, expires {until}. "
                          "It is shown only now: store it somewhere safe.")

    def do_list(self, json: bool = False, **_):
        rows = [self._row(t) for t in ApiToken.objects.all()]
        if json:
            self.stdout.write(_dumps(rows))
            return
        if not rows:
            self.stdout.write("no tokens (create one: manage.py tokens create NAME)")
            return
        header = ("NAME", "PREFIX", "SLOTS", "LISTS", "MANAGES", "RPM", "TPM", "STATUS",
                  "EXPIRES", "LAST USED")
        table = [header] + [(r["name"], r["prefix"] + "…", r["slots"] or "all",
                             r["listed"] or "all", "yes" if r["may_manage"] else "no",
                             r["rpm_limit"] or "-", r["tpm_limit"] or "-",
                             r["status"],
                             r["expires_at"] or "never", r["last_used_at"] or "never")
                            for r in rows]
        widths = [max(len(str(row[i])) for row in table) for i in range(len(header))]
        for row in table:
            self.stdout.write("  ".join(str(c).ljust(w) for c, w in zip(row, widths,
                                                                          strict=True)).rstrip())

    def do_revoke(self, name: str, **_):
        try:
            token = tokens.revoke_token(name)
        except ApiToken.DoesNotExist:
            raise CommandError(f"no token named {name!r}") from None
        self.stdout.write(f"revoked token {token.name!r} (a running hal0 stops accepting it "
                          "within HAL0_TOKEN_CACHE_S seconds)")

    @staticmethod
    def _row(token: ApiToken) -> dict:
        if token.revoked_at:
            status = "revoked"
        elif token.expires_at and token.expires_at <= timezone.now():
            status = "expired"
        else:
            status = "active"

        def stamp(value):
            return value.isoformat(timespec="seconds") if value else None

        return {"name": token.name, "prefix": token.prefix, "slots": token.slots,
                "listed": token.listed, "may_manage": token.may_manage,
                "rpm_limit": token.rpm_limit, "tpm_limit": token.tpm_limit,
                "status": status, "expires_at": stamp(token.expires_at),
                "created_at": stamp(token.created_at), "last_used_at": stamp(token.last_used_at),
                "created_by": token.created_by}


def _limit(option: str, value: str | None) -> int | None:
    """A per-minute limit from the command line: a whole number from 1 (None: unlimited)."""
    if value is None:
        return None
    try:
        number = int(value)
    except ValueError:
        number = 0
    if not 1 <= number <= 2**31 - 1:
        raise CommandError(f"{option} must be a whole number of at least 1 (got {value!r}); "
                           "leave it out for unlimited")
    return number


def _dumps(data) -> str:
    return json.dumps(data, indent=2)
