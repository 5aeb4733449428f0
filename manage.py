#!/usr/bin/env python
"""hal0's command-line entry point (`python manage.py help` lists every command)."""
import os
import sys


def main():
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "hal0site.settings")
    # Django's own manage.py: the settings module is chosen before Django is imported
    from django.core.management import execute_from_command_line  # noqa: PLC0415

    execute_from_command_line(sys.argv)


if __name__ == "__main__":
    main()
