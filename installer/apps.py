from django.apps import AppConfig


class InstallerConfig(AppConfig):
    name = "installer"
    verbose_name = "Installer"
