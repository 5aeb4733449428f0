"""`manage.py slots`: the operator's CLI over the same actions the dashboard uses.

    slots list [--json]            slots show NAME [--json]
    slots load|unload|restart NAME slots swap NAME MODEL   (load/swap: --dry-run)
    slots pin|unpin NAME           slots export [-o FILE]
    slots import FILE [--dry-run]

Lifecycle subcommands exit 0 on success and 1 with the error envelope otherwise.
"""

from __future__ import annotations

import json
import sys

from django.core.management.base import BaseCommand, CommandError, CommandParser
from rich.console import Console
from rich.table import Table

import providers
from slots import portability
from slots.actions import fit, lifecycle
from slots.actions.errors import SlotError, get_slot
from slots.models import EventActor, Slot


class Command(BaseCommand):
    help = "List, inspect, load/unload/restart/swap/pin slots, and export/import their definitions."

    def add_arguments(self, parser: CommandParser) -> None:
        sub = parser.add_subparsers(dest="subcommand", required=True, metavar="SUBCOMMAND",
                                    parser_class=type(parser))
        p = sub.add_parser("list", help="a table of every slot", called_from_command_line=True)
        p.add_argument("--json", action="store_true", help="machine-readable output")
        p = sub.add_parser("show", help="one slot in detail", called_from_command_line=True)
        p.add_argument("name")
        p.add_argument("--json", action="store_true")
        for action in ("load", "unload", "restart", "pin", "unpin"):
            p = sub.add_parser(action, help=f"{action} a slot", called_from_command_line=True)
            p.add_argument("name")
            p.add_argument("--json", action="store_true", help="print the slot as JSON")
            if action == "load":
                p.add_argument("--dry-run", action="store_true",
                               help="print the fit check (memory, evictions), load nothing")
        p = sub.add_parser("swap", help="serve another model (kept only if it loads)",
                           called_from_command_line=True)
        p.add_argument("name")
        p.add_argument("model")
        p.add_argument("--json", action="store_true")
        p.add_argument("--dry-run", action="store_true",
                       help="print the fit check (memory, evictions), swap nothing")
        p = sub.add_parser("export", help="every slot definition as JSON",
                           called_from_command_line=True)
        p.add_argument("-o", "--output", help="write to this file instead of stdout")
        p = sub.add_parser("import", help="create/update slots from an export file (all or nothing)",
                           called_from_command_line=True)
        p.add_argument("file", help="a JSON file from `slots export` ('-' for stdin)")
        p.add_argument("--dry-run", action="store_true", help="print what would change, change nothing")

    def handle(self, *args, subcommand: str, **options):
        handler = getattr(self, f"do_{subcommand}", None)
        if handler:
            return handler(**options)
        return self.lifecycle(subcommand, **options)

    # --- reading ------------------------------------------------------------------------
    def do_list(self, json: bool = False, **_):
        slots = list(Slot.objects.for_dashboard())
        if json:
            self.stdout.write(_dumps([s.as_json() for s in slots]))
            return
        table = Table(box=None, header_style="bold")
        for col in ("name", "capability", "device", "model", "state", "loaded", "node", "flags"):
            table.add_column(col)
        for s in slots:
            flags = ",".join(f for f, on in (("default", s.is_default), ("pinned", s.pinned),
                                             ("keep", s.keep_loaded), ("disabled", not s.enabled))
                             if on)
            table.add_row(s.name, s.capability, s.device, s.model_name, s.state,
                          s.loaded_model or "-", s.node.name, flags or "-")
        Console(file=self.stdout, width=160, force_terminal=False).print(table)

    def do_show(self, name: str, json: bool = False, **_):
        slot = self._get(name)
        provider = providers.get()
        data = slot.as_json()
        data["load_body"] = provider.load_body(slot)
        data["environment"] = provider.environment(slot)
        data["image"] = provider.image_ref(slot)
        data["recent_events"] = [
            {"at": e.created_at.isoformat(), "action": e.action, "actor": e.actor, "ok": e.ok,
             "duration_ms": e.duration_ms, "message": e.message}
            for e in slot.events.all()[:10]
        ]
        if json:
            self.stdout.write(_dumps(data))
            return
        for key in ("name", "capability", "device", "model_name", "state", "loaded_model", "node",
                    "ctx_size", "extra_args", "pinned", "keep_loaded", "idle_timeout_s",
                    "enabled", "is_default", "error_code", "state_message"):
            self.stdout.write(f"{key:16} {data.get(key)}")
        self.stdout.write(f"{'image':16} {data['image']}")
        self.stdout.write(f"{'load body':16} {_dumps(data['load_body'], indent=None)}")
        self.stdout.write("environment:")
        for key, value in data["environment"].items():
            self.stdout.write(f"  {key}={value}")
        self.stdout.write("recent events:")
        for e in data["recent_events"]:
            self.stdout.write(f"  {e['at']} {e['action']:10} {'ok ' if e['ok'] else 'ERR'} "
                              f"{e['actor']}: {e['message']}")

    # --- lifecycle ----------------------------------------------------------------------
    def lifecycle(self, action: str, name: str, json: bool = False, model: str | None = None,
                  dry_run: bool = False, **_):
        if dry_run:
            return self.plan(action, name, model, json=json)
        try:
            slot = lifecycle.do_action(action, name, actor=EventActor.CLI, model=model or "")
        except SlotError as exc:
            self.stderr.write(_dumps(exc.envelope()))
            sys.exit(1)
        slot.refresh_from_db()
        if json:
            self.stdout.write(_dumps(slot.as_json()))
        else:
            self.stdout.write(f"{slot.name}: {action} ok — state {slot.state}"
                              + (f", serving {slot.loaded_model}" if slot.loaded_model else ""))

    def do_swap(self, name: str, model: str, json: bool = False, dry_run: bool = False, **_):
        return self.lifecycle("swap", name, json=json, model=model, dry_run=dry_run)

    def plan(self, action: str, name: str, model: str | None, json: bool = False) -> None:
        """The fit check without acting; exit 1 when hal0 would refuse."""
        try:
            result = fit.plan(name, model, action=action)
        except SlotError as exc:
            self.stderr.write(_dumps(exc.envelope()))
            sys.exit(1)
        if json:
            self.stdout.write(_dumps(result.as_json()))
        else:
            self.stdout.write(f"{name}: {action} {result.model} — {result.verdict} (dry run: "
                              "nothing done)")
            for line in result.lines():
                self.stdout.write(f"  {line}")
        if not result.ok:
            sys.exit(1)

    # --- portability -------------------------------------------------------------------
    def do_export(self, output: str | None = None, **_):
        text = portability.export_json()
        if output:
            try:
                with open(output, "w", encoding="utf-8") as fh:
                    fh.write(text)
            except OSError as exc:
                raise CommandError(f"cannot write {output}: {exc.strerror}") from None
            self.stderr.write(f"wrote {Slot.objects.count()} slots to {output}")
        else:
            self.stdout.write(text, ending="")

    def do_import(self, file: str, dry_run: bool = False, **_):
        try:
            text = sys.stdin.read() if file == "-" else open(file, encoding="utf-8").read()
        except OSError as exc:
            raise CommandError(f"cannot read {file}: {exc.strerror}") from None
        except UnicodeDecodeError:
            raise CommandError(f"{file} is not UTF-8 text (an export is JSON)") from None
        try:
            plan = portability.import_json(text, dry_run=dry_run, actor=EventActor.CLI)
        except portability.ImportProblem as exc:
            raise CommandError(f"{file}: {exc}") from None
        for line in plan.describe():
            self.stdout.write(line)
        verb = "would change" if dry_run else "changed"
        self.stdout.write(f"{verb} {plan.change_count} slot(s); "
                          f"{len(plan.unchanged)} unchanged"
                          + (" (dry run: nothing written)" if dry_run else ""))

    def _get(self, name: str) -> Slot:
        try:
            return get_slot(name)
        except SlotError as exc:
            raise CommandError(exc.message) from None


def _dumps(data, indent: int | None = 2) -> str:
    return json.dumps(data, indent=indent, sort_keys=False, ensure_ascii=False)
