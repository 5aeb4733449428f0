"""Create the first admin login if there is none, printing its password once."""

import argparse
import secrets
from pathlib import Path

from django.contrib.auth import get_user_model
from django.core.management.base import BaseCommand, CommandError


class Command(BaseCommand):
    help = "Create an admin login (superuser) if none exists and print its password once."

    def add_arguments(self, parser):
        parser.add_argument("--username", default="admin")
        parser.add_argument("--password-file", type=Path,
                            help="read the password from this file instead of generating one")
        # For the installer, which passes a private copy of the operator's file: the name
        # its messages show instead of the copy's (hidden from --help).
        parser.add_argument("--password-source", metavar="LABEL", help=argparse.SUPPRESS)

    def handle(self, *args, username, password_file, password_source=None, **options):
        User = get_user_model()
        existing = User.objects.filter(is_superuser=True).order_by("id").first()
        if existing:
            self.stdout.write(f"An admin login already exists ({existing.get_username()}).")
            return
        source = password_source or password_file
        if password_file:
            try:
                password = password_file.read_text().strip()
            except OSError as exc:
                raise CommandError(f"cannot read {source}: {exc.strerror}") from None
            if len(password) < 8:
                raise CommandError(f"the password in {source} is shorter than 8 characters")
        else:
            password = secrets.token_urlsafe(12)
        User.objects.create_superuser(username=username, email="", password=password)
        if password_file:
            self.stdout.write(f"Created admin login {username!r} (password from {source}).")
        else:
            self.stdout.write(self.style.SUCCESS(
                f"Created admin login: {username} / {password}\n"
                "This password is shown only once; change it in /admin/ if you like."))
