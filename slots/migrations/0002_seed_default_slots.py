"""Seed the `local` node and the six default slots (one default per capability)."""

from django.conf import settings
from django.db import migrations


def seed(apps, schema_editor):
    from slots.seed import DEFAULT_SLOTS

    Node = apps.get_model("slots", "Node")
    Slot = apps.get_model("slots", "Slot")
    node, _ = Node.objects.get_or_create(
        name="local",
        defaults={
            "base_url": settings.HAL0_LEMONADE_URL,
            "api_key": settings.HAL0_LEMONADE_API_KEY,
            "admin_api_key": settings.HAL0_LEMONADE_ADMIN_API_KEY,
        },
    )
    for spec in DEFAULT_SLOTS:
        if Slot.objects.filter(name=spec["name"]).exists():
            continue
        has_default = Slot.objects.filter(capability=spec["capability"], is_default=True).exists()
        Slot.objects.create(node=node, seeded=True, is_default=not has_default, **spec)


def unseed(apps, schema_editor):
    apps.get_model("slots", "Slot").objects.filter(seeded=True).delete()


class Migration(migrations.Migration):
    dependencies = [("slots", "0001_initial")]
    operations = [migrations.RunPython(seed, unseed)]
