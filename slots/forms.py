"""The slot form: the model's own validation (`Slot.clean`) with errors shown inline.

Saving goes through `services.create_slot` / `services.update_slot`, never `form.save()`,
so the audit row and the live push happen as for every other entry point.
"""

from __future__ import annotations

from django import forms
from django.db.models import Q

from . import services
from .models import Node, Slot
from .services import SlotError

FIELDS = [*Slot.DESIRED_FIELDS, "node"]


class SlotForm(forms.ModelForm):
    class Meta:
        model = Slot
        fields = FIELDS
        widgets = {
            "extra_args": forms.TextInput(attrs={"spellcheck": "false"}),
            "model_name": forms.TextInput(attrs={"spellcheck": "false"}),
        }

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        # validation writes the new values onto the instance; the action needs the old name
        self.original_name = self.instance.name
        # any enabled node (and the slot's current one, even if disabled since)
        current = self.instance.node_id if self.instance.pk else None
        self.fields["node"].queryset = Node.objects.filter(
            Q(enabled=True) | Q(pk=current)).order_by("name")
        self.fields["node"].required = False
        self.fields["node"].empty_label = "local (default)"
        self.fields["node"].help_text = "The lemond node that serves this slot."
        if self.instance.pk and self.instance.seeded:
            self.fields["name"].disabled = True
            self.fields["name"].help_text = "Seeded slots keep their name."

    def desired(self) -> dict:
        data = {f: self.cleaned_data.get(f) for f in Slot.DESIRED_FIELDS}
        data["node"] = self.cleaned_data.get("node") or Node.local()
        return data

    def save_through_services(self, actor) -> Slot | None:
        """Create or update via the actions; their errors land on the form's fields."""
        try:
            if self.instance.pk:
                return services.update_slot(self.original_name, self.desired(), actor=actor)
            return services.create_slot(self.desired(), actor=actor)
        except SlotError as exc:
            if exc.fields:
                for name, messages in exc.fields.items():
                    for message in messages:
                        self.add_error(name if name in self.fields else None, message)
            else:
                self.add_error(None, exc.message)
            return None


class TokenForm(forms.Form):
    """A new API token: a name, optionally the slots it may use and a lifetime."""

    name = forms.SlugField(max_length=64, help_text="Letters, digits, '-' and '_', e.g. open-webui.")
    slots = forms.CharField(
        required=False, max_length=500,
        help_text="Comma-separated slot names this token may use; empty = every slot.")
    listed = forms.CharField(
        required=False, max_length=500, label="Lists",
        help_text="What its model list (GET /v1/models) shows: slot names or capabilities, "
                  "e.g. chat for Open WebUI's model picker; empty = every slot it may use. "
                  "It may still use the others by name.")
    expires_days = forms.IntegerField(
        required=False, min_value=1, max_value=3650, label="Expires after (days)",
        help_text="Empty = never expires.")

    def clean_name(self):
        from .models import ApiToken

        name = self.cleaned_data["name"]
        if ApiToken.objects.filter(name=name).exists():
            raise forms.ValidationError(f"A token named {name!r} exists already.")
        return name

    def clean_slots(self):
        names = [s.strip() for s in self.cleaned_data["slots"].split(",") if s.strip()]
        known = set(Slot.objects.filter(name__in=names).values_list("name", flat=True))
        unknown = [n for n in names if n not in known]
        if unknown:
            raise forms.ValidationError(f"No slot named {', '.join(map(repr, unknown))}.")
        return ",".join(names)

    def clean_listed(self):
        from .models import unknown_slots_or_capabilities

        names = [s.strip() for s in self.cleaned_data["listed"].split(",") if s.strip()]
        if unknown := unknown_slots_or_capabilities(names):
            raise forms.ValidationError(
                f"No slot or capability named {', '.join(map(repr, unknown))}.")
        return ",".join(names)
