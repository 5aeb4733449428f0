"""`python manage.py lemond_sim`: run the lemond simulator (a test double, no inference)."""

from django.core.management.base import BaseCommand, CommandError

from providers.lemonade import simulator


class Command(BaseCommand):
    help = ("Run a lemond (Lemonade Server) simulator on loopback: real HTTP, lemond's routes, "
            "shapes, LRU residency and errors, no inference. For tests and `make demo`.")

    # The simulator never touches the database; skip the checks to start fast.
    requires_system_checks = []
    requires_migrations_checks = False

    def add_arguments(self, parser):
        simulator.add_arguments(parser)

    def handle(self, *args, **options):
        try:
            code = simulator.run(options["host"], options["port"],
                                 allow_remote=options["allow_remote"],
                                 websocket_port=options["websocket_port"],
                                 **simulator.options_from_args(options))
        except ValueError as exc:
            raise CommandError(str(exc)) from None
        if code:
            raise CommandError("the lemond simulator could not start (is the port in use?)",
                               returncode=code)
