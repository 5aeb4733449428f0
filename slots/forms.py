"""The slot, node and token forms: the model's own validation with errors shown inline.

Saving goes through the actions (`slots.actions.config`), never `form.save()`, so the audit
row and the live push happen as for every other entry point.
"""

from __future__ import annotations

from typing import Any

from django import forms
from django.db.models import Q

from .actions import config
from .actions.audit import Actor
from .actions.errors import SlotError
from .models import ApiToken, Node, Slot, can_manage_slots, unknown_slots_or_capabilities

FIELDS = [*Slot.DESIRED_FIELDS, "node"]


class QueueTimeoutOptional(forms.ModelForm):
    """`queue_timeout_s` may be left out or empty (forms and scripts written before it
    existed): the slot keeps its current value, 30 s for a new one."""

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        if "queue_timeout_s" in self.fields:
            self.fields["queue_timeout_s"].required = False

    def clean_queue_timeout_s(self):
        value = self.cleaned_data.get("queue_timeout_s")
        return self.instance.queue_timeout_s if value is None else value


class SlotForm(QueueTimeoutOptional):
    class Meta:
        model = Slot
        fields = FIELDS
        widgets = {
            "extra_args": forms.TextInput(attrs={"spellcheck": "false"}),
            "model_name": forms.TextInput(attrs={"spellcheck": "false"}),
        }

    def __init__(self, *args, user=None, **kwargs):
        super().__init__(*args, **kwargs)
        if user is not None and not can_manage_slots(user):
            # a disabled field keeps its current value whatever the request carries
            for name in ("extra_args", "node"):
                self.fields[name].disabled = True
                self.fields[name].help_text = "Only staff (or slots.manage_slots) change this."
        # validation writes the new values onto the instance; the action needs the old name
        self.original_name = self.instance.name
        self.model_note = ""  # "could not check the model" after a save (see clean)
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

    def clean(self) -> dict:
        """The model must be one the node's lemond knows (a typo is refused naming the
        closest names); when lemond cannot be asked the form says so and saves."""
        data = super().clean()
        self.model_note = ""
        model, capability = data.get("model_name"), data.get("capability")
        node = data.get("node") or (self.instance.node if self.instance.node_id else None)
        unchanged = self.instance.pk and model == self.instance.model_name \
            and capability == self.instance.capability
        if not model or not capability or "model_name" in self.errors or unchanged:
            return data
        result = config.check_model(node or Node.local(), model, capability)
        if result.error:
            self.add_error("model_name", result.error)
            # kept, so the model's own clean() does not also call the model missing
            self.cleaned_data["model_name"] = model
        self.model_note = result.note
        return data

    def desired(self) -> dict:
        data = {f: self.cleaned_data.get(f) for f in Slot.DESIRED_FIELDS}
        data["node"] = self.cleaned_data.get("node") or Node.local()
        return data

    def save_through_actions(self, actor: Actor) -> Slot | None:
        """Create or update via the actions; their errors land on the form's fields."""
        try:
            if self.instance.pk:
                return config.do_update_slot(self.original_name, self.desired(), actor=actor)
            return config.do_create_slot(self.desired(), actor=actor)
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
    may_manage = forms.BooleanField(
        required=False, label="May load and unload",
        help_text="Clients with this token may load and unload its slots (POST /models/load "
                  "and /models/unload, llama.cpp's router API), e.g. Open WebUI's or pi's "
                  "load buttons. Off: they only use the slots, loaded on demand.")
    rpm_limit = forms.IntegerField(
        required=False, min_value=1, max_value=2**31 - 1, label="Requests per minute",
        help_text="Past it the gateway answers 429 (OpenAI's rate_limit_exceeded). "
                  "Empty = unlimited.")
    tpm_limit = forms.IntegerField(
        required=False, min_value=1, max_value=2**31 - 1, label="Tokens per minute",
        help_text="Input + output tokens, counted from each response's usage. "
                  "Empty = unlimited.")
    expires_days = forms.IntegerField(
        required=False, min_value=1, max_value=3650, label="Expires after (days)",
        help_text="Empty = never expires.")

    def clean_name(self):
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
        names = [s.strip() for s in self.cleaned_data["listed"].split(",") if s.strip()]
        if unknown := unknown_slots_or_capabilities(names):
            raise forms.ValidationError(
                f"No slot or capability named {', '.join(map(repr, unknown))}.")
        return ",".join(names)


class NodeForm(forms.ModelForm):
    """A lemond node (the Nodes page and the admin). Keys are write-only: never rendered
    back; leaving a field empty keeps the old key."""

    base_url = forms.URLField(label="Base URL", assume_scheme="http",
                              help_text="e.g. http://127.0.0.1:13305")
    api_key = forms.CharField(required=False, widget=forms.PasswordInput(render_value=False),
                              help_text="Leave empty to keep the current key (dropped if the URL changes).")
    admin_api_key = forms.CharField(required=False,
                                    widget=forms.PasswordInput(render_value=False),
                                    help_text="Leave empty to keep the current key "
                                              "(dropped if the URL changes).")
    clear_keys = forms.BooleanField(required=False, help_text="Remove both stored keys.")

    class Meta:
        model = Node
        fields = ["name", "base_url", "api_key", "admin_api_key", "enabled"]

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        if self.instance.pk and self.instance.name == Node.LOCAL:
            self.fields["name"].disabled = True
            self.fields["name"].help_text = "The default node keeps its name."

    def clean(self) -> dict[str, Any]:
        data = super().clean()
        # Stored keys stay with the URL they were given for: pointing a node elsewhere
        # without retyping them drops them, so nobody can redirect the keys to their own host.
        moved = self.instance.pk and data.get("base_url") not in (None, self.instance.base_url)
        for key in ("api_key", "admin_api_key"):
            if data.get("clear_keys") or (moved and not data.get(key)):
                data[key] = ""
            elif not data.get(key) and self.instance.pk:
                data[key] = getattr(self.instance, key)
        return data

    def save_through_actions(self, actor: Actor) -> Node:
        """Create or update the (valid) node via the actions: an audit row, a live push."""
        node = self.save(commit=False)
        if node.pk:
            return config.do_update_node(node, actor=actor)
        return config.do_create_node(node, actor=actor)
